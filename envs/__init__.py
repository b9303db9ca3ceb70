"""Task-distribution environments for metarl, registered with gymnasium under ``metarl/``.

Importing ``envs`` registers every family, so ``gymnasium.make("metarl/HalfCheetahVel-v0")``
works; ``envs.vector.make_task_vector_env`` steps a family as a batch of envs with different
tasks. Every env implements ``sample_tasks(n)``, ``set_task(task)`` and ``get_task()``
(``envs.base``).
"""

from __future__ import annotations

import gymnasium as gym

from envs.metaworld_tasks import METAWORLD_ENVS

NAMESPACE = "metarl"

# name -> (entry point, vector entry point or None, max_episode_steps)
# MuJoCo horizons: 200 as in the MAML paper (later reproductions use 100: pass max_episode_steps).
FAMILIES: dict[str, tuple[str, str | None, int]] = {
    "Navigation2D": ("envs.navigation:Navigation2DEnv", "envs.navigation:Navigation2DVectorEnv", 100),
    "HalfCheetahVel": ("envs.locomotion:HalfCheetahVelEnv", None, 200),
    "HalfCheetahDir": ("envs.locomotion:HalfCheetahDirEnv", None, 200),
    "AntVel": ("envs.locomotion:AntVelEnv", None, 200),
    "AntDir": ("envs.locomotion:AntDirEnv", None, 200),
    "AntDir2D": ("envs.locomotion:AntDir2DEnv", None, 200),
    "AntGoal": ("envs.locomotion:AntGoalEnv", None, 200),
    "HalfCheetahRandParams": ("envs.rand_params:HalfCheetahRandParamsEnv", None, 200),
    "HopperRandParams": ("envs.rand_params:HopperRandParamsEnv", None, 200),
    "Walker2dRandParams": ("envs.rand_params:Walker2dRandParamsEnv", None, 200),
}
# Meta-World ML1 / ML10 / ML45 (horizon 500, Meta-World's): metarl/MetaWorld-ML1-v0 etc.
FAMILIES.update(METAWORLD_ENVS)


def register_all() -> None:
    """Register every family as ``metarl/<Name>-v0`` (idempotent)."""
    for name, (entry_point, vector_entry_point, horizon) in FAMILIES.items():
        env_id = f"{NAMESPACE}/{name}-v0"
        if env_id not in gym.registry:
            gym.register(
                id=env_id, entry_point=entry_point, vector_entry_point=vector_entry_point, max_episode_steps=horizon
            )


register_all()
