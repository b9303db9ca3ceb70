"""RL^2 (Duan et al., 2016; Wang et al., 2016): a recurrent policy trained with PPO on whole trials.

The learner is the network: :class:`agents.recurrent_policy.RecurrentGaussianPolicy` reads the
observation, the previous action, reward and done flag, and its state runs through a trial of
``K`` episodes of one task. Nothing adapts by gradient: adapting to a task is running the trial.
Meta-training maximises the return of the whole trial, so exploring in the first episodes pays
when it raises the return of the later ones.

One meta-iteration (the experiment samples ``meta_batch_size`` tasks x ``E / K`` trials each)::

    sequences = trials laid out episode after episode (metarl.rl.trials.trial_sequences)
    V, log pi_old = the policy's forward over every trial (no gradient)
    A = GAE over each trial as one episode (gamma, lambda), returns G = A + V
    for epoch in 1..epochs, for each minibatch of trials (shuffled):
        r   = exp(log pi(a | h) - log pi_old(a | h))
        L   = -mean min(r A, clip(r, 1 - eps, 1 + eps) A) + c_v mean (V(h) - G)^2 - c_e mean H[pi(. | h)]
        Adam step on L (gradient norm clipped), back-propagated through the whole trial

``A`` is normalised over the meta-batch's real steps (``normalize_advantages``). Means run over the
real steps of the minibatch. The value head predicts ``G`` standardised by running statistics of
the returns seen so far (kept in the checkpoint): the policy and value share the recurrent
network, and raw trial returns in the hundreds would make the value error swamp its gradient.

Defaults as garage's RL2PPO for Meta-World ML10 (its ``rl2_ppo_metaworld_ml10.py``): GRU of 256,
``K = 10``, gamma 0.99, lambda 0.95, clip 0.2, Adam 5e-4, 10 epochs. Garage fits a separate MLP
baseline on observations; here the value head reads the recurrent state, as in Wang et al.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from metarl.core.functional import Params
from metarl.core.learner import Learner, register
from metarl.rl.objective import RLBatch, clipped_surrogate
from metarl.rl.trials import trial_gae, trial_sequences


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean((values - masked_mean(values, mask)) ** 2, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(G - V) / Var(G)`` over the real steps: 1 for a perfect value head, 0 for a constant one."""
    return float(1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-12))


class RL2(Learner):
    """RL^2 with PPO on trials of ``episodes_per_trial`` episodes.

    Args:
        policy: a recurrent policy (``policy.recurrent``), updated in place.
        episodes_per_trial: ``K``, the episodes of one trial.
        gamma, gae_lambda: the advantage estimator over a trial.
        lr, epochs, minibatches, clip, value_coef, entropy_coef, max_grad_norm: PPO.
        normalize_advantages: standardise the advantages over the meta-batch.
        seed: seeds the minibatch order (with the iteration), so a resumed run repeats it.
    """

    uses_query = True
    first_order = True

    def __init__(
        self,
        policy: nn.Module,
        *,
        episodes_per_trial: int,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        lr: float = 5e-4,
        epochs: int = 10,
        minibatches: int = 1,
        clip: float = 0.2,
        value_coef: float = 0.5,
        entropy_coef: float = 0.0,
        max_grad_norm: float = 0.5,
        normalize_advantages: bool = True,
        seed: int = 0,
    ) -> None:
        if not getattr(policy, "recurrent", False):
            raise ValueError(
                f"RL^2 needs a recurrent policy (policy.recurrent: gru or lstm), got {type(policy).__name__}"
            )
        if episodes_per_trial < 1 or epochs < 1 or minibatches < 1:
            raise ValueError(
                f"episodes_per_trial, epochs and minibatches must be >= 1, got {episodes_per_trial}, {epochs}, "
                f"{minibatches}"
            )
        self.model = self.policy = policy
        self.objective = None
        self.inner_lrs = []
        self.episodes_per_trial = episodes_per_trial
        self.gamma, self.gae_lambda = gamma, gae_lambda
        self.epochs, self.minibatches, self.clip = epochs, minibatches, clip
        self.value_coef, self.entropy_coef, self.max_grad_norm = value_coef, entropy_coef, max_grad_norm
        self.normalize_advantages = normalize_advantages
        self.seed = seed
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=lr, eps=1e-5)
        # the value head predicts returns standardised by these running statistics (trial returns of
        # hundreds would otherwise swamp the shared network's gradient); updated once per iteration
        self.return_mean, self.return_var, self.return_count = 0.0, 1.0, 0.0

    def adapt(self, params: Params, support: Any, **_: Any) -> Params:
        """RL^2 adapts by running the trial (its state), not by gradient: the parameters stay."""
        return dict(params)

    # -- the trials' inputs and targets -------------------------------------------------------
    def prepare(self, batch: RLBatch) -> dict[str, torch.Tensor]:
        """The validation episodes' trials with inputs, old log-probs, values, advantages and returns ``[B, T]``."""
        seqs = trial_sequences(batch.valid.episodes, self.episodes_per_trial)
        policy = self.policy
        x = policy.inputs(seqs.observations, seqs.prev_actions, seqs.prev_rewards, seqs.done)
        with torch.no_grad():
            outputs, values = policy.heads(policy.sequence(x))
            old_log_probs = policy.distribution(outputs).log_prob(seqs.actions)
        mask = seqs.mask
        values = (values * math.sqrt(self.return_var) + self.return_mean) * mask  # in return units
        advantages = trial_gae(seqs.rewards, values, mask, gamma=self.gamma, gae_lambda=self.gae_lambda)
        returns = advantages + values
        self._update_return_statistics(returns, mask)
        if self.normalize_advantages:
            mean = masked_mean(advantages, mask)
            std = torch.sqrt(masked_mean((advantages - mean) ** 2, mask))
            advantages = (advantages - mean) / (std + 1e-8) * mask
        return {
            "inputs": x,
            "actions": seqs.actions,
            "mask": mask,
            "old_log_probs": old_log_probs,
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "targets": (returns - self.return_mean) / math.sqrt(self.return_var) * mask,
        }

    def _update_return_statistics(self, returns: torch.Tensor, mask: torch.Tensor) -> None:
        """Fold this batch's returns (real steps) into the running mean and variance (Chan et al.'s merge)."""
        count = float(mask.sum())
        if count == 0:
            return
        mean = float(masked_mean(returns, mask))
        var = float(masked_var(returns, mask))
        total = self.return_count + count
        delta = mean - self.return_mean
        m2 = self.return_var * self.return_count + var * count + delta**2 * self.return_count * count / total
        self.return_mean += delta * count / total
        self.return_var = max(m2 / total, 1e-8)
        self.return_count = total

    def losses(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PPO's losses of ``data`` (a minibatch of :meth:`prepare`'s trials), scalars."""
        policy = self.policy
        outputs, values = policy.heads(policy.sequence(data["inputs"]))
        dist = policy.distribution(outputs)
        log_probs = dist.log_prob(data["actions"])
        mask = data["mask"]
        clipped, ratio = clipped_surrogate(log_probs, data["old_log_probs"], data["advantages"], self.clip)
        policy_loss = masked_mean(clipped, mask)
        value_loss = masked_mean((values - data["targets"]) ** 2, mask)  # standardised units
        entropy = masked_mean(dist.entropy(), mask)
        total = policy_loss + self.value_coef * value_loss - self.entropy_coef * entropy
        with torch.no_grad():
            approx_kl = masked_mean(data["old_log_probs"] - log_probs, mask)
            clip_fraction = masked_mean(((ratio - 1).abs() > self.clip).to(mask.dtype), mask)
        return {
            "loss": total,
            "loss/policy": policy_loss,
            "loss/value": value_loss,
            "entropy": entropy,
            "approx_kl": approx_kl,
            "clip_fraction": clip_fraction,
        }

    def step(self, batch: RLBatch, iteration: int) -> dict[str, float]:
        data = self.prepare(batch)
        trials = data["mask"].shape[0]
        size = math.ceil(trials / min(self.minibatches, trials))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        sums: dict[str, float] = {}
        updates = 0
        params = [p for p in self.policy.parameters() if p.requires_grad]
        for _ in range(self.epochs):
            order = torch.randperm(trials, generator=generator).to(data["mask"].device)
            for lo in range(0, trials, size):
                index = order[lo : lo + size]
                losses = self.losses({k: v[index] for k, v in data.items()})
                self.optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                grad_norm = nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                self.optimizer.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                updates += 1
        metrics = {k: v / updates for k, v in sums.items() if k != "loss"}
        metrics["explained_variance"] = explained_variance(data["values"], data["returns"], data["mask"])
        metrics["updates"] = updates
        return metrics

    def state_dict(self) -> dict[str, Any]:
        stats = torch.tensor([self.return_mean, self.return_var, self.return_count], dtype=torch.float64)
        return {"optimizer": self.optimizer.state_dict(), "return_statistics": stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "return_statistics" in state:
            self.return_mean, self.return_var, self.return_count = (float(x) for x in state["return_statistics"])


@register("rl2", family="rl")
def build_rl2(cfg: Any, policy: nn.Module, objective: Any) -> RL2:
    p = cfg.ppo
    return RL2(
        policy,
        episodes_per_trial=cfg.episodes_per_trial,
        gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda,
        lr=p.lr,
        epochs=p.epochs,
        minibatches=p.minibatches,
        clip=p.clip,
        value_coef=p.value_coef,
        entropy_coef=p.entropy_coef,
        max_grad_norm=p.max_grad_norm,
        normalize_advantages=cfg.normalize_advantages,
        seed=cfg.seed,
    )
