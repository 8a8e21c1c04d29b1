"""Database tests: studies shared by several sweepers, on a real PostgreSQL server (`make
db-test` starts one on 127.0.0.1 with scripts/db/up.sh, runs these and stops it) and, for
the cases that apply to one machine, on sqlite.  Without a server the PostgreSQL cases skip,
with the reason printed; in CI (CI=true) that skip is a failure."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import REPO

HERE = Path(__file__).resolve().parent
STATE_ENV = "RLD_DB_STATE"  # what scripts/db/up.sh exports


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.db)


@dataclass(frozen=True)
class Server:
    """The server scripts/db/up.sh started in `state`: role `rld` (password login over TCP)
    and the superuser `postgres` (through the socket only)."""

    state: Path

    @property
    def port(self) -> int:
        return int((self.state / "port").read_text())

    @property
    def password(self) -> str:
        return (self.state / "password").read_text().strip()

    def url(self, database: str, password: bool = False) -> str:
        """The URL of `database` for role rld; with `password` (the tests' own reads only)."""
        secret = f":{self.password}" if password else ""
        return f"postgresql://rld{secret}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` as the superuser through psql; its output."""
        return self._tool("psql", "-v", "ON_ERROR_STOP=1", "-tAq", "-d", database, "-c", sql)

    def dump(self, database: str) -> str:
        """Every table of `database`, schema and rows (pg_dump)."""
        return self._tool("pg_dump", "-d", database)

    def _tool(self, name: str, *args: str) -> str:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()])
        exe = os.environ.get("RLD_PG_BIN", str(bins[-1])) + f"/{name}"
        out = subprocess.run([exe, "-h", str(self.state / "socket"), "-p", str(self.port),
                              "-U", "postgres", *args], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def create_database(self, name: str) -> None:
        self.admin(f'CREATE DATABASE "{name}" OWNER rld')

    def stop(self) -> None:
        """scripts/db/down.sh: a fast shutdown, by the server's process id."""
        self._script("down.sh")

    def start(self) -> None:
        """scripts/db/up.sh on the same state: the same data, the same port."""
        self._script("up.sh")

    def _script(self, name: str) -> None:
        out = subprocess.run(["bash", str(REPO / "scripts" / "db" / name), str(self.state)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


def _problem(state: str | None) -> str | None:
    if not state:
        return f"{STATE_ENV} is not set: run `make db-test` (starts a local PostgreSQL)"
    if not (Path(state) / "postgres.pid.started").exists():
        return f"no server started in {state} (scripts/db/up.sh)"
    try:
        Server(Path(state)).admin("SELECT 1")
    except (AssertionError, OSError, subprocess.SubprocessError) as e:
        return f"the server in {state} does not answer: {e}"
    return None


@pytest.fixture(scope="session")
def pg() -> Server:
    state = os.environ.get(STATE_ENV)
    problem = _problem(state)
    if problem is None:
        return Server(Path(state))
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true and the database tests cannot run: {problem}", pytrace=False)
    print(f"\nskipping PostgreSQL tests: {problem}")
    pytest.skip(problem)
