"""`fetch`: teachers from an archive (the published `cifar_teachers.tar`, a mirror, a local
copy, an archive of one's own) or from torchvision's weight files, into
`<paths.teachers>/<dataset>/<arch>_vanilla/<dataset.teacher_file>`.

Nothing is installed half: the download goes to a `.part` file beside the target (resumable),
its size and SHA-256 are checked when known (`MANIFEST.json` from an earlier download,
`--sha256`, torchvision's hash prefix), the wanted members are extracted with tarfile's
`data` filter into a temporary folder beside the target and each is loaded strictly into its
architecture; only then are the files renamed into place.  A file already there is never
replaced.  The archive's size and SHA-256 are recorded in MANIFEST.json at its first download
(trust on first download: no checksum of cifar_teachers.tar is published).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from rld.io import write_json
from rld.reproduce import file_sha256, sha256_of
from rld.teachers.configs import Selection, TeacherError, published_table
from rld.teachers.download import copy_to, disk_full, download, is_url, name_of

MANIFEST = "MANIFEST.json"
TOFU = ("trust on first download: no published SHA-256; recorded at this first download, "
        "later downloads of this file must match")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Manifest:
    """`<paths.teachers>/<dataset>/MANIFEST.json`: every fetched file (`sources`, by file
    name: url, size, sha256, how it was trusted) and every teacher installed from one
    (`files`, by path under the data set's folder: sha256, size, source, member)."""

    def __init__(self, folder: Path, dataset: str):
        import json

        self.path = folder / MANIFEST
        self.data = {"dataset": dataset, "sources": {}, "files": {}}
        if self.path.exists():
            try:
                self.data.update(json.loads(self.path.read_text()))
            except (OSError, ValueError) as e:
                raise TeacherError(f"{self.path} cannot be read ({e}): fix or remove it") from None

    def source(self, name: str) -> dict | None:
        return self.data["sources"].get(name)

    def file(self, rel: str) -> dict | None:
        return self.data["files"].get(rel)

    def record(self, name: str, entry: dict, files: dict[str, dict]) -> None:
        self.data["sources"][name] = {**entry, "recorded": now()}
        self.data["files"].update(files)
        write_json(self.path, self.data)


@contextmanager
def fetch_lock(folder: Path):
    """One fetch at a time per data set's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".fetch.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TeacherError(f"another fetch is running in {folder}; wait for it") from None
        yield


def check_bytes(path: Path, name: str, size: int | None, sha256: str | None,
                origin: str) -> tuple[int, str]:
    """(size, SHA-256) of `path`; TeacherError when one differs from a known value."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise TeacherError(f"{name} has {actual:,} bytes, not {size:,} ({origin}): "
                           "truncated or another file; nothing was installed")
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256.lower():
        raise TeacherError(f"{name}: SHA-256 {digest} differs from {sha256.lower()} "
                           f"({origin}); nothing was installed")
    return actual, digest


def check_loads(path: Path, arch: str, dataset) -> None:
    """TeacherError unless `path` loads strictly into `arch` of the data set's family."""
    from rld.models import CheckpointError, build_model, load_checkpoint

    model = build_model(arch, int(dataset.num_classes), str(dataset.family))
    try:
        load_checkpoint(model, path)
    except CheckpointError as e:
        raise TeacherError(f"{e}; nothing was installed") from None


def teacher_members(tar: tarfile.TarFile, teacher_file: str) -> dict[str, tarfile.TarInfo]:
    """The archive's teachers by `<arch>_vanilla` folder: members `[<folder>/]<arch>_vanilla/
    <teacher_file>` (cifar_teachers.tar puts them under `cifar_teachers/`)."""
    found: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        parts = PurePosixPath(member.name).parts
        if (member.isfile() and len(parts) in (2, 3) and parts[-1] == teacher_file
                and parts[-2].endswith("_vanilla")):
            if parts[-2] in found:
                raise TeacherError(f"the archive holds {parts[-2]}/{teacher_file} twice "
                                   f"({found[parts[-2]].name}, {member.name})")
            found[parts[-2]] = member
    return found


def unpack(archive: Path, name: str, tmp: Path, dataset) -> dict[str, tuple[Path, str]]:
    """The archive's teachers of the data set's model zoo, extracted under `tmp` and loaded
    strictly: {`<arch>_vanilla`: (extracted file, member name)}."""
    from rld.models import MODELS

    zoo = MODELS.get(str(dataset.family), {})
    try:
        with tarfile.open(archive) as tar:
            members = teacher_members(tar, str(dataset.teacher_file))
            wanted = {d: m for d, m in members.items() if d.removesuffix("_vanilla") in zoo}
            for member in wanted.values():
                tar.extract(member, tmp, filter="data")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(tmp, e, remove=False) from None  # the caller removes tmp
        raise TeacherError(f"{name} is not a readable archive ({e}); nothing was installed") from None
    except tarfile.FilterError as e:
        raise TeacherError(f"{name} holds an unsafe member ({e}); nothing was installed") from None
    except (tarfile.TarError, EOFError) as e:
        raise TeacherError(f"{name} is truncated or corrupt ({type(e).__name__}: {e}); "
                           "nothing was installed") from None
    if not wanted:
        raise TeacherError(f"{name} holds no <arch>_vanilla/{dataset.teacher_file} of a "
                           f"{dataset.family} model; nothing was installed")
    out = {}
    for folder, member in sorted(wanted.items()):
        path = tmp / member.name
        check_loads(path, folder.removesuffix("_vanilla"), dataset)
        out[folder] = (path, member.name)
    return out


def install(extracted: Path, target: Path, say) -> bool:
    """Rename `extracted` to `target` unless a file is there already (never replaced);
    whether `target` now holds the extracted bytes."""
    if target.exists():
        same = file_sha256(target) == sha256_of(extracted)
        say(f"kept {target}: " + ("already installed" if same else
                                  "differs from the archive's (remove it to install that one)"))
        return same
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(extracted, target)
    say(f"installed {target}")
    return True


def fetch_archive(sel: Selection, location: str, sha256: str | None, say) -> None:
    """The teachers of the archive at `location` (URL or path) into the data set's folder."""
    dataset, folder = sel.dataset, sel.folder
    name = name_of(location)
    manifest = Manifest(folder, str(dataset.name))
    known = manifest.source(name) or {}
    origin = ("given by --sha256" if sha256 else
              f"recorded in {manifest.path} at its first download")
    sha256 = sha256 or known.get("sha256")
    part = folder / f".{name}.part"
    archive = part if is_url(location) else Path(location)
    if is_url(location):
        say(f"downloading {location}")
        download(location, part)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".fetch-"))
    try:
        size, digest = check_bytes(archive, name, known.get("size"), sha256, origin)
        files = {}
        for arch_dir, (path, member) in unpack(archive, name, tmp, dataset).items():
            target = folder / arch_dir / str(dataset.teacher_file)
            entry = {"sha256": sha256_of(path), "size": path.stat().st_size, "source": name,
                     "member": member, "installed": now()}
            if install(path, target, say):
                files[str(target.relative_to(folder))] = entry
    except BaseException:
        if archive == part:
            part.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    trust = known.get("trust") or ("--sha256" if sha256 else TOFU)
    if known:
        say(f"{name}: size and SHA-256 match those recorded at its first download")
    elif not sha256:
        say(f"{name}: size {size:,} bytes, SHA-256 {digest} recorded in {manifest.path} "
            "(trust on first download: no published checksum; later downloads must match)")
    manifest.record(name, {"url": location, "size": size, "sha256": digest, "trust": trust},
                    files)
    part.unlink(missing_ok=True)


def torchvision_weights(arch: str, dataset: str) -> str:
    """The URL of the torchvision weight file published for `arch` (published.csv)."""
    import torchvision.models

    row = published_table().get((dataset, arch))
    if row is None or not row.weights.startswith("torchvision:"):
        raise TeacherError(f"no published torchvision weights for {arch} on {dataset}: "
                           "train it (python -m rld.teachers train) or fetch --from an archive")
    return torchvision.models.get_weight(row.weights.split(":", 1)[1]).url


def fetch_weights(sel: Selection, location: str | None, say) -> None:
    """Each missing teacher from its torchvision weight file (`location`: a mirror URL or a
    local folder holding torchvision's file names), checked by torchvision's rule (the file
    name's hash prefix) and loaded strictly, then renamed into the layout."""
    from torch.hub import HASH_REGEX

    manifest = Manifest(sel.folder, str(sel.dataset.name))
    for t in sel.teachers:
        if t.present:
            continue
        url = torchvision_weights(t.arch, str(sel.dataset.name))
        name = name_of(url)
        src = url if location is None else (f"{location.rstrip('/')}/{name}"
                                            if is_url(location) else str(Path(location) / name))
        part = t.path.parent / f".{name}.part"
        t.path.parent.mkdir(parents=True, exist_ok=True)
        if is_url(src):
            say(f"downloading {src}")
            download(src, part)
        elif not Path(src).is_file():
            raise TeacherError(f"{src} not found (--from holds torchvision's file names)")
        else:
            copy_to(Path(src), part)
        try:
            match = HASH_REGEX.search(name)
            size, digest = check_bytes(part, name, None, None, "")
            if match is None or not digest.startswith(match.group(1)):
                raise TeacherError(f"{name}: SHA-256 {digest} does not start with the hash in "
                                   "its name (torchvision's check); nothing was installed")
            check_loads(part, t.arch, sel.dataset)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, t.path)
        say(f"installed {t.path}")
        rel = str(t.path.relative_to(sel.folder))
        manifest.record(name, {"url": src, "size": size, "sha256": digest,
                               "trust": f"torchvision's hash prefix {match.group(1)}"},
                        {rel: {"sha256": digest, "size": size, "source": name,
                               "installed": now()}})
