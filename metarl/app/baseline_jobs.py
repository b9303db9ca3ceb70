"""The PPO jobs of ``metarl evaluate --baselines``: Ray tasks with retries, each result kept on disk.

A job is a plain function and its arguments (the multi-task PPO policy, PPO from scratch on one
task, one oracle). :class:`JobRunner` runs a list of them:

- ``workers > 1`` or a Ray ``address``: as Ray tasks (a local Ray with ``workers`` CPUs, or the
  cluster at ``address``), one CPU and one torch thread each. A task whose worker process dies
  (killed, out of memory, its node lost) is run again by Ray, up to ``max_retries`` times; an
  exception raised by the job itself is not retried (it would raise again) and ends the run.
- ``workers == 1`` and no address: one after another in this process, no Ray.

Every finished job's result is written at once (atomically) to ``STORE/<name>-<key>.pt``, where
``key`` hashes the function and all its arguments. A later run with the same jobs loads those
files instead of running them again, so an evaluation stopped or killed half-way costs only the
jobs that had not finished; a job whose arguments changed (another budget, seed or task) has
another key and runs. Results do not depend on ``workers``, on Ray, or on retries: each job is
seeded by its own arguments.

Progress: one line per finished job with the count done and an estimate of the time left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl.runs.rundir import RunError, save_checkpoint

#: Folder of a run directory that keeps the finished baseline jobs.
STORE = "baseline_jobs"


@dataclass(frozen=True)
class Job:
    """``fn(*args)`` under a readable ``name`` (``pretrain``, ``oracle-3``, ``scratch-7``)."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]

    @property
    def key(self) -> str:
        """16 hex digits of a hash of the function and its arguments: the job's identity on disk."""
        payload = json.dumps([self.fn.__module__, self.fn.__qualname__, _plain(self.args)], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """JSON-able form of job arguments (dataclasses, arrays, tuples), for hashing."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__dataclass__": type(value).__name__, **_plain(dataclasses.asdict(value))}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _one_thread_call(fn: Callable[..., Any], *args: Any) -> Any:
    torch.set_num_threads(1)
    return fn(*args)


class JobRunner:
    """Runs jobs (in Ray tasks or in this process), keeping each finished result under ``store``.

    Use ``start(jobs)``, do other work meanwhile, then ``results()``: a dict from job name to result,
    in the order of ``jobs``. With Ray, a thread of this process collects and stores results as
    they finish, so a kill of this process loses only the jobs still running.
    """

    def __init__(
        self,
        store: Path | None,
        *,
        workers: int = 1,
        address: str | None = None,
        max_retries: int = 3,
        log: Callable[[str], None] = print,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.store = Path(store) if store is not None else None
        self.workers = workers
        self.address = address
        self.max_retries = max_retries
        self.log = log
        self.kept: list[str] = []
        self._results: dict[str, Any] = {}
        self._jobs: list[Job] = []
        self._todo: list[Job] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def uses_ray(self) -> bool:
        return self.workers > 1 or self.address is not None

    def _path(self, job: Job) -> Path:
        assert self.store is not None
        return self.store / f"{job.name}-{job.key}.pt"

    def _load_kept(self, job: Job) -> bool:
        if self.store is None or not self._path(job).is_file():
            return False
        try:
            saved = torch.load(self._path(job), weights_only=True)
        except Exception:  # a damaged file: run the job again and overwrite it
            return False
        if not isinstance(saved, dict) or saved.get("key") != job.key or "result" not in saved:
            return False
        self._results[job.name] = saved["result"]
        self.kept.append(job.name)
        return True

    def _keep(self, job: Job, result: Any) -> None:
        self._results[job.name] = result
        if self.store is not None:
            self.store.mkdir(parents=True, exist_ok=True)
            save_checkpoint({"name": job.name, "key": job.key, "result": result}, self._path(job))

    def start(self, jobs: Sequence[Job]) -> None:
        """Load the kept results and (with Ray) submit the other jobs."""
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ValueError("job names must be unique")
        self._jobs = list(jobs)
        todo = [job for job in jobs if not self._load_kept(job)]
        if self.kept:
            where = f" from {self.store}" if self.store is not None else ""
            self.log(f"baseline jobs: {len(self.kept)} of {len(jobs)} already done (kept{where}); {len(todo)} to run")
        self._todo = todo
        if not todo or not self.uses_ray:
            return
        import ray

        from metarl.rl.sampling.ray_sampler import init_ray

        init_ray(self.address, num_cpus=None if self.address else self.workers)
        remote = ray.remote(num_cpus=1, max_retries=self.max_retries)(_one_thread_call)
        pending = {remote.remote(job.fn, *job.args): job for job in todo}
        self._thread = threading.Thread(target=self._collect, args=(pending,), daemon=True)
        self._thread.start()

    def _progress(self, done: int, total: int, t0: float) -> str:
        elapsed = time.perf_counter() - t0
        left = elapsed / done * (total - done)
        return f"{done}/{total} done, {elapsed / 60:.1f} min so far, about {left / 60:.1f} min left"

    def _collect(self, pending: dict[Any, Job]) -> None:
        import ray

        t0, total = time.perf_counter(), len(pending)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as error:
                    raise RunError(
                        f"baseline job {job.name} failed {self.max_retries + 1} times ({type(error).__name__}); "
                        f"the finished jobs are kept in {self.store}: run the same command again to do the rest"
                    ) from None
                self._keep(job, result)
                self.log(f"baseline job {job.name}: {self._progress(total - len(pending), total, t0)}")
        except BaseException as error:  # reported by results(), in the caller's thread
            self._error = error
            for ref in pending:
                ray.cancel(ref, force=True)

    def results(self) -> dict[str, Any]:
        """Every job's result by name (runs the jobs now when not on Ray)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif not self.uses_ray:
            t0 = time.perf_counter()
            for i, job in enumerate(self._todo, 1):
                self._keep(job, job.fn(*job.args))
                self.log(f"baseline job {job.name}: {self._progress(i, len(self._todo), t0)}")
        self._todo = []
        if self._error is not None:
            from ray.exceptions import RayTaskError

            error, self._error = self._error, None
            if isinstance(error, RayTaskError) and error.cause is not None:
                raise error.cause from None  # the job's own exception, not Ray's wrapper
            raise error
        return {job.name: self._results[job.name] for job in self._jobs}
