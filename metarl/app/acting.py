"""Acting with a policy module and a parameter dict: the meta-policy of a run and an adapted policy
(:mod:`metarl.app.adapt`) share it. Feed-forward policies map an observation to an env action;
a recurrent (RL^2) policy also carries its trial state between calls."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from metarl.rl.actions import env_actions


class Acting:
    """``act(obs)`` for a policy module and parameter dict (numpy in, numpy out); for a recurrent
    policy (RL^2) also ``observe(reward, done)`` after each env step, and its trial ``context``."""

    policy: torch.nn.Module
    params: dict[str, torch.Tensor]
    context: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Env action(s) for an observation ``[obs_dim]`` or a batch ``[B, obs_dim]``; continuous
        actions are clipped to the action space, or mapped onto it with the run's ``action_scale``.
        A recurrent policy takes one observation at a time and moves its state."""
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
        if getattr(self.policy, "recurrent", False):
            action = self._act_recurrent(x, deterministic)
        else:
            dist = self.policy(x, self.params)
            if deterministic:
                action = dist.mean if not self.policy.discrete else dist.probs.argmax(-1)
            else:
                action = dist.sample()
        action = action.numpy()
        space = self.action_space
        if isinstance(space, gym.spaces.Box):
            action = env_actions(action, space.low, space.high, self.cfg.action_scale).astype(space.dtype)
        return action

    def _act_recurrent(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        if obs.dim() != 1:
            raise ValueError(f"a recurrent policy acts on one observation [obs_dim] at a time, got {tuple(obs.shape)}")
        policy, c = self.policy, self._context()
        params = {k: v.unsqueeze(0) for k, v in self.params.items()}
        x = policy.inputs(obs, c["prev_action"], c["prev_reward"], c["done"]).view(1, 1, -1)
        state = policy.cell(x, c["state"].view(1, 1, -1), params)
        dist = policy.distribution(policy.outputs_of_state(state, params))
        action = (dist.mean if deterministic else dist.sample()).view(-1)
        self.context = {**c, "state": state.view(-1), "prev_action": action, "done": torch.tensor(0.0)}
        return action

    def observe(self, reward: float, done: bool = False) -> None:
        """RL^2: the reward of the last action, and whether the episode ended (the next ``act`` starts
        the trial's next episode). Feed-forward policies ignore it."""
        if getattr(self.policy, "recurrent", False):
            c = self._context()
            self.context = {**c, "prev_reward": torch.tensor(float(reward)), "done": torch.tensor(float(bool(done)))}

    def _context(self) -> dict[str, torch.Tensor]:
        if self.context is None:  # a trial's start
            p = self.policy
            self.context = {
                "state": p.initial_state(),
                "prev_action": torch.zeros(p.act_dim),
                "prev_reward": torch.tensor(0.0),
                "done": torch.tensor(0.0),
            }
        return self.context
