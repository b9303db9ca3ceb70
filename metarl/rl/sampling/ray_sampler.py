"""Ray rollout workers: the meta-batch split across actors, each running a :class:`VectorSampler`.

``RaySampler(env_id, policy=..., episodes_per_task=E, num_workers=W)`` starts ``W`` Ray actors
(one CPU each), spread over the nodes of the cluster (inside a placement group, such as a sweep
trial's, they go into its bundles instead). Per sampling call the parameters go into the object store once
(``ray.put``); every actor receives the reference and a contiguous share of the tasks with their
seeds, samples them with its in-process vectorized sampler and returns the episodes as arrays.
The shares are concatenated in task order, so the result equals ``VectorSampler.sample`` on the
whole meta-batch, bit for bit, whatever ``W`` is (episodes depend only on their task's seed).

Fault tolerance: if an actor dies during a call (its process is killed, its node is lost), the
sampler starts a replacement actor, re-submits that share, records the event in ``events``,
reports it once (to the ``on_event`` callback when given, else as a logging warning) and
completes the call with the full episode counts.

Ray itself: with no ``address`` (and no ``RAY_ADDRESS`` in the environment) ``ray.init`` starts
a local Ray with ``num_workers`` CPUs and no dashboard; ``address="auto"`` or
``"ray://host:10001"`` or ``"host:6379"`` joins an existing cluster (start it with
``ray start --head`` and ``ray start --address=HEAD:6379`` on the other nodes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from metarl.rl.episodes import Episodes

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process (no-op if it is already initialised).

    ``address`` None: ``RAY_ADDRESS`` if set, else a new local Ray with ``num_cpus`` CPUs (never a
    cluster that something else started on this machine, which ``ray.init()`` would join). The
    dashboard of a local Ray is off; a cluster keeps whatever its ``ray start`` chose.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "configure_logging": True,
    }
    if address is None:
        # "local", not None: with None, ray.init joins the cluster last started on this machine
        # (Ray records it in its temp dir, ``ray_current_cluster``), even one from another program
        address = "local"
        kwargs["num_cpus"] = num_cpus
        # the sampler's workers import metarl, envs and agents from the project root
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
    else:
        kwargs.pop("include_dashboard")  # a cluster's dashboard is set by `ray start`
    # ray.init replaces the process's SIGTERM handler with one that aborts (exit by SIGABRT);
    # keep the application's own (``metarl train`` stops on SIGTERM as on Ctrl-C, checkpoint kept).
    handler = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, **kwargs)
    if callable(handler):
        signal.signal(signal.SIGTERM, handler)


class _RolloutWorker:
    """Body of the Ray actor: a VectorSampler and the policy module (parameters sent per call)."""

    def __init__(
        self,
        env_id: str,
        policy: torch.nn.Module,
        episodes_per_task: int,
        horizon: int | None,
        env_kwargs: Mapping[str, Any],
        action_scale: float | None = None,
        batch_physics: bool = True,
        physics_threads: int = 1,
        episodes_per_trial: int = 1,
    ) -> None:
        from metarl.rl.sampling.vector import VectorSampler

        torch.set_num_threads(1)
        self.policy = policy
        self.sampler = VectorSampler(
            env_id,
            episodes_per_task=episodes_per_task,
            horizon=horizon,
            env_kwargs=env_kwargs,
            action_scale=action_scale,
            batch_physics=batch_physics,
            physics_threads=physics_threads,
            episodes_per_trial=episodes_per_trial,
        )

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def sample(
        self,
        params: Mapping[str, np.ndarray],
        tasks: Sequence[dict[str, Any]],
        seeds: Sequence[int],
        per_task: bool,
        lo: int,
        hi: int,
    ) -> dict[str, np.ndarray]:
        tensors = {
            k: torch.from_numpy(np.array(v[lo:hi] if per_task else v)) for k, v in params.items()
        }  # writable copies
        episodes = self.sampler.sample(self.policy, tensors, tasks, seeds, per_task=per_task)
        return {k: v.numpy() for k, v in episodes._asdict().items() if v is not None}


class RaySampler:
    """Samples a meta-batch with ``num_workers`` Ray rollout actors.

    Args:
        env_id: registered task family.
        policy: the policy module (sent to each actor once; parameters travel per call).
        episodes_per_task, horizon, env_kwargs, action_scale, batch_physics, physics_threads,
            episodes_per_trial: as :class:`~metarl.rl.sampling.VectorSampler`.
        num_workers: number of actors (each takes ``physics_threads`` CPUs).
        address: Ray cluster to join (None: ``RAY_ADDRESS`` or a new local Ray).
        max_replacements: how many dead actors one call may replace before it gives up.
        on_event: called with a dict for every replaced worker (e.g. the run's logger); when given,
            it is the only report (no logging warning as well).
        start_timeout_s: how long to wait for the actors to start (each needs a free CPU in
            the Ray cluster) before raising an error that says so.
    """

    def __init__(
        self,
        env_id: str,
        *,
        policy: torch.nn.Module,
        episodes_per_task: int,
        num_workers: int,
        horizon: int | None = None,
        env_kwargs: Mapping[str, Any] | None = None,
        action_scale: float | None = None,
        batch_physics: bool = True,
        physics_threads: int = 1,
        episodes_per_trial: int = 1,
        address: str | None = None,
        max_replacements: int = 8,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        import ray

        from metarl.rl.sampling.vector import resolve_horizon

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        horizon = resolve_horizon(env_id, horizon)
        if physics_threads < 1:
            raise ValueError(f"physics_threads must be >= 1, got {physics_threads}")
        if episodes_per_trial < 1 or episodes_per_task % episodes_per_trial:
            raise ValueError(
                f"episodes_per_task ({episodes_per_task}) must be a multiple of episodes_per_trial "
                f"({episodes_per_trial}, >= 1): each task's episodes are whole trials"
            )
        init_ray(address, num_cpus=None if address else num_workers * physics_threads)
        # spread over the cluster's nodes, unless a placement group (a sweep's trial) says where
        from ray.util import get_current_placement_group

        spread = {} if get_current_placement_group() is not None else {"scheduling_strategy": "SPREAD"}
        self._remote_cls = ray.remote(num_cpus=physics_threads, max_restarts=0, **spread)(_RolloutWorker)
        self._args = (
            env_id,
            policy,
            episodes_per_task,
            horizon,
            dict(env_kwargs or {}),
            action_scale,
            batch_physics,
            physics_threads,
            episodes_per_trial,
        )
        self.episodes_per_task = episodes_per_task
        self.horizon = horizon
        self.num_workers = num_workers
        self.max_replacements = max_replacements
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.workers = [self._remote_cls.remote(*self._args) for _ in range(num_workers)]
        try:
            ray.get([w.pid.remote() for w in self.workers], timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources().get("CPU", 0)
            self.close()
            raise RuntimeError(
                f"could not start {num_workers} rollout workers within {start_timeout_s:.0f} s: each "
                f"needs {physics_threads} CPU(s) (sampler.physics_threads) and the Ray cluster has {free:g} "
                f"free; lower ray.workers or sampler.physics_threads, or add nodes (on a busy machine "
                f"the workers, which run at low priority, may also start too slowly)"
            ) from None

    def worker_pids(self) -> list[int]:
        """Process ids of the current actors (waits until they are up)."""
        import ray

        return ray.get([w.pid.remote() for w in self.workers])

    def worker_nodes(self) -> list[str]:
        """Ray node ids of the current actors."""
        import ray

        return ray.get([w.node_id.remote() for w in self.workers])

    def _replace(self, index: int, error: BaseException, share: tuple[int, int]) -> None:
        import ray

        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.workers[index], no_restart=True)
        self.workers[index] = self._remote_cls.remote(*self._args)
        event = {
            "event": "worker_replaced",
            "worker": index,
            "tasks": list(share),
            "time": time.time(),
            "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
        }
        self.events.append(event)
        if self.on_event is not None:  # the owner reports it (metarl train prints one line and counts it)
            self.on_event(event)
        else:
            log.warning(
                "rollout worker %d died (%s); replaced it and re-sampling tasks %d..%d",
                index,
                event["error"],
                share[0],
                share[1] - 1,
            )

    def sample(
        self,
        params: Mapping[str, torch.Tensor],
        tasks: Sequence[dict[str, Any]],
        seeds: Sequence[int],
        *,
        per_task: bool = False,
    ) -> Episodes:
        """Episodes of every task (task order kept), equal to ``VectorSampler.sample``'s."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        n = len(tasks)
        if len(seeds) != n:
            raise ValueError(f"need one seed per task: {n} tasks, {len(seeds)} seeds")
        if n == 0:
            raise ValueError("sample needs at least one task")
        ref = ray.put({k: v.detach().cpu().numpy() for k, v in params.items()})
        bounds = np.linspace(0, n, min(self.num_workers, n) + 1).round().astype(int)
        shares = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

        def submit(i: int):
            lo, hi = shares[i]
            return self.workers[i].sample.remote(ref, list(tasks[lo:hi]), list(seeds[lo:hi]), per_task, lo, hi)

        pending = {submit(i): i for i in range(len(shares))}
        results: dict[int, dict[str, np.ndarray]] = {}
        replacements = 0
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except (ActorDiedError, ActorUnavailableError, RayActorError) as error:
                replacements += 1
                if replacements > self.max_replacements:
                    raise RuntimeError(
                        f"rollout workers died {replacements} times in one sampling call; "
                        f"giving up (last error: {error})"
                    ) from error
                self._replace(i, error, shares[i])
                pending[submit(i)] = i
        parts = [
            Episodes(**{k: torch.from_numpy(np.array(v)) for k, v in results[i].items()}) for i in range(len(shares))
        ]
        return Episodes.cat(parts)

    def close(self) -> None:
        import ray

        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w, no_restart=True)
        self.workers = []
