"""The process's idle Meta-World envs, shared by every ``MetaWorldEnv``, and the allocator setting
that lets their freed models go back to the OS.

A ``MetaWorldEnv`` holds one Meta-World env, that of its task's class: switching class hands the old
one back here (``give_back``) and takes one of the new class from here (``take``) before building
one. Each holds a ~21 MB MjModel: a sampler of 200 ML10 envs that kept every class it had used grew
past 20 GB within five iterations. At most ``IDLE_PER_CLASS`` are kept idle per class; the rest are
closed.
"""

from __future__ import annotations

from typing import Any

# (env class, render_mode, camera_name) -> idle Meta-World envs of that class
IDLE: dict[tuple[Any, str | None, str | None], list[Any]] = {}
IDLE_PER_CLASS = 8
_MALLOC_SET = False


def take(env_cls: type, render_mode: str | None, camera_name: str | None) -> Any | None:
    """An idle Meta-World env of class ``env_cls`` built with these render settings, or None."""
    idle = IDLE.get((env_cls, render_mode, camera_name))
    return idle.pop() if idle else None


def give_back(env: Any, render_mode: str | None, camera_name: str | None) -> None:
    """Keep ``env`` for the next ``take`` of its class, or close it when the class has enough."""
    idle = IDLE.setdefault((type(env), render_mode, camera_name), [])
    if len(idle) < IDLE_PER_CLASS:
        idle.append(env)
    else:
        env.close()


def return_freed_models_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MB, once per process (a no-op elsewhere).

    glibc raises its threshold to the size of each mmapped block freed, so after the first freed
    MjModel (~21 MB) later ones come from the heap, which fragments and never shrinks: a sampler of
    100 ML10 envs switching classes grew from 3.9 to 6.9 GB in 8 iterations with ~150 envs alive,
    and stayed at 3.8-4.2 GB with the threshold fixed (2026-12-01)."""
    global _MALLOC_SET
    if _MALLOC_SET:
        return
    _MALLOC_SET = True
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
