"""The study's storage URL (`rld.storage`): checked before any run, shown redacted, its
password never taken from where Hydra saves it; and the retry helper that carries sweepers
through a database outage.  The server-side cases (restart, credentials in tables) are in
tests/db (`make db-test`)."""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa
from cli_helpers import run_train

from rld.storage import (
    Backoff,
    StorageError,
    StorageUnavailable,
    check_url,
    literal_password,
    one_line,
    redact,
    transient,
)

TINY = ["dataset=synthetic", "pair=tiny", "trainer.epochs=1", "dataset.train_size=64",
        "dataset.test_size=64", "trainer.batch_size=32", "trainer.progress=none"]


def free_port() -> int:
    """A loopback port nothing listens on, below the kernel's ephemeral range: a connection
    to a closed ephemeral port can draw that port as its own and connect to itself."""
    for port in range(20000, 32768):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def refused() -> sa.exc.OperationalError:
    """The error psycopg2 gives through SQLAlchemy when no server listens."""
    return sa.exc.OperationalError("SELECT 1", {}, Exception(
        'connection to server at "127.0.0.1", port 1 failed: Connection refused\n\tIs the '
        "server running on that host and accepting TCP/IP connections?\n"))


# ------------------------------------------------------------------------ the URL
def test_redact_hides_the_password_wherever_the_url_holds_it():
    assert redact("postgresql://rld:s3cr%40t@db:5432/rld") == "postgresql://rld:***@db:5432/rld"
    shown = redact("postgresql://rld@db/rld?password=s3cret&sslmode=require")
    assert "s3cret" not in shown and "password=***" in shown and "sslmode=require" in shown
    assert redact("sqlite:////tmp/o.db") == "sqlite:////tmp/o.db"


def test_a_password_is_literal_only_where_hydra_saves_it_verbatim():
    url = "postgresql://rld:s3cr%40t@db/rld"
    assert literal_password(url, ["hparams.storage=postgresql://rld:s3cr%40t@db/rld"])
    assert literal_password(url, ["${db.user}", "s3cr@t"])  # a config leaf holding it alone
    assert literal_password(url, ["db.password=s3cr@t"])  # an override holding it alone
    # read from the environment: Hydra saves the interpolation, not its value
    assert not literal_password(url, ["hparams.storage=${oc.env:RLD_STORAGE}"])
    assert not literal_password("postgresql://rld:${oc.env:PW}@db/rld".replace(
        "${oc.env:PW}", "s3cret"), ["postgresql://rld:${oc.env:PW}@db/rld"])
    assert literal_password("postgresql://rld@db/rld?password=x1", ["a?password=x1"])
    assert not literal_password("postgresql://rld@db/rld", ["postgresql://rld@db/rld"])


def test_check_url_names_the_problem_in_one_line():
    with pytest.raises(StorageError, match="is not a database URL"):
        check_url("not a url")
    with pytest.raises(StorageError, match=r"no SQLAlchemy dialect 'postgres'"):
        check_url("postgres://rld@db/rld")
    with pytest.raises(StorageError, match=r"driver \(pg8000\) is not installed") as e:
        check_url("postgresql+pg8000://rld:pw@db/rld")
    assert "pw" not in str(e.value).replace("pg8000", "") and "\n" not in str(e.value)
    with pytest.raises(StorageError, match="PGPASSWORD") as e:
        check_url("postgresql://rld:hunter2@db/rld", ["postgresql://rld:hunter2@db/rld"])
    assert "hunter2" not in str(e.value)
    check_url("postgresql://rld@db/rld")  # psycopg2 (the postgres extra) is installed


# ------------------------------------------------------------------------ retries
def test_transient_errors_are_those_of_an_unreachable_database():
    import optuna

    assert transient(refused())
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = refused()
    assert transient(wrapped)  # what Optuna's RDBStorage raises on a failed commit
    assert not transient(sa.exc.IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not transient(ValueError("bad value"))
    assert one_line(refused()) == ('Exception: connection to server at "127.0.0.1", port 1 '
                                   "failed: Connection refused Is the server running on that "
                                   "host and accepting TCP/IP connections?")


def test_backoff_retries_within_its_budget_and_says_so(caplog):
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise refused()
        return "done"

    backoff = Backoff(budget_s=5.0, first_s=0.05, max_s=0.2)
    with caplog.at_level(logging.WARNING, logger="rld.storage"):
        assert backoff.call(flaky, "telling trial 3") == "done"
    assert len(calls) == 3
    assert caplog.text.count("retry ") == 2 and "database back: telling trial 3" in caplog.text
    pauses = [b - a for a, b in zip(calls, calls[1:])]
    assert 0.025 <= pauses[0] <= 0.2 and 0.05 <= pauses[1] <= 0.3  # doubling, jittered

    def down():
        calls.append(time.monotonic())
        raise refused()

    calls.clear()
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"did not answer for .* while telling"):
        Backoff(budget_s=0.6, first_s=0.05, max_s=0.1).call(down, "telling trial 3")
    assert 0.6 <= time.monotonic() - t0 < 2.0 and 5 <= len(calls) <= 20

    def wrong():
        calls.append(1)
        raise sa.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))

    calls.clear()
    with pytest.raises(sa.exc.IntegrityError):
        backoff.call(wrong, "claiming a point")
    assert calls == [1]  # not a transient error: no retry


def test_start_up_retries_races_but_not_other_errors():
    """Sweepers starting together race to create tables (integrity errors): retried for a
    while; anything else (an incompatible schema) is raised at once."""
    calls = []

    def racing():
        calls.append(1)
        if len(calls) < 3:
            raise sa.exc.IntegrityError("CREATE TABLE", {}, Exception("already exists"))
        return "tables"

    backoff = Backoff(budget_s=5.0, first_s=0.01, max_s=0.02)
    assert backoff.start(racing, "creating tables") == "tables" and len(calls) == 3

    def schema():
        calls.append(1)
        raise RuntimeError("no longer compatible with the table schema")

    calls.clear()
    with pytest.raises(RuntimeError):
        backoff.start(schema, "opening the storage")
    assert calls == [1]

    def endless():
        calls.append(time.monotonic())
        raise sa.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))

    calls.clear()
    with pytest.raises(sa.exc.IntegrityError):  # a "race" that never ends: not after race_s
        backoff.start(endless, "creating tables", race_s=0.1)
    assert 2 <= len(calls) and calls[-1] - calls[0] < 1.0


def test_backoff_waits_out_a_locked_sqlite_database(tmp_path):
    """A real transient error: another connection holds the write lock for a while."""
    path = tmp_path / "o.db"
    url = f"sqlite:///{path}"
    engine = sa.create_engine(url, connect_args={"timeout": 0.05})
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.0, lambda: holder.execute("COMMIT")).start()

    def write():
        with engine.begin() as c:
            c.execute(sa.text("INSERT INTO t VALUES (1)"))

    t0 = time.monotonic()
    Backoff(budget_s=20, first_s=0.1, max_s=0.4).call(write, "writing")
    assert 0.9 <= time.monotonic() - t0 < 10
    with engine.begin() as c:
        assert c.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
    holder.close()


# ------------------------------------------------------------------------ through the CLI
def storage_error(tmp_path, url: str, env: dict | None = None) -> str:
    """Run a 1-point grid with `hparams.storage=url`: it must stop before any run with one
    line on stderr; that line (everything it printed, with `all=True`)."""
    teacher = tmp_path / "teacher.pth"  # present: the multirun's teacher pre-flight passes
    teacher.touch()
    proc = run_train(tmp_path, "-m", *TINY, "hparams=grid", "hparams.beta=[2]",
                     "hparams.tau=[4]", "tag=bad", f"hparams.storage={url}",
                     f"teacher.checkpoint={teacher}", check=False, timeout=120, env=env)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert sum("hparams.storage" in line for line in lines) == 1, proc.stderr
    assert not (tmp_path / "sweeps" / "bad" / "synthetic").exists()  # no run started
    storage_error.printed = proc.stdout + proc.stderr
    return lines[-1]


def test_missing_driver_stops_the_sweep_in_one_line(tmp_path):
    line = storage_error(tmp_path, "postgresql+pg8000://rld@127.0.0.1:5432/rld")
    assert "driver (pg8000) is not installed: pip install pg8000" in line


def test_unreachable_server_stops_the_sweep_in_one_line(tmp_path):
    port = free_port()
    line = storage_error(tmp_path, f"postgresql://rld@127.0.0.1:{port}/rld")
    assert f"cannot use the database postgresql://rld@127.0.0.1:{port}/rld" in line
    assert "Connection refused" in line


def test_password_written_in_the_url_is_refused(tmp_path):
    secret = "Literal-s3cret"
    proc_line = storage_error(tmp_path, f"postgresql://rld:{secret}@127.0.0.1:{free_port()}/rld")
    assert "PGPASSWORD" in proc_line and "~/.pgpass" in proc_line
    assert secret not in storage_error.printed
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret in p.read_text(
        errors="replace")]
    assert leaked == []  # refused before Hydra wrote anything that holds it
