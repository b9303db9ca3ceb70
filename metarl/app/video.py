"""One episode of a policy as an animated GIF (MuJoCo offscreen rendering), for ``metarl adapt --video``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym

from metarl.core.atomic import atomic_open
from metarl.runs.rundir import writing


class VideoUnavailable(RuntimeError):
    """No offscreen renderer (or a family that cannot render); the message says what to do."""


def record_video(actor: Any, env: gym.Env, path: str | Path, *, seed: int = 0, fps: int = 30) -> Path:
    """One deterministic episode of ``actor`` in ``env`` (made with ``render_mode="rgb_array"``)
    as an animated GIF at ``path``; raises :class:`VideoUnavailable` when nothing can be rendered."""
    from PIL import Image

    try:
        obs, _ = env.reset(seed=seed)
        first = env.render()
    except Exception as exc:  # OpenGL / EGL / OSMesa failures surface as many exception types
        raise VideoUnavailable(
            f"MuJoCo could not render offscreen ({type(exc).__name__}); set MUJOCO_GL=egl (with a GPU) or "
            "MUJOCO_GL=osmesa (CPU, needs libOSMesa) and retry"
        ) from None
    if first is None:
        raise VideoUnavailable(f"{env.spec.id if env.spec else env} does not render images (no rgb_array mode)")
    frames = [first]
    done = False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(actor.act(obs, deterministic=True))
        frames.append(env.render())
        done = terminated or truncated
        actor.observe(reward, done)  # a recurrent policy reads the reward
    images = [Image.fromarray(f) for f in frames]
    path = Path(path)
    with writing(path), atomic_open(path, "wb") as f:
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
