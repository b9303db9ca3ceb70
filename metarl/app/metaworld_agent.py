"""A run's meta-policy as Meta-World's ``MetaLearningAgent``, scored by Meta-World's own evaluation.

Metaworld 3.x defines how a meta-learner is scored (``metaworld.evaluation.metalearning_evaluation``)
and the protocol an agent follows: ``init()`` at each new set of test tasks, ``adapt_action(obs)``
and ``step(timestep)`` while it collects adaptation episodes, ``adapt()`` after each batch of
them, then ``eval_action(obs)`` and ``reset(env_mask)`` in the evaluation episodes. The vector
env holds one task per sub-env. ``metarl.load(run_dir).metaworld_agent()`` gives:

- :class:`GradientAgent` for the gradient-based meta-learners (MAML-TRPO, FOMAML, Reptile, ProMP):
  the adaptation episodes of each sub-env, with the run's linear-baseline advantages, are one
  inner step of the run's own inner loop (``adapt()`` = one step, from the parameters of the last
  one); actions are sampled while adapting and the Gaussian's mean in evaluation.
- :class:`RecurrentAgent` for RL^2: the trial runs through adaptation and evaluation, the state
  never reset (``reset`` marks an episode's end: the next step reads done = 1); ``adapt()`` does
  nothing. In evaluation Meta-World hands the agent no rewards, so its envs must carry the previous
  reward in the observation (``recurrent_info_in_obs=True``: Meta-World's ``RNNBasedMetaRLWrapper``);
  the agent reads the env's own 39 observation floats and that reward, keeps its previous action
  itself, and at the first step of an episode uses the last reward it saw (the wrapper's reset
  observation carries none; the final reward of the episode before is the one input it cannot
  know).
- :class:`InferenceAgent` for PEARL: each sub-env starts with ``z`` drawn from the prior; its
  transitions ``(s, a, r)`` collect as context, and at the end of each adaptation episode its ``z``
  is drawn again from the posterior of all of them (the paper's online inference); ``adapt()`` sets
  ``z`` to the posterior mean, with which evaluation acts deterministically (``tanh`` of the mean).

:mod:`metarl.app.metaworld_eval` builds Meta-World's vector envs of a run and scores it with
``metalearning_evaluation``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agents.pearl import actor_params_for_tasks
from metarl.core.functional import inner_lrs
from metarl.rl.actions import ActionMap
from metarl.rl.advantages import compute_advantages
from metarl.rl.episodes import Episodes
from metarl.rl.objective import StepData
from metarl.rl.value_baselines import LinearFeatureBaseline

OBS_DIM = 39  # Meta-World's observation


class _Agent:
    def __init__(self, meta: Any, *, seed: int = 0) -> None:
        self.meta, self.cfg, self.policy = meta, meta.cfg, meta.policy
        self.theta = {k: v.detach() for k, v in meta.params.items()}
        space = meta.action_space
        self.action_map = ActionMap(space.low, space.high, self.cfg.action_scale)
        self.generator = torch.Generator().manual_seed(seed)

    def _env_actions(self, actions: torch.Tensor) -> np.ndarray:
        return self.action_map(actions.numpy().astype(np.float32)).astype(np.float64)


class GradientAgent(_Agent):
    """MAML-family agent: ``adapt()`` is one inner step on the episodes collected since the last one."""

    def init(self) -> None:
        self.params: dict[str, torch.Tensor] | None = None  # per sub-env [N, ...] once adapted
        self.steps: list[StepData] = []
        self._clear()

    def _clear(self) -> None:
        self.buffer: dict[str, list[np.ndarray]] = {"obs": [], "act": [], "rew": [], "term": [], "trunc": []}

    def _params(self, n: int) -> dict[str, torch.Tensor]:
        if self.params is None:
            return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in self.theta.items()}
        return self.params

    @torch.no_grad()
    def _dist(self, observations: np.ndarray):
        obs = torch.as_tensor(np.asarray(observations)[:, :OBS_DIM], dtype=torch.float32)
        return self.policy(obs.unsqueeze(1), self._params(len(obs)))  # [N, 1, ...]: one step per sub-env

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        dist = self._dist(observations)
        noise = torch.randn(dist.mean.shape, generator=self.generator)
        actions = (dist.mean + dist.stddev * noise)[:, 0]
        return self._env_actions(actions), {"policy_actions": actions.numpy()}

    def step(self, timestep: Any) -> None:
        b = self.buffer
        b["obs"].append(np.asarray(timestep.observation)[:, :OBS_DIM])
        b["act"].append(np.asarray(timestep.aux_policy_outputs["policy_actions"]))
        b["rew"].append(np.asarray(timestep.reward, dtype=np.float64))
        b["term"].append(np.asarray(timestep.terminated, dtype=bool))
        b["trunc"].append(np.asarray(timestep.truncated, dtype=bool))

    def adapt(self) -> None:
        """One inner step of every sub-env's policy on its episodes since the last ``adapt``."""
        episodes = _episodes_of(self.buffer)
        cfg = self.cfg
        advantages = compute_advantages(
            episodes,
            LinearFeatureBaseline(),
            gamma=cfg.gamma,
            gae_lambda=cfg.gae_lambda,
            normalize=cfg.normalize_advantages,
            bootstrap_truncated=cfg.bootstrap_truncated,
        )
        self.steps.append(StepData(episodes, advantages, cfg.loss_average))
        learner = self.meta.experiment.learner
        with torch.no_grad():
            self.params = learner.adapt(
                self.theta, self.steps, lrs=inner_lrs(cfg.inner.lr, len(self.steps)), first_order=True
            )
        self._clear()

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        return self._env_actions(self._dist(observations).mean[:, 0])

    def reset(self, env_mask: np.ndarray) -> None:
        pass  # nothing carries over between a feed-forward policy's episodes


def _episodes_of(buffer: dict[str, list[np.ndarray]]) -> Episodes:
    """The collected steps ``[T, N]`` as :class:`Episodes` ``[N, H, E]``: each sub-env's completed
    episodes in order (E: the fewest any sub-env completed; H: the longest episode)."""
    obs, act = np.stack(buffer["obs"]), np.stack(buffer["act"])  # [T, N, ...]
    rew, term, trunc = np.stack(buffer["rew"]), np.stack(buffer["term"]), np.stack(buffer["trunc"])
    n = rew.shape[1]
    spans = []  # per sub-env: (start, end, terminated) of each completed episode
    for i in range(n):
        ends = np.flatnonzero(term[:, i] | trunc[:, i])
        starts = np.concatenate([[0], ends[:-1] + 1])
        spans.append([(int(s), int(e) + 1, bool(term[e, i])) for s, e in zip(starts, ends)])
    e = min(len(s) for s in spans)
    if e == 0:
        raise ValueError("adapt() needs at least one completed episode in every sub-env")
    h = max(end - start for s in spans for start, end, _ in s[:e])
    out = {
        "observations": np.zeros((n, h, e, obs.shape[-1]), np.float32),
        "actions": np.zeros((n, h, e, act.shape[-1]), np.float32),
        "rewards": np.zeros((n, h, e), np.float32),
        "mask": np.zeros((n, h, e), np.float32),
    }
    terminated = np.zeros((n, e), bool)
    lengths = np.zeros((n, e), np.int64)
    for i in range(n):
        for k, (start, end, ended) in enumerate(spans[i][:e]):
            length = end - start
            out["observations"][i, :length, k] = obs[start:end, i]
            out["actions"][i, :length, k] = act[start:end, i]
            out["rewards"][i, :length, k] = rew[start:end, i]
            out["mask"][i, :length, k] = 1.0
            terminated[i, k], lengths[i, k] = ended, length
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    return Episodes(
        observations=tensors["observations"],
        actions=tensors["actions"],
        rewards=tensors["rewards"],
        log_probs=torch.zeros(n, h, e),  # the inner loss (REINFORCE) does not use them
        mask=tensors["mask"],
        final_observations=torch.zeros(n, e, obs.shape[-1]),
        terminated=torch.from_numpy(terminated),
        lengths=torch.from_numpy(lengths),
    ).check()


class RecurrentAgent(_Agent):
    """RL^2 agent: one trial through adaptation and evaluation (see the module docstring)."""

    def init(self) -> None:
        self.state: torch.Tensor | None = None

    def _start(self, n: int) -> None:
        p = self.policy
        self.state = p.initial_state(n, 1)
        self.prev_action = torch.zeros(n, 1, p.act_dim)
        self.prev_reward = torch.zeros(n, 1)
        self.done = torch.zeros(n, 1)

    @torch.no_grad()
    def _act(self, observations: np.ndarray, deterministic: bool) -> np.ndarray:
        observations = np.asarray(observations)
        n = len(observations)
        if self.state is None:
            self._start(n)
        p = self.policy
        obs = torch.as_tensor(observations[:, :OBS_DIM], dtype=torch.float32).unsqueeze(1)
        params = {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in self.theta.items()}
        x = p.inputs(obs, self.prev_action, self.prev_reward, self.done)
        self.state = p.cell(x, self.state, params)
        dist = p.distribution(p.outputs_of_state(self.state, params))
        if deterministic:
            actions = dist.mean
        else:
            actions = dist.mean + dist.stddev * torch.randn(dist.mean.shape, generator=self.generator)
        self.prev_action = actions
        self.done = torch.zeros_like(self.done)
        return self._env_actions(actions[:, 0])

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self._act(observations, deterministic=False), {}

    def step(self, timestep: Any) -> None:
        self.prev_reward = torch.as_tensor(np.asarray(timestep.reward), dtype=torch.float32).view(-1, 1)
        ended = np.logical_or(timestep.terminated, timestep.truncated)
        self.done[torch.from_numpy(np.asarray(ended))] = 1.0

    def adapt(self) -> None:
        pass  # adapting is the state the trial has built

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        observations = np.asarray(observations)
        if self.state is not None and observations.shape[1] > OBS_DIM + self.policy.act_dim:
            # RNNBasedMetaRLWrapper: [obs, previous action, previous reward / 10, done]; its reset
            # observation holds zeros, so at an episode's first step keep the last reward seen
            seen = torch.as_tensor(observations[:, OBS_DIM + self.policy.act_dim], dtype=torch.float32) * 10.0
            inside = self.done[:, 0] == 0
            self.prev_reward[inside, 0] = seen[inside]
        return self._act(observations, deterministic=True)

    def reset(self, env_mask: np.ndarray) -> None:
        if self.state is not None:
            self.done[torch.from_numpy(np.asarray(env_mask, dtype=bool))] = 1.0


class InferenceAgent(_Agent):
    """PEARL agent: ``z`` inferred from each sub-env's transitions (see the module docstring)."""

    def init(self) -> None:
        self.z: torch.Tensor | None = None
        self.contexts: list[list[torch.Tensor]] = []

    def _start(self, n: int) -> None:
        exp = self.meta.experiment
        if exp.agent.next_obs_in_context:
            raise ValueError("the Meta-World agent of PEARL needs (s, a, r) context: pearl.next_obs_in_context is true")
        self.z = torch.randn(n, exp.agent.latent_dim, generator=self.generator)
        self.contexts = [[] for _ in range(n)]

    @torch.no_grad()
    def _dist(self, observations: np.ndarray):
        observations = np.asarray(observations)
        if self.z is None:
            self._start(len(observations))
        exp = self.meta.experiment
        actor = {k: v.detach().cpu() for k, v in exp.agent.actor.params().items()}
        params = actor_params_for_tasks(actor, self.z, exp.obs_dim)
        obs = torch.as_tensor(observations[:, :OBS_DIM], dtype=torch.float32)
        return self.policy(obs.unsqueeze(1), params)  # [N, 1, ...]

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        dist = self._dist(observations)
        actions = dist.from_noise(torch.randn(dist.loc.shape, generator=self.generator))[:, 0]
        return self._env_actions(actions), {"policy_actions": actions.numpy()}

    def _posterior(self, i: int, *, mean: bool) -> torch.Tensor:
        exp = self.meta.experiment
        context = torch.stack(self.contexts[i]) if self.contexts[i] else None
        if mean:
            return exp.posterior_mean(context)
        return exp.latents([context], self.generator)[0]

    def step(self, timestep: Any) -> None:
        obs = torch.as_tensor(np.asarray(timestep.observation)[:, :OBS_DIM], dtype=torch.float32)
        actions = torch.as_tensor(np.asarray(timestep.aux_policy_outputs["policy_actions"]), dtype=torch.float32)
        rewards = torch.as_tensor(np.asarray(timestep.reward), dtype=torch.float32).view(-1, 1)
        rows = torch.cat([obs, actions, rewards], dim=1)
        for i, row in enumerate(rows):
            self.contexts[i].append(row)
        ended = np.flatnonzero(np.logical_or(timestep.terminated, timestep.truncated))
        for i in ended:
            self.z[i] = self._posterior(int(i), mean=False)

    def adapt(self) -> None:
        for i in range(len(self.contexts)):
            self.z[i] = self._posterior(i, mean=True)

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        return self._env_actions(self._dist(observations).mean[:, 0])

    def reset(self, env_mask: np.ndarray) -> None:
        pass  # z stays what adaptation inferred


def default_adaptation_steps(meta: Any) -> int:
    """Meta-World's ``adaptation_steps`` for a run: its inner steps; 1 for RL^2 and PEARL (one batch
    of adaptation episodes, the adapting done online)."""
    exp = meta.experiment
    return 1 if exp.trials or hasattr(exp, "infer") else meta.cfg.inner.steps


def agent_of(meta: Any, *, seed: int = 0) -> GradientAgent | RecurrentAgent | InferenceAgent:
    """The Meta-World agent of a loaded run (:func:`metarl.app.adapt.load`)."""
    if not meta.cfg.family.startswith("MetaWorld"):
        raise ValueError(f"metaworld_agent() needs a Meta-World run; this run's family is {meta.cfg.family}")
    if hasattr(meta.experiment, "infer"):
        agent: _Agent = InferenceAgent(meta, seed=seed)
    else:
        agent = RecurrentAgent(meta, seed=seed) if meta.experiment.trials else GradientAgent(meta, seed=seed)
    agent.init()
    return agent
