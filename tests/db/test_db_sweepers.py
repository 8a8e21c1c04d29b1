"""Several `rld_optuna` sweepers on one study, through the real CLI, under faults: on a real
PostgreSQL server (scripts/db/up.sh) and, where it applies to one machine, on sqlite.

Each test counts what matters: trials per state in the study (read with Optuna's API from the
same database), completed run directories, grid points with two completed trials (none), the
guard's leftover claims and sweeper rows (none), and what the logs say."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import REPO, run_train, train_command, train_env

TINY = ["dataset=synthetic", "pair=tiny", "trainer.epochs=1", "dataset.train_size=64",
        "dataset.test_size=64", "trainer.batch_size=32", "trainer.progress=none"]
# runs long enough (a few seconds) to be caught in the middle
LONGER = ["trainer.epochs=2", "dataset.train_size=384"]
RETRY_LINE = "database error while"  # rld.storage.Backoff, one per retry
BACK_LINE = "database back:"


def grid(betas: list, taus: list) -> list[str]:
    return ["hparams=grid", f"hparams.beta=[{','.join(map(str, betas))}]",
            f"hparams.tau=[{','.join(map(str, taus))}]"]


def points(betas: list, taus: list) -> set[tuple[float, float]]:
    return {(float(b), float(t)) for b in betas for t in taus}


@dataclass
class Study:
    """Where one test's study lives: a sqlite file beside the runs (the default) or a fresh
    database on the server."""

    root: Path
    tag: str
    url: str | None  # hparams.storage; None: <sweep dir>/optuna.db
    read_url: str  # the test's own reads (may hold the password)
    env: dict = field(default_factory=dict)

    @property
    def sweep(self) -> Path:
        return self.root / "sweeps" / self.tag

    @property
    def overrides(self) -> list[str]:
        return [f"tag={self.tag}"] + ([f"hparams.storage={self.url}"] if self.url else [])

    def trials(self) -> list:
        import optuna

        summaries = optuna.get_all_study_summaries(self.read_url)
        assert len(summaries) == 1, [s.study_name for s in summaries]
        study = optuna.load_study(study_name=summaries[0].study_name, storage=self.read_url)
        return study.get_trials(deepcopy=False)

    def trials_or_none(self) -> list:
        try:
            return self.trials()
        except Exception:  # noqa: BLE001 - no study (or no tables) yet
            return []

    def guard_rows(self) -> tuple[list, list]:
        """(claims, sweeper rows) left in the guard's tables."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.read_url)
        try:
            with engine.connect() as c:
                return ([tuple(r) for r in c.execute(sa.text("SELECT * FROM rld_grid_claims"))],
                        [tuple(r) for r in c.execute(sa.text("SELECT * FROM rld_sweepers"))])
        finally:
            engine.dispose()


def new_study(kind: str, root: Path, pg=None) -> Study:
    tag = f"t{uuid.uuid4().hex[:10]}"
    if kind == "sqlite":
        return Study(root, tag, None, f"sqlite:///{root}/sweeps/{tag}/optuna.db")
    pg.create_database(tag)
    return Study(root, tag, pg.url(tag), pg.url(tag, password=True),
                 {"PGPASSWORD": pg.password})


@pytest.fixture(params=["sqlite", "postgresql"])
def study(request, teacher_root) -> Study:
    pg = request.getfixturevalue("pg") if request.param == "postgresql" else None
    return new_study(request.param, teacher_root, pg)


@pytest.fixture
def pg_study(pg, teacher_root) -> Study:
    return new_study("postgresql", teacher_root, pg)


class Sweepers:
    """Sweeper processes of one test, each with its log file; killed at teardown if left."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[tuple[subprocess.Popen, Path, Path]] = []

    def start(self, study: Study, *args: str) -> int:
        i = len(self.procs)
        out, err = self.logs / f"sweeper{i}.out", self.logs / f"sweeper{i}.err"
        cmd = train_command(study.root, "-m", *TINY, *study.overrides, *args)
        with open(out, "w") as o, open(err, "w") as e:
            # PYTHONFAULTHANDLER: a sweeper that hangs dumps its threads on SIGABRT (`wait`)
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=o, stderr=e, text=True,
                                    env=train_env({**study.env, "PYTHONFAULTHANDLER": "1"}))
        self.procs.append((proc, out, err))
        return i

    def text(self, i: int) -> str:
        return self.since(i, (0, 0))

    def mark(self, i: int) -> tuple[int, int]:
        """Where sweeper i's logs end now: (bytes of stdout, bytes of stderr)."""
        _, out, err = self.procs[i]
        return out.stat().st_size, err.stat().st_size

    def since(self, i: int, mark: tuple[int, int]) -> str:
        """What sweeper i has logged past `mark`, stdout then stderr.  Each stream from its
        own offset: both grow, so an offset into their concatenation would point into the
        stderr written before the mark once stdout grows (next stack: its warnings)."""
        _, out, err = self.procs[i]
        return "".join(path.read_bytes()[at:].decode(errors="replace")
                       for path, at in ((out, mark[0]), (err, mark[1])))

    def wait(self, i: int, timeout: float = 600) -> int:
        proc = self.procs[i][0]
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # its threads' stacks go to its stderr
            proc.wait(timeout=60)
            raise AssertionError(f"sweeper {i} still running after {timeout:.0f}s:\n"
                                 f"{self.text(i)[-6000:]}") from None

    def finish(self, timeout: float = 600) -> None:
        for i in range(len(self.procs)):
            rc = self.wait(i, timeout)
            assert rc == 0, f"sweeper {i} exited {rc}:\n{self.text(i)[-4000:]}"

    def alive(self, i: int) -> bool:
        return self.procs[i][0].poll() is None

    def kill_all(self) -> None:
        for proc, _, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)


@pytest.fixture
def sweepers(tmp_path):
    s = Sweepers(tmp_path)
    yield s
    s.kill_all()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def running(study: Study) -> list:
    import optuna

    return [t for t in study.trials_or_none() if t.state == optuna.trial.TrialState.RUNNING]


def training(sweep: Path) -> bool:
    """Whether a run of the sweep has started (its record says running)."""
    for path in (sweep / "synthetic").rglob("metrics.json"):
        try:
            if json.loads(path.read_text())["status"] == "running":
                return True
        except (ValueError, KeyError):  # being written
            continue
    return False


def completed_records(sweep: Path) -> dict[str, dict]:
    """{run dir: record} of the sweep's completed runs."""
    out = {}
    for path in (sweep / "synthetic").rglob("metrics.json"):
        record = json.loads(path.read_text())
        if record["status"] == "completed":
            out[str(path.parent.resolve())] = record
    return out


def check_study(study: Study, expected: int, grid_points: set | None = None,
                interrupted: int = 0) -> list:
    """The study holds exactly `expected` completed trials (one per grid point: none twice)
    and `interrupted` failed ones, nothing else; the completed trials and the completed run
    directories agree (same runs, same values); no claim or sweeper row is left."""
    import optuna

    trials = study.trials()
    states = Counter(t.state.name for t in trials)
    assert states == Counter({"COMPLETE": expected, "FAIL": interrupted}) - Counter(), \
        [(t.number, t.state.name, t.params, t.user_attrs.get("rld_state")) for t in trials]
    failed = [t.user_attrs.get("rld_state") for t in trials
              if t.state == optuna.trial.TrialState.FAIL]
    assert failed == ["interrupted"] * interrupted
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if grid_points is not None:
        done = Counter((t.params["distiller.beta"], t.params["distiller.tau"]) for t in complete)
        assert set(done) == grid_points and max(done.values()) == 1, done
    records = completed_records(study.sweep)
    assert len(records) == expected
    dirs = {str(Path(t.user_attrs["rld_run_dir"]).resolve()): t.value for t in complete}
    assert set(dirs) == set(records)
    assert all(dirs[d] == records[d]["top1_best"] for d in dirs)
    assert study.guard_rows() == ([], [])
    return trials


# ------------------------------------------------------------------------ concurrency
def test_three_sweepers_run_each_grid_point_once(study, sweepers):
    """Three sweepers started together on one 3x2 grid study: 6 completed trials, one per
    point, 6 completed runs, the same runs in the study and on disk."""
    betas, taus = [2, 4, 8], [2, 3]
    t0 = time.time()
    for _ in range(3):
        sweepers.start(study, *grid(betas, taus))
    sweepers.finish()
    trials = check_study(study, 6, points(betas, taus))
    owners = Counter(t.user_attrs["rld_owner"] for t in trials)
    print(f"3 sweepers, 3x2 grid on {study.read_url.split(':')[0]}: {time.time() - t0:.1f}s, "
          f"points per sweeper {sorted(owners.values())}")


def test_two_tpe_sweepers_keep_the_budget(study, sweepers):
    """Two TPE sweepers (2 trials a batch) on one study with n_trials=5: 5 trials in all."""
    for _ in range(2):
        sweepers.start(study, "hparams=tpe", "hparams.n_trials=5", "hparams.n_jobs=2")
    sweepers.finish()
    trials = check_study(study, 5)
    owners = Counter(t.user_attrs["rld_owner"] for t in trials)
    points_ = {(t.params["distiller.beta"], t.params["distiller.tau"]) for t in trials}
    assert len(points_) == 5  # the two sweepers drew their own points (seeds of their own)
    print(f"2 TPE sweepers, n_trials=5: trials per sweeper {sorted(owners.values())}")


def test_killed_sweeper_releases_its_claims_and_the_rerun_finishes(study, sweepers):
    """SIGKILL mid-sweep (a trial running, its point claimed); the same command again fails
    that trial as interrupted, takes the point back and finishes: every point once."""
    import optuna

    betas, taus = [2, 4, 8], [4]
    sweepers.start(study, *grid(betas, taus), *LONGER)

    def mid_sweep() -> bool:
        trials = study.trials_or_none()
        return (any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
                and any(t.state == optuna.trial.TrialState.RUNNING for t in trials))

    wait_for(mid_sweep, 300, "a completed and a running trial")
    os.kill(sweepers.procs[0][0].pid, signal.SIGKILL)
    sweepers.wait(0, 60)
    (victim,) = running(study)  # killed mid-trial: its trial stays running...
    claims, rows = study.guard_rows()
    assert [c[2] for c in claims] == [victim.user_attrs["rld_owner"]]  # ...its point claimed
    assert [r[0] for r in rows] == [victim.user_attrs["rld_owner"]]

    proc = run_train(study.root, "-m", *TINY, *study.overrides, *grid(betas, taus), *LONGER,
                     env=study.env, timeout=600)
    assert "stopped without cleaning up" in proc.stdout  # the reaper's line
    trials = check_study(study, 3, points(betas, taus), interrupted=1)
    (failed,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed.number == victim.number
    print(f"SIGKILL mid-trial, rerun: {Counter(t.state.name for t in trials)}")


# ------------------------------------------------------------------------ server faults
def logged_since(sweepers: Sweepers, marks: list[tuple[int, int]], line: str,
                 which: list[int]) -> bool:
    """Whether each sweeper of `which` has logged `line` past its logs' ends `marks[i]`."""
    return all(line in sweepers.since(i, marks[i]) for i in which)


def restart_mid_trial(pg, study: Study, sweepers: Sweepers) -> tuple[int, float]:
    """Stop the server while a trial runs, until every live sweeper has hit the outage;
    start it again and wait until they say it is back.  (sweepers that hit it, seconds down)"""
    wait_for(lambda: running(study), 300, "a running trial")
    n = len(sweepers.procs)
    marks = [sweepers.mark(i) for i in range(n)]
    pg.stop()
    t0 = time.monotonic()
    wait_for(lambda: logged_since(sweepers, marks, RETRY_LINE,
                                  [i for i in range(n) if sweepers.alive(i)]),
             300, "every live sweeper to hit the outage")
    hit = [i for i in range(n) if RETRY_LINE in sweepers.since(i, marks[i])]
    pg.start()
    down_s = time.monotonic() - t0
    wait_for(lambda: logged_since(sweepers, marks, BACK_LINE, hit), 300,
             "the sweepers to say the database is back")
    return len(hit), round(down_s, 1)


def test_server_restarts_mid_sweep_cost_a_pause_not_the_sweep(pg, pg_study, sweepers):
    """Two sweepers on a 4x2 grid; the server is stopped twice while trials run (each time
    until every live sweeper has hit the outage), then started again: they retry, say so,
    and finish: 8 points, each once, nothing failed."""
    betas, taus = [2, 4, 8, 16], [2, 4]
    for _ in range(2):
        sweepers.start(pg_study, *grid(betas, taus), *LONGER, "hydra.sweeper.heartbeat_s=1")
    # past their start (a server unreachable at start is a one-line error, by design)
    wait_for(lambda: all("grid of " in sweepers.text(i) for i in range(2)), 300,
             "both sweepers to open the study")
    survived = [restart_mid_trial(pg, pg_study, sweepers) for _ in range(2)]
    sweepers.finish()
    check_study(pg_study, 8, points(betas, taus))
    assert all(hit >= 1 for hit, _ in survived), survived
    for i in range(2):
        assert "sweeper heartbeat failed" in sweepers.text(i)
    print(f"server restarts survived (sweepers that hit each, seconds down): {survived}")


def test_server_gone_for_good_ends_the_sweeper_in_one_line(pg, pg_study, sweepers):
    """The server stops mid-trial and stays down: the run finishes training, the sweeper
    retries for storage_retry_s and stops with one line; the same command, once the server
    is back, records that run (recalled, not trained again) and finishes the grid."""
    betas, taus = [2, 4], [4]
    args = [*grid(betas, taus), *LONGER, "hparams.storage_retry_s=5"]
    sweepers.start(pg_study, *args)
    wait_for(lambda: training(pg_study.sweep), 300, "a run to start training")
    pg.stop()
    try:
        rc = sweepers.wait(0, 300)
        _, out, err = sweepers.procs[0]
        stderr = err.read_text()
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert rc == 1, sweepers.text(0)[-3000:]
        assert "Traceback" not in stderr and sum("hparams.storage" in x for x in lines) == 1
        assert lines[-1].startswith(f"rld.train: error: hparams.storage={pg_study.url}: the study's "
                                    "database did not answer for "), stderr
        assert "run the same command again when the database is back" in lines[-1]
        assert RETRY_LINE in out.read_text()
        (run_dir, record), = completed_records(pg_study.sweep).items()  # it kept training
        before = (Path(run_dir) / "metrics.json").stat().st_mtime_ns
    finally:
        pg.start()
    proc = run_train(pg_study.root, "-m", *TINY, *pg_study.overrides, *args, env=pg_study.env,
                     timeout=600)
    assert "run already finished (completed)" in proc.stdout
    check_study(pg_study, 2, points(betas, taus), interrupted=1)
    assert (Path(run_dir) / "metrics.json").stat().st_mtime_ns == before  # not trained again


# ------------------------------------------------------------------------ credentials
def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()
            and secret.encode() in p.read_bytes()]


def test_credentials_stay_out_of_logs_files_and_tables(pg, teacher_root):
    """The password reaches the sweeper through PGPASSWORD, or inside a URL read from the
    environment with ${oc.env:...}: it is in no output, no file of the sweep (.hydra/,
    records, logs, results) and no table of the database; the URL is shown redacted."""
    secret = pg.password
    by_env = new_study("postgresql", teacher_root, pg)
    proc = run_train(teacher_root, "-m", *TINY, *by_env.overrides, *grid([2], [4]),
                     env=by_env.env)
    check_study(by_env, 1)
    assert f"in {by_env.url} (" in proc.stdout  # the study's log line: no password to hide

    in_url = new_study("postgresql", teacher_root, pg)
    in_url.url, in_url.env = "${oc.env:RLD_TEST_STORAGE}", {"RLD_TEST_STORAGE": in_url.read_url}
    proc2 = run_train(teacher_root, "-m", *TINY, *in_url.overrides, *grid([2], [4]),
                      env=in_url.env)
    check_study(in_url, 1)
    assert f"in postgresql://rld:***@127.0.0.1:{pg.port}/{in_url.tag} (" in proc2.stdout
    (overrides,) = in_url.sweep.rglob(".hydra/overrides.yaml")
    assert "RLD_TEST_STORAGE" in overrides.read_text()  # saved unresolved (escaped)

    for s, p in ((by_env, proc), (in_url, proc2)):
        assert secret not in p.stdout + p.stderr
        assert files_holding(s.sweep, secret) == []
        dump = pg.dump(s.tag)
        assert "rld_grid_claims" in dump and "trial_user_attributes" in dump
        assert secret not in dump


@pytest.mark.parametrize("password, expected", [
    ("not-the-password", "password authentication failed for user \"rld\""),
    (None, "no password supplied"),
])
def test_bad_credentials_stop_the_sweep_in_one_line(pg, teacher_root, password, expected):
    s = new_study("postgresql", teacher_root, pg)
    env = {"PGPASSFILE": str(teacher_root / "no-pgpass")}
    if password is not None:
        env["PGPASSWORD"] = password
    proc = run_train(teacher_root, "-m", *TINY, *s.overrides, *grid([2], [4]), env=env,
                     check=False, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith(f"rld.train: error: hparams.storage: cannot use the database {s.url}: ")
    assert expected in lines[-1] and "PGPASSWORD" in lines[-1]
    assert not (s.sweep / "synthetic").exists()  # no run started
    assert pg.password not in proc.stdout + proc.stderr


def test_dashboard_serves_a_shared_study(pg, pg_study):
    """What `make dashboard STORAGE=postgresql://...` serves: the study the sweepers wrote."""
    import optuna_dashboard
    from test_dashboard import get

    run_train(pg_study.root, "-m", *TINY, *pg_study.overrides, *grid([2, 4], [4]),
              env=pg_study.env)
    trials = check_study(pg_study, 2, points([2, 4], [4]))
    app = optuna_dashboard.wsgi(pg_study.read_url)
    (summary,) = get(app, "/api/studies")["study_summaries"]
    detail = get(app, f"/api/studies/{summary['study_id']}")
    seen = sorted(trial["values"][0] for trial in detail["trials"])
    assert seen == sorted(t.value for t in trials)
