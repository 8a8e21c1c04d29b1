"""Slots, not batches: how the `rld_optuna` sweeper keeps a launcher busy.

Hydra's `Launcher.launch(job_overrides)` runs a batch and returns when its last job ends, so
a slot whose trial finished early (or was pruned) idles until the slowest job of the batch
is done.  `Slots` is the extension the project's launchers offer instead
(`launcher.open_slots(capacity)`): the sweeper `submit`s jobs while fewer than `capacity`
run, and `wait` returns the jobs that have finished (blocking until one has), so each freed
slot takes the next trial at once.  `launch` keeps working as before.

* `PoolSlots` (`hydra/launcher=gpus`): each unit of work (a job, or a pack of
  `hydra.launcher.pack` jobs: `_jobs.plan_jobs`) is a future of loky's reusable executor, the
  pool joblib's `Parallel` uses: workers keep their GPU slot (`_gpus.pin_process`) and take
  the next unit as soon as theirs ends.
* `SubmititSlots` (`slurm`, `submitit_local`): one submitit job per unit, polled (`done()`);
  a submitit_local job takes its GPU slot when it starts, so no waves are needed.
* `LaunchSlots`: `launch` on what was submitted, for launchers that run in this process
  (Hydra's `basic` one job per call; `packed` one pack: a pack's pruned points leave it at
  once, the engine's step getting cheaper, and the next pack starts when it ends) and, as
  batches, for any launcher without slots of its own.

A pruned point of a running pack frees its share of the pack's step, not a slot: a new point
cannot join a pack in mid-training, because a pack's points share every batch and the data
order is a function of the epoch (a point at epoch 1 sees other batches than points at epoch
e); the pack's slot takes the next pack when it ends.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus

from . import _jobs

log = logging.getLogger(__name__)

Done = list[tuple[int, JobReturn]]  # (job number, its return) of finished jobs


def failed_return(overrides: Sequence[str], error: BaseException) -> JobReturn:
    """The return of a job whose process died (its unit raised outside the job): the
    sweeper counts it as a raised job, as Hydra's launchers would have raised it."""
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)


def unit_done(unit: _jobs.Unit, get: Any) -> Done:
    """(job number, return) of a finished unit; `get()` gives its returns in the unit's
    order, or raises what killed it."""
    try:
        rets = list(get())
    except Exception as e:  # noqa: BLE001 - a worker or a Slurm job that died: its jobs fail
        log.error("job(s) #%s died: %s: %s", ",".join(str(i) for i, _ in unit),
                  type(e).__name__, e)
        rets = [failed_return(o, e) for _, o in unit]
    return [(idx, ret) for (idx, _), ret in zip(unit, rets, strict=True)]


class Slots:
    """Jobs started as slots free up (see the module's docstring)."""

    capacity: int = 1

    def submit(self, jobs: Sequence[_jobs.Job]) -> None:
        raise NotImplementedError

    def wait(self) -> Done:
        """The jobs that finished since the last call (at least one; [] only when none is
        running or queued)."""
        raise NotImplementedError

    def close(self, ok: bool) -> None:
        """After the sweep (ok) or on the way out after an error (stop what still runs where
        this process owns it)."""


class LaunchSlots(Slots):
    """`launcher.launch` on the queued jobs: `per_call` at a time (None: all of them, i.e.
    batches)."""

    def __init__(self, launcher: Any, capacity: int, per_call: int | None = None) -> None:
        self.launcher, self.capacity, self.per_call = launcher, max(1, capacity), per_call
        self.queue: list[_jobs.Job] = []

    def submit(self, jobs: Sequence[_jobs.Job]) -> None:
        self.queue += [(idx, list(o)) for idx, o in jobs]

    def wait(self) -> Done:
        n = self.per_call or len(self.queue)
        jobs, self.queue = self.queue[:n], self.queue[n:]
        if not jobs:
            return []
        # numbered one after another by the sweeper: one call with the first number
        assert [i for i, _ in jobs] == list(range(jobs[0][0], jobs[0][0] + len(jobs)))
        rets = self.launcher.launch([o for _, o in jobs], initial_job_idx=jobs[0][0])
        return [(idx, ret) for (idx, _), ret in zip(jobs, rets, strict=True)]


class PoolSlots(Slots):
    """The `gpus` launcher's workers as futures of loky's reusable executor."""

    def __init__(self, launcher: Any, capacity: int) -> None:
        from . import _gpus

        _jobs.start_sweep(launcher.config)
        self.launcher, self.capacity = launcher, max(1, capacity)
        self.pool = launcher.pool()
        self.where = _gpus.where(launcher, self.pool)
        self.futures: dict[concurrent.futures.Future, _jobs.Unit] = {}

    def _executor(self) -> Any:
        # the same executor while it is healthy, a new one after a worker died
        from joblib.externals.loky import get_reusable_executor

        return get_reusable_executor(max_workers=self.launcher.workers)

    def submit(self, jobs: Sequence[_jobs.Job]) -> None:
        from . import _gpus

        la = self.launcher
        todo = _jobs.plan_jobs(la.hydra_context, la.config, jobs, la.pack)
        _jobs.log_plan(todo, f"as {la.workers} worker(s) free up, on {self.where}")
        state = Singleton.get_state()
        executor = self._executor()
        for unit in todo:
            future = executor.submit(_gpus.run_pinned_unit, self.pool, unit, la.hydra_context,
                                     la.config, la.task_function, state, la.pack_mode)
            self.futures[future] = unit

    def wait(self) -> Done:
        if not self.futures:
            return []
        done, _ = concurrent.futures.wait(list(self.futures),
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        out: Done = []
        for future in done:
            out += unit_done(self.futures.pop(future), future.result)
        return out

    def close(self, ok: bool) -> None:
        if not ok and self.futures:  # Ctrl-C, an error: the workers' runs resume next time
            self._executor().shutdown(wait=False, kill_workers=True)
            self.futures.clear()


class SubmititSlots(Slots):
    """One submitit job per unit (Slurm, or submitit's local executor), polled."""

    def __init__(self, launcher: Any, capacity: int, poll_s: float = 1.0) -> None:
        from . import _packed

        _jobs.start_sweep(launcher.config, log_config=False)
        self.launcher, self.capacity, self.poll_s = launcher, max(1, capacity), poll_s
        self.executor = _packed.submitit_executor(launcher)
        self.jobs: dict[Any, _jobs.Unit] = {}

    def submit(self, jobs: Sequence[_jobs.Job]) -> None:
        from . import _packed

        la = self.launcher
        todo = _jobs.plan_jobs(la.hydra_context, la.config, jobs, la.pack)
        _jobs.log_plan(todo, f"one submitit '{la._EXECUTOR}' job per "
                             f"{'pack' if la.pack else 'job'}, as slots free up")
        state = Singleton.get_state()
        for unit in todo:
            if la.pack is None:
                ((idx, overrides),) = unit
                job = self.executor.submit(la, list(overrides), "hydra.sweep.dir", idx,
                                           f"job_id_for_{idx}", state)
            else:
                job = self.executor.submit(_packed.PackJob(la), unit, state)
            self.jobs[job] = unit

    def wait(self) -> Done:
        if not self.jobs:
            return []
        while True:
            done = [job for job in self.jobs if job.done()]
            if done:
                break
            time.sleep(self.poll_s)
        out: Done = []
        for job in done:
            unit = self.jobs.pop(job)

            def returns(job: Any = job, unit: _jobs.Unit = unit) -> list[JobReturn]:
                first = job.results()[0]  # rank 0's, in a job of several tasks
                return [first] if self.launcher.pack is None else first

            out += unit_done(unit, returns)
        return out

    def close(self, ok: bool) -> None:
        # local jobs are this process's children: stop them; Slurm jobs run on (their
        # results stay on disk for the next run of the command; README: cancel them first)
        if not ok and self.launcher._EXECUTOR == "local":
            for job in self.jobs:
                try:
                    job.cancel(check=False)
                except Exception as e:  # noqa: BLE001 - on the way out anyway
                    log.warning("could not cancel job %s: %s", job.job_id, e)


def open_slots(launcher: Any, capacity: int) -> Slots:
    """The launcher's own slots, else `launch` one job at a time for Hydra's in-process
    basic launcher, else batches of `capacity` jobs (any other launcher)."""
    opener = getattr(launcher, "open_slots", None)
    if opener is not None:
        return opener(capacity)
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher

    per_call = 1 if isinstance(launcher, BasicLauncher) else None
    if per_call is None:
        log.info("launcher %s has no slots: trials start in batches of %d",
                 type(launcher).__name__, capacity)
    return LaunchSlots(launcher, capacity, per_call)
