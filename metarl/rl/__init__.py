"""RL data: episodes, advantages, value baselines, samplers (in-process and Ray)."""
