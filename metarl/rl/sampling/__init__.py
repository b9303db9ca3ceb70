"""Episode samplers: :class:`VectorSampler` in-process, :class:`RaySampler` over Ray rollout actors."""

from metarl.rl.sampling.ray_sampler import RaySampler, init_ray
from metarl.rl.sampling.vector import VectorSampler, task_seeds

__all__ = ["RaySampler", "VectorSampler", "init_ray", "task_seeds"]
