"""The Optuna study's database, as the `rld_optuna` sweeper reaches it (and as a run reporting
to its trial does, `rld.pruning`): checks of the storage URL before any work, the URL as
logs may show it, and one retry helper with a bounded back-off for a database server that
goes away for a while.

Credentials never travel in a URL that Hydra saves: Hydra writes every job's overrides and
config (`.hydra/`), and the sweeper passes command-line overrides to each trial as user
attributes, so a password typed into `hparams.storage` would land in files, logs and tables.
The password comes from the driver's own sources instead (`PGPASSWORD`, `~/.pgpass` or
`PGPASSFILE` for PostgreSQL: `postgresql://user@host:port/db`), or the URL is an
interpolation Hydra saves unresolved (`hparams.storage='${oc.env:RLD_STORAGE}'`);
`check_url` refuses a password that appears verbatim in the config.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY = "hparams.storage"  # what the user sets (hydra.sweeper.storage follows it)
# the extra that installs the PostgreSQL drivers: psycopg2, SQLAlchemy 1.4's default for
# postgresql://, and psycopg 3, SQLAlchemy 2.1's
POSTGRES_HINT = "pip install -e \".[postgres]\""
POSTGRES_DRIVERS = ("psycopg2", "psycopg")
SAFE_WAYS = ("leave the password out of the URL (postgresql://user@host:port/db) and give it "
             "through PGPASSWORD or ~/.pgpass, or set the whole URL from the environment: "
             f"{KEY}='${{oc.env:RLD_STORAGE}}'")


class StorageError(ValueError):
    """A storage URL that cannot be used, or a database that cannot be reached: one line."""


class StorageUnavailable(StorageError):
    """The database stayed unreachable for longer than the retry budget."""


def redact(url: str) -> str:
    """`url` with its password (in the user part or the query) shown as ***."""
    from sqlalchemy.engine.url import make_url

    try:
        u = make_url(url)
        if "password" in u.query:
            u = u.update_query_dict({"password": "***"})
        return u.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
    except Exception:  # noqa: BLE001 - only for messages: show nothing rather than a secret
        return "<storage URL>"


def one_line(exc: BaseException) -> str:
    """The first meaningful text of a database error, on one line: the driver's message
    (`connection refused`, `password authentication failed ...`) at the root of the chain
    (under Optuna's "An exception is raised during the commit"), without SQLAlchemy's
    statement, parameters and background link."""
    inner = exc
    seen = {id(inner)}
    while inner.__cause__ is not None and id(inner.__cause__) not in seen:
        inner = inner.__cause__
        seen.add(id(inner))
    inner = getattr(inner, "orig", None) or inner
    text = str(inner).split("\n(Background on this error", 1)[0].split("\n[SQL:", 1)[0]
    text = re.sub(r"\s+", " ", text).strip()
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def _chain(exc: BaseException | None) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def transient(exc: BaseException) -> bool:
    """Whether `exc` says the database is unreachable for now (server down or restarting,
    connection dropped, pool exhausted, sqlite file locked): worth retrying.  Errors in what
    was asked (SQL, constraints, values) are not."""
    from sqlalchemy import exc as sa_exc

    for e in _chain(exc):
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, sa_exc.OperationalError | sa_exc.InterfaceError
                      | sa_exc.DisconnectionError | sa_exc.TimeoutError):
            return True
        # a session whose connection was lost mid-transaction (until it is rolled back)
        if isinstance(e, sa_exc.PendingRollbackError) and "invalid transaction" in str(e):
            return True
    return False


@dataclass(frozen=True)
class Backoff:
    """Retries with a bounded, jittered exponential back-off: pauses of first_s, 2*first_s,
    ... up to max_s, for at most budget_s seconds in all; then StorageUnavailable.  One
    instance serves a whole sweeper (and can serve a run reporting to its trial)."""

    budget_s: float = 300.0
    first_s: float = 1.0
    max_s: float = 30.0

    def pause(self, attempt: int, left_s: float) -> float:
        """The pause before retry `attempt` (0-based): jittered so that many clients do not
        come back at the same instant."""
        pause = min(self.max_s, self.first_s * 2 ** attempt) * random.uniform(0.5, 1.0)
        return max(0.0, min(pause, left_s))

    def start(self, fn: Callable[[], T], what: str, race_s: float = 30.0) -> T:
        """`fn()` at start-up: clients starting together race to create the same tables
        (integrity or "already exists" errors), retried for race_s; a database that does not
        answer, for the whole budget."""
        from sqlalchemy.exc import SQLAlchemyError

        t0 = time.monotonic()

        def race(e: BaseException) -> bool:
            raced = any(isinstance(x, SQLAlchemyError) for x in _chain(e))
            return transient(e) or (raced and time.monotonic() - t0 < race_s)

        return self.call(fn, what, when=race)

    def call(self, fn: Callable[[], T], what: str,
             when: Callable[[BaseException], bool] = transient) -> T:
        """`fn()`, retried while it raises an error for which `when` is true, until the
        budget is spent.  Logs one line per retry and one when it went through again."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                out = fn()
            except Exception as e:
                if not when(e):
                    raise
                spent = time.monotonic() - start
                if spent >= self.budget_s:
                    if not transient(e):
                        raise
                    raise StorageUnavailable(
                        f"the study's database did not answer for {spent:.0f}s while "
                        f"{what} ({one_line(e)}); gave up after {attempt} retries") from None
                pause = self.pause(attempt, self.budget_s - spent)
                log.warning("database error while %s (%s): retry %d in %.1fs (retrying for "
                            "up to %.0fs)", what, one_line(e), attempt + 1, pause,
                            self.budget_s)
                time.sleep(pause)
                attempt += 1
            else:
                if attempt:
                    log.warning("database back: %s went through after %d retries (%.0fs)",
                                what, attempt, time.monotonic() - start)
                return out


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine settings for the study's database (Optuna's, the guard's, ours)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}
    kwargs: dict[str, Any] = {"pool_pre_ping": True}  # stale connections after a restart
    scheme = url.split("://", 1)[0]
    if scheme in ("postgresql", *(f"postgresql+{d}" for d in POSTGRES_DRIVERS)):
        # libpq: an unreachable host fails in seconds, not after the kernel's TCP timeout
        kwargs["connect_args"] = {"connect_timeout": 10}
    return kwargs


def has_password(url: str) -> bool:
    """Whether `url` carries a password (in its user part or its query): such a URL is never
    written where Hydra saves it (a job's overrides)."""
    from sqlalchemy.engine.url import make_url

    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001 - unparseable: treat it as secret
        return True
    return bool(u.password or u.query.get("password"))


def _raw_secrets(url: str) -> list[str]:
    """The password of `url` as written in it: `user:password` and `password=...`."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    out = [userinfo] if ":" in userinfo else []
    out += [p for p in parts.query.split("&") if p.startswith("password=")]
    return out


def literal_password(url: str, saved: Iterable[str]) -> bool:
    """Whether the password of `url` is written verbatim in `saved` (the config and
    overrides as Hydra saves them, unresolved), rather than read from an interpolation."""
    from sqlalchemy.engine.url import make_url

    u = make_url(url)
    passwords = [p for p in (u.password, u.query.get("password")) if p]
    if not passwords:
        return False
    needles = _raw_secrets(url)
    for text in saved:
        text = str(text)
        value = text.partition("=")[2]  # `key=value` overrides
        if any(n in text for n in needles) or text in passwords or value in passwords:
            return True
    return False


def check_url(url: str, saved: Iterable[str] = (), key: str = KEY) -> None:
    """Raise StorageError (one line, naming `key`) for a URL SQLAlchemy cannot parse, whose
    driver is not installed, or whose password is written in `saved`.  Connects to nothing."""
    import sqlalchemy as sa
    from sqlalchemy.engine.url import make_url

    try:
        u = make_url(url)
    except sa.exc.ArgumentError:
        raise StorageError(f"{key}={redact(url)!r} is not a database URL: use "
                           "sqlite:///path/optuna.db or postgresql://user@host:port/db, or "
                           "null for <sweep dir>/optuna.db") from None
    if literal_password(url, saved):
        raise StorageError(f"{key}: the password of {redact(url)} is written in the config or "
                           f"on the command line, where Hydra saves it; {SAFE_WAYS}")
    try:
        sa.create_engine(u).dispose()  # loads the dialect and imports its driver
    except sa.exc.NoSuchModuleError:
        raise StorageError(f"{key}={redact(url)}: no SQLAlchemy dialect "
                           f"'{u.drivername}' (postgresql://, sqlite:///, mysql://, ...)"
                           ) from None
    except ImportError as e:
        hint = POSTGRES_HINT if e.name in POSTGRES_DRIVERS else f"pip install {e.name}"
        raise StorageError(f"{key}={redact(url)}: its driver ({e.name}) is not installed: "
                           f"{hint}") from None


def check_connection(url: str, key: str = KEY) -> None:
    """Connect once and ask the server for nothing: a one-line StorageError for a host that
    does not answer or refuses the credentials, before any work starts."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, **engine_kwargs(url))
    try:
        with engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
    except sa.exc.DBAPIError as e:
        text = one_line(e)
        hint = ""
        if "password" in text and "postgresql" in url:
            hint = f"; {SAFE_WAYS}"
        raise StorageError(f"{key}: cannot use the database {redact(url)}: {text}{hint}"
                           ) from None
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    """`python -m rld.storage URL`: check a storage URL as the sweeper does (a password typed
    in it counts as written down): `make dashboard STORAGE=...`; nothing or one line, exit 0
    or 2."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rld.storage URL", file=sys.stderr)
        return 2
    try:
        check_url(args[0], args, key="STORAGE")
        check_connection(args[0], key="STORAGE")
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
