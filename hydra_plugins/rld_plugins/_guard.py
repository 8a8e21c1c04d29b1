"""Claims and heartbeats of the `rld_optuna` sweeper, in tables next to Optuna's own.

* table `rld_sweepers`: one row per live sweeper process with a heartbeat;
* table `rld_grid_claims`: one row per grid point being run, keyed (study, point).  Inserting
  the row is the claim; the database's unique key makes it atomic, so two sweepers can never
  hold the same point.

A sweeper whose heartbeat is older than `stale_after_s` (or whose process is gone, on this
host) is dead: `reap` drops its rows and claims, and `alive` says so to the sweeper, which then
fails that sweeper's running trials.  A claim on a key that is no grid point is a mutex between
sweepers (`hold`: the TPE budget is counted and spent under one).  Only SQLAlchemy is used
here, so any URL Optuna takes works.  The heartbeat thread keeps trying through a database
outage (one log line when it fails, one when it is back); the sweeper retries its own calls
(`rld.storage.Backoff`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from rld.storage import Backoff, engine_kwargs, one_line

log = logging.getLogger(__name__)

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Guard:
    """Sweeper liveness and grid-point claims in tables next to Optuna's."""

    def __init__(self, url: str, study_name: str, heartbeat_s: float, stale_after_s: float,
                 backoff: Backoff | None = None):
        import sqlalchemy as sa

        self.sa = sa
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.study = study_name
        self.heartbeat_s = float(heartbeat_s)
        self.stale_after_s = float(stale_after_s)
        self.engine = sa.create_engine(url, **engine_kwargs(url))
        meta = sa.MetaData()
        self.workers = sa.Table(
            "rld_sweepers", meta,
            sa.Column("owner", sa.String(128), primary_key=True),
            sa.Column("host", sa.String(255), nullable=False),
            sa.Column("pid", sa.Integer, nullable=False),
            sa.Column("heartbeat", sa.Float, nullable=False))
        self.claims = sa.Table(
            "rld_grid_claims", meta,
            sa.Column("study", sa.String(255), primary_key=True),
            sa.Column("point", sa.String(255), primary_key=True),
            sa.Column("owner", sa.String(128), nullable=False),
            sa.Column("since", sa.Float, nullable=False))
        (backoff or Backoff()).start(lambda: meta.create_all(self.engine),
                                     "creating the sweeper tables")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- liveness ------------------------------------------------------------------------
    def start(self) -> None:
        """Register this sweeper and start its heartbeat; safe to repeat."""
        try:
            with self.engine.begin() as c:
                c.execute(self.workers.insert().values(owner=self.owner, host=self.host,
                                                       pid=self.pid, heartbeat=time.time()))
        except self.sa.exc.IntegrityError:
            pass  # a repeat after a registration whose answer was lost
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="rld-sweeper-heartbeat",
                                            daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        failing_since: float | None = None
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat_once()
            except Exception as e:  # noqa: BLE001 - keep beating through database outages
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("sweeper heartbeat failed (%s); trying again every %.0fs",
                                one_line(e), self.heartbeat_s)
            else:
                if failing_since is not None:
                    log.warning("sweeper heartbeat back after %.0fs",
                                time.monotonic() - failing_since)
                    failing_since = None

    def _beat_once(self) -> None:
        with self.engine.begin() as c:
            n = c.execute(self.workers.update()
                          .where(self.workers.c.owner == self.owner)
                          .values(heartbeat=time.time())).rowcount
            if n == 0:  # another sweeper took us for dead: come back
                log.warning("this sweeper was taken for dead (no heartbeat for %.0fs); its "
                            "grid points may be run twice", self.stale_after_s)
                c.execute(self.workers.insert().values(
                    owner=self.owner, host=self.host, pid=self.pid, heartbeat=time.time()))

    def stop(self) -> None:
        """Stop the heartbeat (the rows stay until `leave`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def leave(self) -> None:
        """Drop this sweeper's claims and its row: the last write of a sweeper that ends."""
        with self.engine.begin() as c:
            c.execute(self.claims.delete().where(self.claims.c.owner == self.owner))
            c.execute(self.workers.delete().where(self.workers.c.owner == self.owner))

    def close(self) -> None:
        self.engine.dispose()

    def _dead(self, row: Any, now: float) -> bool:
        return now - row.heartbeat > self.stale_after_s or (
            row.host == self.host and not pid_alive(row.pid))

    def reap(self) -> None:
        """Drop the rows and claims of sweepers that died without cleaning up."""
        now = time.time()
        with self.engine.begin() as c:
            rows = c.execute(self.sa.select(self.workers)).fetchall()
        dead = [r.owner for r in rows if r.owner != self.owner and self._dead(r, now)]
        if dead:
            log.warning("sweeper(s) %s stopped without cleaning up: releasing their points",
                        ", ".join(dead))
            with self.engine.begin() as c:
                c.execute(self.claims.delete().where(self.claims.c.owner.in_(dead)))
                c.execute(self.workers.delete().where(self.workers.c.owner.in_(dead)))

    def alive(self, owner: str) -> bool:
        """Whether `owner` is a live sweeper, read fresh from the database.  A sweeper
        registers before it claims a point or starts a trial, so no row means gone."""
        if owner == self.owner:
            return True
        with self.engine.begin() as c:
            row = c.execute(self.sa.select(self.workers).where(
                self.workers.c.owner == owner)).first()
        return row is not None and not self._dead(row, time.time())

    def others(self) -> int:
        """Live sweepers other than this one on this database (any study)."""
        now = time.time()
        with self.engine.begin() as c:
            rows = c.execute(self.sa.select(self.workers)).fetchall()
        return sum(r.owner != self.owner and not self._dead(r, now) for r in rows)

    # -- claims --------------------------------------------------------------------------
    def _insert(self, point: str) -> bool:
        try:
            with self.engine.begin() as c:
                c.execute(self.claims.insert().values(study=self.study, point=point,
                                                      owner=self.owner, since=time.time()))
            return True
        except self.sa.exc.IntegrityError:
            return False

    def claim(self, point: str) -> bool:
        """Take `point` for this sweeper; False when a live sweeper holds it."""
        if self._insert(point):
            return True
        with self.engine.begin() as c:
            row = c.execute(self.sa.select(self.claims.c.owner).where(
                (self.claims.c.study == self.study) & (self.claims.c.point == point))).first()
        if row is not None:
            if row.owner == self.owner:  # a repeat after a claim whose answer was lost
                return True
            if self.alive(row.owner):
                return False
            with self.engine.begin() as c:  # left behind by a dead sweeper
                c.execute(self.claims.delete().where(
                    (self.claims.c.study == self.study) & (self.claims.c.point == point)
                    & (self.claims.c.owner == row.owner)))
        return self._insert(point)

    def release(self, points: Iterable[str]) -> None:
        points = list(points)
        if not points:
            return
        with self.engine.begin() as c:
            c.execute(self.claims.delete().where(
                (self.claims.c.study == self.study) & self.claims.c.point.in_(points)
                & (self.claims.c.owner == self.owner)))

    @contextlib.contextmanager
    def hold(self, key: str, call: Callable[[Callable[[], Any], str], Any] | None = None,
             poll_s: float = 0.2) -> Iterator[None]:
        """A claim used as a mutex between sweepers (e.g. "@budget" around counting and
        starting trials), waited for while another live sweeper holds it.  `call(fn, what)`
        runs each database call (the sweeper's retries); None: directly."""
        call = call or (lambda fn, what: fn())
        while not call(lambda: self.claim(key), f"taking {key}"):
            time.sleep(poll_s * random.uniform(0.5, 1.0))  # spread the pollers
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # leaving anyway: the reaper drops it else
                self.release([key])
            raise
        call(lambda: self.release([key]), f"releasing {key}")
