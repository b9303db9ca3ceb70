"""Meta-World ML1, ML10 and ML45 (metaworld 3.x, v3 envs) behind the metarl task interface.

``MetaWorldEnv(benchmark=..., task_name=..., split=..., seed=...)`` is one gymnasium env whose
task is one Meta-World task of the chosen split:

- ``benchmark``: ``"ML1"`` (one env class, 50 train goals and 50 different test goals),
  ``"ML10"`` (10 train env classes, 5 held-out test classes) or ``"ML45"`` (45 train, 5 test);
- ``task_name``: the v3 env name for ML1 (``"reach-v3"``, ...; ``ml1_env_names()`` lists the
  50 valid names); must be None for ML10/ML45;
- ``split``: ``"train"`` or ``"test"``;
- ``seed``: the seed of the benchmark's task sets (default 0), exactly as
  ``metaworld.ML1(task_name, seed)`` / ``metaworld.ML10(seed)`` / ``metaworld.ML45(seed)`` use
  it: the tasks of this env are those of the Meta-World benchmark object built with that seed
  (ML1's test goals use ``seed + 1``, as in Meta-World). Reproducing a task needs the same
  (benchmark, task_name, split, seed);
- ``max_path_length``: the horizon (default 500, Meta-World's); ``truncated`` is True from that
  step on, never an exception; None: no truncation here (leave it to gymnasium's TimeLimit);
- ``render_mode`` / ``camera_name``: rendering is off (None) by default;
- ``task``: the initial task (default: the split's first env name, index 0).

A task is ``{"env_name": "reach-v3", "index": 7}``: the ``index``-th of the split's 50 tasks
(goals, object positions) of that env class, in Meta-World's order. The Meta-World ``Task``
objects (pickled data) stay inside the env. ``sample_tasks(n)`` draws uniformly over all the
split's tasks with ``self.np_random``. A task stays fixed across resets until ``set_task``;
after ``set_task`` call ``reset()`` before ``step()`` (switching ``env_name`` swaps the
underlying Meta-World env: an env holds the instance of its current class only, and hands the
others to a pool of idle instances that the process's envs share). Observations are
Meta-World's 39 floats (goal hidden: the last 3 are zeros); actions are 4 floats in [-1, 1];
``info`` is Meta-World's (``info["success"]`` is 1.0 on success).

Note: a task dict does not name its split or seed; ``{"env_name": "reach-v3", "index": 7}`` is a
different goal in an ML1 train env and in an ML1 test env.

The first env of a (benchmark, task_name, split, seed) in a process builds all env classes of
its split (ML1: 1, ML10: 10 train / 5 test, ML45: 45 train / 5 test) and draws their goals the
way Meta-World does, with the same global-RNG stream (so the goals equal Meta-World's), but
without simulating the hand reset for each of the 50 goal draws; nothing is downloaded. Later
envs reuse those goals and build an env class only when a task of it is set (a sampler holds
hundreds of envs: building all 45 ML45 classes in each would take minutes and tens of GB).
Meta-World's reset starts from ``mj_resetData``, so how an env came to be built does not change
its episodes (tested).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from envs import metaworld_pool
from envs.base import InvalidTask, MetaEnv, TaskField, TaskSpec

BENCHMARKS = ("ML1", "ML10", "ML45")
SPLITS = ("train", "test")
N_GOALS = 50  # tasks per env class and split (Meta-World's _N_GOALS)
MAX_PATH_LENGTH = 500  # Meta-World's max_path_length
# (benchmark, task_name, split, seed) -> each class's N_GOALS Meta-World Tasks: drawing them builds
# every class of the split, which a process does once; later envs build a class when they use it.
_TASK_CACHE: dict[tuple[str, str | None, str, int], dict[str, list[Any]]] = {}


# Registration specs in the format of envs.FAMILIES: name -> (entry point, vector entry point, horizon).
# gymnasium.make("<ns>/MetaWorld-ML1-v0", task_name="reach-v3", split="test", seed=0)
METAWORLD_ENVS: dict[str, tuple[str, str | None, int]] = {
    "MetaWorld-ML1": ("envs.metaworld_tasks:make_ml1", None, MAX_PATH_LENGTH),
    "MetaWorld-ML10": ("envs.metaworld_tasks:make_ml10", None, MAX_PATH_LENGTH),
    "MetaWorld-ML45": ("envs.metaworld_tasks:make_ml45", None, MAX_PATH_LENGTH),
}


def ml1_env_names() -> list[str]:
    """The 50 Meta-World v3 env names valid as ML1 ``task_name``."""
    from metaworld import env_dict

    return list(env_dict.ALL_V3_ENVIRONMENTS)


def _env_classes(benchmark: str, split: str, task_name: str | None) -> OrderedDict:
    from metaworld import env_dict

    if benchmark == "ML1":
        return OrderedDict([(task_name, env_dict.ALL_V3_ENVIRONMENTS[task_name])])
    table = env_dict.ML10_V3 if benchmark == "ML10" else env_dict.ML45_V3
    return OrderedDict(table[split])


def _check_benchmark_args(benchmark: Any, split: Any, task_name: Any) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {list(BENCHMARKS)}, got {benchmark!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if benchmark == "ML1":
        names = ml1_env_names()
        if task_name is None:
            raise ValueError(
                "benchmark 'ML1' needs task_name, a Meta-World v3 env name such as 'reach-v3' "
                "(envs.metaworld_tasks.ml1_env_names() lists them)"
            )
        if task_name not in names:
            raise ValueError(
                f"unknown Meta-World task_name {task_name!r}; valid ML1 names "
                f"(envs.metaworld_tasks.ml1_env_names()): {names}"
            )
    elif task_name is not None:
        raise ValueError(
            f"task_name is only for benchmark 'ML1'; {benchmark} has fixed env classes (got task_name={task_name!r})"
        )


def benchmark_env_names(benchmark: str, split: str, task_name: str | None = None) -> list[str]:
    """The env names of a benchmark's split, in Meta-World's order, without building any env."""
    _check_benchmark_args(benchmark, split, task_name)
    return list(_env_classes(benchmark, split, task_name))


def _fast_reset_hand(env: Any):
    """A stand-in for ``SawyerXYZEnv._reset_hand`` while drawing goals: no simulation.

    The goal draws (``_get_state_rand_vec`` and the rejection loops around it in each env's
    ``reset_model``) use only the global NumPy RNG and the drawn vectors, never the hand's
    simulated state, so replacing the 50 x 5 simulation steps of each hand reset by one
    ``mj_forward`` gives the same goals for a fraction of the cost.
    """

    import mujoco

    def reset_hand(steps: int = 50) -> None:
        mujoco.mj_forward(env.model, env.data)  # valid body frames for the observation reset_model returns
        env.init_tcp = env.tcp_center

    return reset_hand


def _build_tasks(classes: OrderedDict, seed: int, make_env) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Build one env per class and its ``N_GOALS`` Meta-World ``Task`` objects.

    Mirrors ``metaworld._make_tasks`` (seed the global NumPy RNG once, then for each class in
    order: build it, unfreeze its goal, reset ``N_GOALS`` times and keep each reset's
    ``_last_rand_vec``), so the tasks equal those of Meta-World's benchmark for that seed.
    The global RNG state is restored afterwards.
    """
    from metaworld.types import Task

    envs: dict[str, Any] = {}
    tasks: dict[str, list[Any]] = {}
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        for env_name, env_cls in classes.items():
            env = make_env(env_cls)
            envs[env_name] = env
            env._freeze_rand_vec = False
            env._set_task_called = True
            env._set_task_inner()
            env._reset_hand = _fast_reset_hand(env)
            try:
                rand_vecs = []
                for _ in range(N_GOALS):
                    env.reset()
                    rand_vecs.append(np.array(env._last_rand_vec, copy=True))
            finally:
                del env._reset_hand  # back to the class's method
            if len(np.unique(np.array(rand_vecs), axis=0)) != N_GOALS:
                raise RuntimeError(f"Meta-World drew duplicate goals for {env_name} with seed {seed}")
            tasks[env_name] = [
                Task(
                    env_name=env_name,
                    data=pickle.dumps(dict(rand_vec=rand_vec, env_cls=env_cls, partially_observable=True)),
                )
                for rand_vec in rand_vecs
            ]
    finally:
        np.random.set_state(state)
    return envs, tasks


@dataclass(frozen=True)
class IndexField(TaskField):
    """An int in ``[0, count - 1]`` (drawn uniformly)."""

    count: int = 0

    def describe(self) -> str:
        return f"an int in [0, {self.count - 1}]"

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.count))

    def validate(self, value: Any, *, allow_out_of_range: bool) -> int:
        # No task exists outside the range, so allow_out_of_range does not apply.
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < self.count:
            raise InvalidTask(f"task field '{self.name}' must be {self.describe()}, got {value!r}")
        return int(value)


class MetaWorldEnv(MetaEnv, gym.Env):
    """A Meta-World ML1/ML10/ML45 split as one env with ``{"env_name", "index"}`` tasks (see module doc)."""

    metadata = {"render_modes": ["human", "rgb_array", "depth_array"], "render_fps": 80}

    def __init__(
        self,
        *,
        benchmark: str = "ML1",
        task_name: str | None = None,
        split: str = "train",
        seed: int = 0,
        max_path_length: int | None = MAX_PATH_LENGTH,
        render_mode: str | None = None,
        camera_name: str | None = None,
        task: dict[str, Any] | None = None,
    ) -> None:
        _check_benchmark_args(benchmark, split, task_name)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32 - 1:
            raise ValueError(f"seed must be an int in [0, 2**32 - 2], got {seed!r}")
        task_seed = int(seed) + 1 if benchmark == "ML1" and split == "test" else int(seed)  # as metaworld.ML1
        if max_path_length is not None and (
            isinstance(max_path_length, bool)
            or not isinstance(max_path_length, (int, np.integer))
            or max_path_length < 1
        ):
            raise ValueError(f"max_path_length must be a positive int or None, got {max_path_length!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")

        self.benchmark = benchmark
        self.split = split
        self.benchmark_seed = int(seed)
        self.max_path_length = None if max_path_length is None else int(max_path_length)
        self.render_mode = render_mode

        metaworld_pool.return_freed_models_to_the_os()

        def make_env(env_cls):
            env = metaworld_pool.take(env_cls, render_mode, camera_name)
            if env is not None:
                return env
            env = env_cls(render_mode=render_mode, camera_name=camera_name)
            # Truncation is ours: Meta-World's own raises on the step after max_path_length.
            env.max_path_length = np.iinfo(np.int64).max
            return env

        classes = _env_classes(benchmark, split, task_name)
        key = (benchmark, task_name, split, task_seed)
        if key in _TASK_CACHE:  # the goals are drawn once per process; env classes built on first use
            self._envs, self._mw_tasks = {}, _TASK_CACHE[key]
        else:
            self._envs, self._mw_tasks = _build_tasks(classes, task_seed, make_env)
            _TASK_CACHE[key] = self._mw_tasks
        self._classes, self._make_env = classes, make_env
        self._idle_key = (render_mode, camera_name)
        self.env_names = list(classes)

        built, self._envs = self._envs, {}  # every class when this env drew the goals, else none
        first = built.get(self.env_names[0])
        if first is None:
            first = make_env(classes[self.env_names[0]])
        self._envs[self.env_names[0]] = first
        for name, env in built.items():
            for attr in ("observation_space", "action_space"):
                a, b = getattr(first, attr), getattr(env, attr)
                if not (
                    a.shape == b.shape
                    and a.dtype == b.dtype
                    and np.array_equal(a.low, b.low)
                    and np.array_equal(a.high, b.high)
                ):
                    raise RuntimeError(f"Meta-World {name} has a different {attr} ({b}) from {self.env_names[0]} ({a})")
            if env is not first:
                self._release(env)
        obs_space, act_space = first.observation_space, first.action_space
        self.observation_space = gym.spaces.Box(obs_space.low, obs_space.high, dtype=obs_space.dtype)
        self.action_space = gym.spaces.Box(act_space.low, act_space.high, dtype=act_space.dtype)

        self._all_tasks = [(name, i) for name in self.env_names for i in range(len(self._mw_tasks[name]))]
        self.task_spec = TaskSpec(
            (
                TaskField("env_name", choices=tuple(self.env_names), doc=f"a {benchmark} {split} env name"),
                IndexField("index", count=N_GOALS, doc="which of that env name's tasks (goals)"),
            )
        )
        self._env = first
        self._elapsed = 0
        self._needs_reset = True
        self.set_task(task if task is not None else {"env_name": self.env_names[0], "index": 0})

    # -- tasks ---------------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        """How many tasks the split has (50 per env name)."""
        return len(self._all_tasks)

    def all_tasks(self) -> list[dict[str, Any]]:
        """Every task of the split, in order (``--task-index N`` of ``metarl adapt`` picks the N-th)."""
        return [{"env_name": name, "index": index} for name, index in self._all_tasks]

    def _env_of(self, name: str):
        """The Meta-World env of class ``name``: the one held, else an idle one of the process, else
        a new one; the envs of other classes held go back to the idle pool (``envs.metaworld_pool``)."""
        env = self._envs.get(name)
        if env is None:
            env = self._envs[name] = self._make_env(self._classes[name])
        for other in [n for n in self._envs if n != name]:
            self._release(self._envs.pop(other))
        return env

    def _release(self, env: Any) -> None:
        metaworld_pool.give_back(env, *self._idle_key)

    @property
    def metaworld_env(self):
        """The Meta-World env instance of the current task's env class."""
        return self._env

    def sample_tasks(self, n: int) -> list[dict[str, Any]]:
        """``n`` tasks drawn uniformly (with replacement) from the split's tasks, with ``self.np_random``."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"sample_tasks(n): n must be an int >= 0, got {n!r}")
        picks = self.np_random.integers(len(self._all_tasks), size=int(n))
        return [{"env_name": self._all_tasks[i][0], "index": self._all_tasks[i][1]} for i in picks]

    def _apply_task(self, task: dict[str, Any]) -> None:
        name, index = task["env_name"], task["index"]
        count = len(self._mw_tasks[name])
        if index >= count:
            raise InvalidTask(
                f"task field 'index' must be an int in [0, {count - 1}] for env_name {name!r}, got {index!r}"
            )
        env = self._env_of(name)
        env.set_task(self._mw_tasks[name][index])  # freezes the goal: resets keep it
        self._env = env
        self._needs_reset = True

    # -- gymnasium -----------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        obs, info = self._env.reset()
        self._elapsed = 0
        self._needs_reset = False
        return np.asarray(obs, dtype=self.observation_space.dtype), dict(info)

    def step(self, action):
        if self._needs_reset:
            raise gym.error.ResetNeeded(
                "MetaWorldEnv: call reset() before step(), after construction and after set_task()"
            )
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {action.shape}")
        obs, reward, terminated, _, info = self._env.step(action)
        self._elapsed += 1
        truncated = self.max_path_length is not None and self._elapsed >= self.max_path_length
        return (
            np.asarray(obs, dtype=self.observation_space.dtype),
            float(reward),
            bool(terminated),
            bool(truncated),
            dict(info),
        )

    def render(self):
        if self.render_mode is None:
            return None
        return self._env.render()

    def close(self) -> None:
        for env in self._envs.values():
            env.close()


def make_ml1(**kwargs: Any) -> MetaWorldEnv:
    """``MetaWorldEnv(benchmark="ML1", **kwargs)`` (needs ``task_name``)."""
    return MetaWorldEnv(benchmark="ML1", **kwargs)


def make_ml10(**kwargs: Any) -> MetaWorldEnv:
    """``MetaWorldEnv(benchmark="ML10", **kwargs)``."""
    return MetaWorldEnv(benchmark="ML10", **kwargs)


def make_ml45(**kwargs: Any) -> MetaWorldEnv:
    """``MetaWorldEnv(benchmark="ML45", **kwargs)``."""
    return MetaWorldEnv(benchmark="ML45", **kwargs)
