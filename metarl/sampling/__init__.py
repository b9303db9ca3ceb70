"""Episode samplers: :class:`VectorSampler` in-process, :class:`RaySampler` over Ray rollout actors."""

from metarl.sampling.ray_sampler import RaySampler, init_ray
from metarl.sampling.vector import VectorSampler, task_seeds

__all__ = ["RaySampler", "VectorSampler", "init_ray", "task_seeds"]
