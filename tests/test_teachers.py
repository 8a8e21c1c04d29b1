"""`python -m rld.teachers`: list, fetch (against a loopback HTTP server serving generated
archives in the published layout), verify, train, and what training does with a teacher's
verification."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import shlex
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, SMALL, run_train, train_env

from rld.models import build_model

CIFAR_MEMBER = "cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"  # the published layout
R56 = ["pair=resnet56_resnet20"]


def teachers_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rld.teachers", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=train_env())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint(arch: str, num_classes: int, seed: int, family: str = "cifar") -> bytes:
    """A checkpoint in the CRD release's format (the dict of ckpt_epoch_240.pth)."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, family)
    buf = io.BytesIO()
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(72.34),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005}]}}, buf)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def leftovers(folder: Path) -> list[str]:
    """Partial downloads and temporary folders a fetch left behind."""
    return sorted(p.name for p in folder.glob(".*") if p.name != ".fetch.lock")


class Served:
    """What the loopback server serves: files by name, a cut after N bytes (once) per name,
    and the requests it saw as (name, Range header)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.whole: set[str] = set()  # names served whole whatever Range asks
        self.url = ""


def handler(served: Served):
    class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one response per connection
        def do_GET(self):
            name = self.path.lstrip("/")
            asked = self.headers.get("Range")
            served.requests.append((name, asked))
            asked = None if name in served.whole else asked
            body = served.files.get(name)
            if body is None:
                self.send_error(404)
                return
            start = int(asked.removeprefix("bytes=").split("-")[0]) if asked else 0
            if start >= len(body) > 0:
                self.send_error(416)
                return
            self.send_response(206 if asked else 200)
            if asked:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("ETag", f'"{sha(body)[:16]}"')
            self.end_headers()
            cut = served.cut.pop(name, None)
            self.wfile.write(body[start:] if cut is None else body[start:start + cut])

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture(scope="module")
def server():
    served = Served()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(served))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    served.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield served
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def cifar_archive() -> dict:
    member = checkpoint("resnet56", 100, seed=1)
    data = tar_bytes({CIFAR_MEMBER: member, "cifar_teachers/README": b"teachers\n"})
    return {"data": data, "member": member}


def _fetch_args(root: Path, url: str) -> list[str]:
    return ["fetch", *R56, f"paths.root={root}", f"dataset.teacher_source={url}"]


# --------------------------------------------------------------------------- layout
def test_layout_keeps_the_dataset_folder_under_paths_teachers(tmp_path):
    from rld.teachers.configs import select
    from rld.teachers.status import missing_teacher_message

    default = select(["pair=vgg13_vgg8"]).teachers[0].path
    assert default == Path("teachers/cifar100/vgg13_vanilla/ckpt_epoch_240.pth")
    shared = {ds: select([f"dataset={ds}", "pair=tiny", f"paths.teachers={tmp_path}"])
              for ds in ("digits", "synthetic")}
    assert shared["digits"].teachers[0].path == tmp_path / "digits/resnet14_vanilla/teacher.pth"
    assert shared["synthetic"].folder == tmp_path / "synthetic"  # no overwriting each other

    # where teachers come from and whether a failed one may be used decide nothing
    from rld.reproduce import fingerprint

    fp = fingerprint(shared["digits"].teachers[0].cfg)
    assert "dataset.name" in fp and not any(
        k.startswith("teacher.") or k == "dataset.teacher_source" for k in fp)

    # a teacher at the old layout (paths.teachers was the data set's folder): the error says
    old = tmp_path / "digits/resnet14_vanilla/teacher.pth"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    cfg = select(["dataset=digits", "pair=tiny", f"paths.teachers={tmp_path}/digits"]).teachers[0]
    message = missing_teacher_message(cfg.cfg)
    assert f"a teacher is at {old}" in message and f"pass paths.teachers={tmp_path}" in message


def test_published_table_agrees_with_its_sources():
    import torchvision.models

    from rld.teachers.configs import default_pairs, published_table, select

    table = published_table()
    for (_, arch), row in table.items():
        if row.weights.startswith("torchvision:"):
            meta = torchvision.models.get_weight(row.weights.split(":", 1)[1]).meta
            assert row.top1 == meta["_metrics"]["ImageNet-1K"]["acc@1"], arch
    text = (REPO / "rld/data/paper_results.csv").read_text()
    for r in csv.DictReader(io.StringIO(text)):
        if r["dataset"] == "cifar100":
            assert table[("cifar100", r["teacher"])].top1 == float(r["teacher_top1"])
    cifar = select([])  # the paper's CIFAR-100 pairs need exactly the archive's six teachers
    assert len(default_pairs(cifar.teachers[0].cfg)) == 16
    assert sorted(t.arch for t in cifar.teachers) == sorted(
        arch for (ds, arch), row in table.items() if row.weights == "cifar_teachers.tar")


# --------------------------------------------------------------------------- fetch
def test_fetch_downloads_checks_records_and_keeps_a_good_install(server, tmp_path, cifar_archive):
    server.files["cifar_teachers.tar"] = cifar_archive["data"]
    args = _fetch_args(tmp_path, f"{server.url}/cifar_teachers.tar")
    proc = teachers_cli(*args)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "teachers/cifar100"
    target = folder / "resnet56_vanilla/ckpt_epoch_240.pth"
    assert target.read_bytes() == cifar_archive["member"]
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    source = manifest["sources"]["cifar_teachers.tar"]
    assert (source["sha256"], source["size"]) == (sha(cifar_archive["data"]),
                                                  len(cifar_archive["data"]))
    assert "trust on first download" in source["trust"] and "trust on first" in proc.stdout
    entry = manifest["files"]["resnet56_vanilla/ckpt_epoch_240.pth"]
    assert (entry["sha256"], entry["member"]) == (sha(cifar_archive["member"]), CIFAR_MEMBER)
    assert leftovers(folder) == []

    # again: the good install is not touched and nothing is downloaded
    seen, stamp = len(server.requests), target.stat().st_mtime_ns
    proc = teachers_cli(*args)
    assert proc.returncode == 0 and "nothing to fetch" in proc.stdout
    assert len(server.requests) == seen and target.stat().st_mtime_ns == stamp

    # another archive under the recorded name: refused, nothing installed
    target.unlink()
    other = tar_bytes({CIFAR_MEMBER: checkpoint("resnet56", 100, seed=2),
                       "cifar_teachers/README": b"teachers\n"})
    assert len(other) == len(cifar_archive["data"])  # the same size: the SHA-256 tells
    server.files["cifar_teachers.tar"] = other
    proc = teachers_cli(*args)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "SHA-256" in proc.stderr and f"differs from {source['sha256']}" in proc.stderr
    assert not target.exists() and leftovers(folder) == []


def test_interrupted_download_resumes(server, tmp_path, cifar_archive):
    server.files["cifar_teachers.tar"] = cifar_archive["data"]
    server.cut["cifar_teachers.tar"] = 1_000_000
    args = _fetch_args(tmp_path, f"{server.url}/cifar_teachers.tar")
    proc = teachers_cli(*args)
    assert proc.returncode == 1 and "interrupted after 1,000,000 of" in proc.stderr
    folder = tmp_path / "teachers/cifar100"
    assert (folder / ".cifar_teachers.tar.part").stat().st_size == 1_000_000
    assert not (folder / "resnet56_vanilla").exists()

    proc = teachers_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert server.requests[-1] == ("cifar_teachers.tar", "bytes=1000000-")
    target = folder / "resnet56_vanilla/ckpt_epoch_240.pth"
    assert target.read_bytes() == cifar_archive["member"]
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["sources"]["cifar_teachers.tar"]["sha256"] == sha(cifar_archive["data"])
    assert leftovers(folder) == []


def test_resume_starts_over_when_the_server_ignores_the_range(server, tmp_path):
    from rld.teachers.configs import TeacherError
    from rld.teachers.download import download

    body = bytes(range(256)) * 8192  # 2 MiB
    server.files["plain.bin"], server.whole = body, {"plain.bin"}
    server.cut["plain.bin"] = 700_000
    part = tmp_path / ".plain.bin.part"
    with pytest.raises(TeacherError, match="interrupted after 700,000 of 2,097,152 bytes"):
        download(f"{server.url}/plain.bin", part, progress=False)
    download(f"{server.url}/plain.bin", part, progress=False)  # asks a range, gets it all
    assert server.requests[-1] == ("plain.bin", "bytes=700000-")
    assert part.read_bytes() == body and not (tmp_path / ".plain.bin.part.json").exists()


def test_truncated_archive_installs_nothing(server, tmp_path, cifar_archive):
    data = cifar_archive["data"]
    server.files["truncated.tar"] = data[: int(len(data) * 0.6)]
    proc = teachers_cli(*_fetch_args(tmp_path, f"{server.url}/truncated.tar"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "truncated or corrupt" in proc.stderr
    folder = tmp_path / "teachers/cifar100"
    assert not (folder / "resnet56_vanilla").exists() and not (folder / "MANIFEST.json").exists()
    assert leftovers(folder) == []


def test_offline_fetch_from_a_path_for_any_dataset(tmp_path):
    archive = tmp_path / "digits_teachers.tar"  # members at the top level this time
    member = checkpoint("resnet14", 10, seed=3)
    archive.write_bytes(tar_bytes({"resnet14_vanilla/teacher.pth": member}))
    base = ["--dataset", "digits", "pair=tiny", f"paths.root={tmp_path}"]
    proc = teachers_cli("fetch", "--from", str(archive), *base)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "teachers/digits"
    assert (folder / "resnet14_vanilla/teacher.pth").read_bytes() == member
    assert archive.exists()  # the user's file stays
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["sources"]["digits_teachers.tar"]["url"] == str(archive)

    proc = teachers_cli("fetch", "--from", str(tmp_path / "nope.tar"), *base)
    assert proc.returncode == 2 and proc.stderr.startswith("rld.teachers: error: --from")
    assert "no such archive" in proc.stderr


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from rld.teachers.__main__ import main

    for argv, needle in [
        (["fetch", "--dataset", "digits", "dataset=synthetic"], "disagree"),
        (["fetch", "--dataset", "digits", f"paths.root={tmp_path}"], "no published teachers"),
        (["verify", "nope.key=1"], "nope is not a key of the top level"),
        (["list", "pair=vgg13_vgg8,nope"], "pair=vgg13_vgg8,nope is not allowed"),
        (["train", "distiller=kd", "pair=tiny"], "distiller=kd is not allowed"),
        (["fetch", "--sha256", "abc", "pair=tiny"], "not 64 hexadecimal digits"),
        (["frob"], "invalid choice"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("rld.teachers: error:") and needle in err, (argv, err)
        assert len(err.strip().splitlines()) == 1


def test_full_disk_installs_nothing(tmp_path, capsys, monkeypatch):
    from rld.teachers.__main__ import main

    archive = tmp_path / "t.tar"
    archive.write_bytes(tar_bytes({"resnet14_vanilla/teacher.pth": checkpoint("resnet14", 10, 0)}))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extract", full)
    assert main(["fetch", "--dataset", "digits", "--from", str(archive), "pair=tiny",
                 f"paths.root={tmp_path}"]) == 1
    assert "no space left on the device" in capsys.readouterr().err
    folder = tmp_path / "teachers/digits"
    assert not (folder / "resnet14_vanilla").exists() and leftovers(folder) == []


def test_imagenet_weights_need_torchvisions_hash(server, tmp_path):
    server.files["resnet34-b627a593.pth"] = b"not the published weights"
    proc = teachers_cli("fetch", "--dataset", "imagenet", "pair=resnet34_resnet18",
                        f"paths.root={tmp_path}", "--from", f"{server.url}/")
    assert proc.returncode == 1 and "does not start with the hash in its name" in proc.stderr
    assert server.requests[-1][0] == "resnet34-b627a593.pth"
    folder = tmp_path / "teachers/imagenet/ResNet34_vanilla"
    assert list(folder.iterdir()) == []


def test_imagenet_weights_install_into_the_layout(tmp_path, capsys, monkeypatch):
    from rld.teachers import fetch
    from rld.teachers.__main__ import main

    weights = checkpoint("ResNet18", 1000, seed=0, family="imagenet")
    name = f"resnet18-{sha(weights)[:8]}.pth"  # torchvision's naming: the hash prefix
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / name).write_bytes(weights)
    monkeypatch.setattr(fetch, "torchvision_weights",
                        lambda arch, ds: f"https://download.pytorch.org/models/{name}")
    assert main(["fetch", "--dataset", "imagenet", "pair=resnet34_resnet18",
                 "pair.teacher=ResNet18", f"paths.root={tmp_path}", "--from", str(mirror)]) == 0
    folder = tmp_path / "teachers/imagenet"
    assert (folder / "ResNet18_vanilla/ckpt_epoch_100.pth").read_bytes() == weights
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["sources"][name]["sha256"] == sha(weights)
    assert "hash prefix" in manifest["sources"][name]["trust"]
    assert "installed" in capsys.readouterr().out


# --------------------------------------------------------------------------- train, verify
@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """A root whose digits teacher `rld.teachers train` trained (1 epoch)."""
    root = tmp_path_factory.mktemp("digits")
    args = ["train", "dataset=digits", "pair=tiny", f"paths.root={root}", "trainer.epochs=1",
            "trainer.progress=none", "hydra/launcher=basic"]
    proc = teachers_cli(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (root / "teachers/digits/resnet14_vanilla/teacher.pth").is_file()
    again = teachers_cli(*args)
    assert again.returncode == 0 and "nothing to train" in again.stdout
    return root


def _csv(path: Path, top1: float) -> Path:
    path.write_text(f"dataset,teacher,top1\ndigits,resnet14,{top1}\ndigits,resnet8,1.0\n")
    return path


@pytest.mark.slow  # ~55 s on 2 cores (trains a digits teacher): in make test-slow
def test_verify_then_training_follows_the_verification(digits_root, tmp_path):
    root = digits_root
    teacher = root / "teachers/digits/resnet14_vanilla/teacher.pth"
    [record] = (root / "sweeps").rglob("metrics.json")
    top1 = json.loads(record.read_text())["top1"]  # the teacher run's own evaluation
    base = ["dataset=digits", "pair=tiny", f"paths.root={root}"]

    proc = teachers_cli("verify", *base)  # no published accuracy for a digits teacher
    assert proc.returncode == 1 and "no expected top-1 for resnet14 on digits" in proc.stdout

    proc = teachers_cli("verify", *base, "--expected", str(_csv(tmp_path / "ok.csv", top1)))
    assert proc.returncode == 0 and f"verified  {teacher}" in proc.stdout, proc.stdout
    cache = json.loads((teacher.parent / "teacher.pth.verify.json").read_text())
    assert cache["status"] == "verified" and cache["sha256"] == sha(teacher.read_bytes())
    assert "verified: top-1" in teachers_cli("list", *base).stdout

    student = [*base, "distiller=kd", "trainer.epochs=1", "trainer.progress=none"]
    proc = run_train(root, *student, "tag=verified")
    assert f"teacher {teacher} verified: top-1 {top1:.2f}" in proc.stdout + proc.stderr
    [rec] = (root / "sweeps/verified").rglob("metrics.json")
    assert json.loads(rec.read_text())["teacher_verification"]["status"] == "verified"

    wrong = top1 + 0.5
    proc = teachers_cli("verify", *base, "--expected", str(_csv(tmp_path / "bad.csv", wrong)))
    assert proc.returncode == 1
    line = next(x for x in proc.stdout.splitlines() if x.startswith("failed"))
    assert str(teacher) in line and f"top-1 {top1:.2f}" in line and f"expected {wrong:.2f}" in line

    proc = run_train(root, *student, "tag=failed", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "failed its verification" in proc.stderr and "teacher.allow_unverified=true" in proc.stderr
    assert not list((root / "sweeps/failed").rglob("metrics.json"))
    run_train(root, *student, "tag=failed", "teacher.allow_unverified=true")
    [rec] = (root / "sweeps/failed").rglob("metrics.json")
    assert json.loads(rec.read_text())["teacher_verification"]["status"] == "failed"


def test_unverified_teacher_warns_with_the_command(teacher_root):
    proc = run_train(teacher_root, *SMALL, "distiller=kd", "trainer.epochs=1", "tag=unverified")
    out = proc.stdout + proc.stderr
    assert "is unverified: never verified; verify it with: python -m rld.teachers verify " \
           "dataset=synthetic pair=tiny" in out
    assert f"paths.root={teacher_root}" in out and "dataset.train_size=256" in out
    [rec] = (teacher_root / "sweeps/unverified").rglob("metrics.json")
    assert json.loads(rec.read_text())["teacher_verification"]["status"] == "unverified"


def test_missing_teacher_remedy_trains_where_the_run_looks(tmp_path):
    shared = tmp_path / "shared"
    student = [*SMALL, "distiller=kd", "trainer.epochs=1", f"paths.teachers={shared}"]
    proc = run_train(tmp_path, *student, check=False)
    assert proc.returncode == 2 and "teacher checkpoint not found" in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "train it:" in x)
    command = shlex.split(line.split("train it:", 1)[1].split(";")[0])
    assert command[:4] == ["python", "-m", "rld.teachers", "train"]
    assert f"paths.teachers={shared}" in command and "dataset.train_size=256" in command
    assert "python -m rld.teachers fetch" in proc.stderr
    done = subprocess.run([sys.executable, *command[1:], "trainer.epochs=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=train_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (shared / "synthetic/resnet14_vanilla/teacher.pth").is_file()
    run_train(tmp_path, *student)
