"""The task interface shared by every task-distribution environment.

A *task* is a JSON-serialisable dict (``{"velocity": 1.3}``, ``{"goal": [0.3, -0.2]}``). Each
family declares its fields once in a :class:`TaskSpec`; :class:`MetaEnv` gives the env
``sample_tasks(n)``, ``set_task(task)`` and ``get_task()`` on top of that spec:

- ``sample_tasks`` draws from the env's own generator ``self.np_random`` (seeded by
  ``reset(seed=...)``), so the same seed gives the same tasks;
- ``set_task`` validates the task and raises :class:`InvalidTask` naming the field and what
  is valid; a value outside the family's range raises :class:`TaskOutOfRange` unless
  ``allow_out_of_range=True``, in which case it warns (adapting to an unseen task is legitimate);
- the env applies a validated task in ``_apply_task`` (reward parameters, or the MuJoCo model).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


class InvalidTask(ValueError):
    """A task dict that does not fit the family's spec; the message names the field."""


class TaskOutOfRange(InvalidTask):
    """A well-formed task whose value lies outside the family's training range."""


@dataclass(frozen=True)
class TaskField:
    """One field of a task: a number, a vector of ``size`` numbers, or one of ``choices``.

    Numbers and vectors are drawn uniformly from ``[low, high]`` (per coordinate); choices
    uniformly from ``choices``.
    """

    name: str
    low: float | None = None
    high: float | None = None
    size: int | None = None  # None: a scalar; n: a list of n numbers
    choices: tuple[Any, ...] | None = None
    doc: str = ""

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        what = "a number" if self.size is None else f"a list of {self.size} numbers"
        return f"{what} in [{self.low}, {self.high}]"

    def sample(self, rng: np.random.Generator) -> Any:
        if self.choices is not None:
            return self.choices[int(rng.integers(len(self.choices)))]
        if self.size is None:
            return float(rng.uniform(self.low, self.high))
        return [float(x) for x in rng.uniform(self.low, self.high, size=self.size)]

    def validate(self, value: Any, *, allow_out_of_range: bool) -> Any:
        """The value in canonical form (float, list of floats, or the choice)."""
        if self.choices is not None:
            for choice in self.choices:
                if not isinstance(value, bool) and value == choice:
                    return choice
            raise InvalidTask(f"task field '{self.name}' must be {self.describe()}, got {value!r}")
        if self.size is None:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise InvalidTask(f"task field '{self.name}' must be {self.describe()}, got {value!r}")
            numbers = [float(value)]
        else:
            if (
                isinstance(value, (str, bytes, Mapping))
                or not isinstance(value, (Sequence, np.ndarray))
                or len(value) != self.size
            ):
                raise InvalidTask(f"task field '{self.name}' must be {self.describe()}, got {value!r}")
            if any(isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) for v in value):
                raise InvalidTask(f"task field '{self.name}' must be {self.describe()}, got {value!r}")
            numbers = [float(v) for v in value]
        if not all(math.isfinite(v) for v in numbers):
            raise InvalidTask(f"task field '{self.name}' must be finite, got {value!r}")
        if any(v < self.low or v > self.high for v in numbers):
            message = f"task field '{self.name}' is {value!r}, outside the range of this family: {self.describe()}"
            if not allow_out_of_range:
                raise TaskOutOfRange(message)
            warnings.warn(message, stacklevel=4)
        return numbers[0] if self.size is None else numbers


@dataclass(frozen=True)
class TaskSpec:
    """The fields of a family's tasks."""

    fields: tuple[TaskField, ...] = field(default_factory=tuple)

    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def describe(self) -> str:
        return "{" + ", ".join(f'"{f.name}": {f.describe()}' for f in self.fields) + "}"

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return {f.name: f.sample(rng) for f in self.fields}

    def validate(self, task: Any, *, allow_out_of_range: bool = False) -> dict[str, Any]:
        if not isinstance(task, Mapping):
            raise InvalidTask(f"a task must be a dict like {self.describe()}, got {task!r}")
        unknown = sorted(set(task) - set(self.names()))
        if unknown:
            raise InvalidTask(f"unknown task field(s) {unknown}; this family's tasks are {self.describe()}")
        missing = [n for n in self.names() if n not in task]
        if missing:
            raise InvalidTask(f"task is missing field(s) {missing}; this family's tasks are {self.describe()}")
        return {f.name: f.validate(task[f.name], allow_out_of_range=allow_out_of_range) for f in self.fields}


class MetaEnv:
    """Mixin for a gymnasium env that is a distribution of tasks.

    Subclasses set ``task_spec`` (an instance attribute when the ranges are constructor
    arguments), implement ``_apply_task(task)``, and call ``self.set_task(...)`` once in their
    constructor with their default task.
    """

    task_spec: ClassVar[TaskSpec] | TaskSpec
    _task: dict[str, Any]

    def sample_tasks(self, n: int) -> list[dict[str, Any]]:
        """``n`` tasks drawn from ``self.np_random`` (seed it with ``reset(seed=...)``)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"sample_tasks(n): n must be an int >= 0, got {n!r}")
        rng = self.np_random  # type: ignore[attr-defined]
        return [self.task_spec.sample(rng) for _ in range(int(n))]

    def set_task(self, task: Mapping[str, Any], *, allow_out_of_range: bool = False) -> None:
        """Validate and apply ``task``; the next episode (and the current one) use it."""
        validated = self.task_spec.validate(task, allow_out_of_range=allow_out_of_range)
        self._apply_task(validated)
        self._task = validated

    def get_task(self) -> dict[str, Any]:
        """The current task (a copy)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._task.items()}

    def _apply_task(self, task: dict[str, Any]) -> None:
        raise NotImplementedError
