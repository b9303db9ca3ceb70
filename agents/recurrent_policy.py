"""RL^2's policy: a GRU (or LSTM) that reads the observation, the previous action, reward and done flag.

Duan et al. (2016) and Wang et al. (2016) make the learner itself recurrent. At step ``t`` of a
*trial* (``K`` consecutive episodes of one task) the network reads::

    x_t = [obs_t, a_{t-1}, r_{t-1}, d_{t-1}]          (zeros at the trial's first step)

where ``d_{t-1} = 1`` when step ``t`` is the first step of a new episode of the trial (the previous
step ended one). Its state ``h`` is carried across the trial's episodes and reset only between
trials, so what it learnt about the task in episode ``k`` acts in episode ``k + 1``: adapting is
the forward pass.

Heads on the hidden state ``h_t`` (the state after reading ``x_t``): the mean of a diagonal
Gaussian over actions (a state-independent ``log_std``, as the MLP policies of :mod:`agents.policies`)
and a value ``V(h_t)`` for PPO's advantages.

Two ways to run the same network:

- :meth:`RecurrentGaussianPolicy.sequence`: whole trials ``[B, T, ...]`` through ``torch.nn.GRU`` /
  ``LSTM`` (the learner; back-propagation through the whole trial);
- :meth:`RecurrentGaussianPolicy.cell`: one step for many envs with explicit, optionally per-task
  parameters ``{name: [N, ...]}`` (the sampler), written out from PyTorch's GRU / LSTM equations
  with the same weight layout; the tests check it against ``torch.nn.GRU`` / ``LSTM``.

Shapes: ``obs_dim``, ``act_dim``; ``input_dim = obs_dim + act_dim + 2``; the state is
``[..., state_dim]`` with ``state_dim = hidden_size`` (GRU) or ``2 * hidden_size`` (LSTM: ``h``
then ``c``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

CELLS = ("gru", "lstm")


class RecurrentGaussianPolicy(nn.Module):
    """A one-layer GRU or LSTM over ``[obs, prev action, prev reward, done]`` with Gaussian and value heads.

    Args:
        obs_dim, act_dim: observation and action sizes.
        hidden_size: width of the recurrent state.
        cell: ``"gru"`` (default) or ``"lstm"``.
        init_std, min_std: initial and smallest standard deviation of the Gaussian.
    """

    discrete = False
    recurrent = True

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        *,
        hidden_size: int = 256,
        cell: str = "gru",
        init_std: float = 1.0,
        min_std: float = 1e-6,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        if obs_dim < 1 or act_dim < 1 or hidden_size < 1:
            raise ValueError(f"sizes must be >= 1, got obs_dim={obs_dim}, act_dim={act_dim}, hidden_size={hidden_size}")
        if not init_std > 0 or not min_std > 0:
            raise ValueError(f"init_std and min_std must be > 0, got {init_std} and {min_std}")
        self.obs_dim, self.act_dim, self.hidden_size, self.cell_type = obs_dim, act_dim, hidden_size, cell
        self.input_dim = obs_dim + act_dim + 2
        self.state_dim = hidden_size * (2 if cell == "lstm" else 1)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(self.input_dim, hidden_size, batch_first=True)
        self.out = nn.Linear(hidden_size, act_dim)
        self.value = nn.Linear(hidden_size, 1)
        for layer in (self.out, self.value):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.min_log_std = float(torch.log(torch.tensor(min_std)))
        self.log_std = nn.Parameter(torch.full((act_dim,), float(torch.log(torch.tensor(init_std)))))

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    # -- inputs and state ----------------------------------------------------------------------
    @staticmethod
    def inputs(
        obs: torch.Tensor, prev_action: torch.Tensor, prev_reward: torch.Tensor, done: torch.Tensor
    ) -> torch.Tensor:
        """``[..., input_dim]`` from ``obs [..., obs_dim]``, ``prev_action [..., act_dim]``,
        ``prev_reward [...]`` and ``done [...]``."""
        return torch.cat([obs, prev_action, prev_reward.unsqueeze(-1), done.unsqueeze(-1)], dim=-1)

    def initial_state(self, *shape: int) -> torch.Tensor:
        """The state at a trial's start: zeros ``[*shape, state_dim]``."""
        return torch.zeros(*shape, self.state_dim)

    # -- one step, explicit (per-task) parameters: the sampler ---------------------------------
    def cell(self, x: torch.Tensor, state: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The state after reading ``x``: ``x [N, B, input_dim]``, ``state [N, B, state_dim]`` with
        per-task parameters ``{name: [N, ...]}`` (one batched matmul per task)."""
        w_ih, w_hh = params["rnn.weight_ih_l0"], params["rnn.weight_hh_l0"]
        b_ih, b_hh = params["rnn.bias_ih_l0"], params["rnn.bias_hh_l0"]
        size = self.hidden_size
        h = state[..., :size]
        gi = torch.baddbmm(b_ih.unsqueeze(1), x, w_ih.transpose(1, 2))  # [N, B, G * size]
        gh = torch.baddbmm(b_hh.unsqueeze(1), h, w_hh.transpose(1, 2))
        if self.cell_type == "gru":  # gates r, z, n (torch.nn.GRU's layout and equations)
            r = torch.sigmoid(gi[..., :size] + gh[..., :size])
            z = torch.sigmoid(gi[..., size : 2 * size] + gh[..., size : 2 * size])
            n = torch.tanh(gi[..., 2 * size :] + r * gh[..., 2 * size :])
            return n + z * (h - n)  # (1 - z) n + z h
        c = state[..., size:]  # LSTM: gates i, f, g, o
        g = gi + gh
        i, f = torch.sigmoid(g[..., :size]), torch.sigmoid(g[..., size : 2 * size])
        cand, o = torch.tanh(g[..., 2 * size : 3 * size]), torch.sigmoid(g[..., 3 * size :])
        c_new = f * c + i * cand
        return torch.cat([o * torch.tanh(c_new), c_new], dim=-1)

    def outputs_of_state(
        self, state: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_std)``, both ``[..., act_dim]``, from states ``[..., state_dim]`` (per-task
        parameters ``[N, ...]`` with states ``[N, B, state_dim]``)."""
        params = self.params() if params is None else params
        h = state[..., : self.hidden_size]
        weight, bias = params["out.weight"], params["out.bias"]
        if weight.dim() == 3:
            mean = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            log_std = params["log_std"].unsqueeze(1)
        else:
            mean = torch.nn.functional.linear(h, weight, bias)
            log_std = params["log_std"]
        log_std = log_std.clamp(min=self.min_log_std)
        return mean, log_std.expand_as(mean).contiguous()

    # -- whole trials, the module's own parameters: the learner -------------------------------
    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states ``h_t`` ``[B, T, hidden_size]`` of trials ``x [B, T, input_dim]`` from the
        initial state (steps after a trial's end may follow; they do not affect earlier ones)."""
        hidden, _ = self.rnn(x)
        return hidden

    def heads(self, hidden: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``((mean, log_std), value)`` of hidden states ``[..., hidden_size]``.

        Shapes: ``[..., act_dim]`` twice, and ``[...]``."""
        outputs = self.outputs_of_state(hidden)
        return outputs, self.value(hidden).squeeze(-1)

    # -- distribution and sampling noise (as the Gaussian MLP policy) -------------------------
    @staticmethod
    def distribution(outputs: tuple[torch.Tensor, ...]) -> Distribution:
        mean, log_std = outputs
        return Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)

    def noise(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """Standard normal draws ``[*shape, act_dim]``."""
        return torch.randn(*shape, self.act_dim, generator=generator)

    @staticmethod
    def actions_from_noise(dist: Distribution, noise: torch.Tensor, *, deterministic: bool = False) -> torch.Tensor:
        return dist.mean if deterministic else dist.mean + dist.stddev * noise
