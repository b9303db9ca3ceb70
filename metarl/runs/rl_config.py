"""The typed config of a meta-RL experiment (``experiments/<family>/<algorithm>.yaml``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from metarl.core.config import ConfigModel, field_error, option
from metarl.runs.algorithm_names import registered_algorithm


class PolicyConfig(ConfigModel):
    hidden: list[int] = option(default_factory=lambda: [64, 64], ge=1, doc="Hidden layer widths of the policy MLP.")
    activation: Literal["tanh", "relu"] = option("tanh", doc="Hidden activation.")
    init_std: float = option(1.0, gt=0, doc="Initial standard deviation of the Gaussian policy.")
    recurrent: Literal["gru", "lstm"] | None = option(
        None,
        doc="RL^2's recurrent policy: a GRU or LSTM over observation, previous action, reward and done flag "
        "(null: the MLP of `hidden`).",
    )
    rnn_size: int = option(256, ge=1, doc="Width of the recurrent policy's state (policy.recurrent).")


class InnerConfig(ConfigModel):
    steps: int = option(
        1, ge=1, doc="Inner policy-gradient steps per task (each on fresh episodes of the adapted policy)."
    )
    lr: float | list[float] = option(
        0.1, gt=0, doc="Inner learning rate: one value, or one per step (the last repeats)."
    )


class TRPOConfig(ConfigModel):
    max_kl: float = option(0.01, gt=0, doc="Trust region: largest mean KL between old and new adapted policies.")
    cg_iterations: int = option(10, ge=1, doc="Conjugate-gradient iterations.")
    cg_damping: float = option(1e-5, ge=0, doc="Damping added to the Fisher-vector products.")
    line_search_steps: int = option(15, ge=1, doc="Backtracking line-search steps.")
    line_search_ratio: float = option(0.8, gt=0, lt=1, doc="Step shrink factor of the line search.")
    fvp_subsample: float = option(
        0.2,
        gt=0,
        le=1,
        doc="Fraction of each task's episodes used for Fisher-vector products: 1 is the exact full-batch product "
        "of the reference implementations; below 1 an approximation of it (faster; the line search still checks "
        "the exact KL).",
    )


class OuterConfig(ConfigModel):
    optimizer: Literal["trpo", "adam"] = option("trpo", doc="Meta-update of maml_trpo / fomaml (maml_trpo needs trpo).")
    lr: float = option(1e-3, gt=0, doc="Adam learning rate (fomaml with optimizer: adam, and promp).")
    epsilon_start: float = option(1.0, gt=0, le=1, doc="Reptile: outer step size at iteration 0.")
    epsilon_end: float = option(0.0, ge=0, le=1, doc="Reptile: outer step size at the last iteration (linear anneal).")
    trpo: TRPOConfig = option(default_factory=TRPOConfig, doc="TRPO meta-update.")


class PPOConfig(ConfigModel):
    lr: float = option(5e-4, gt=0, doc="RL^2: Adam learning rate of PPO.")
    epochs: int = option(10, ge=1, doc="RL^2: passes over the meta-batch's trials per iteration.")
    minibatches: int = option(1, ge=1, doc="RL^2: minibatches of whole trials per pass.")
    clip: float = option(0.2, gt=0, doc="RL^2: PPO's clip range of the probability ratio.")
    value_coef: float = option(0.5, ge=0, doc="RL^2: weight of the value head's squared error.")
    entropy_coef: float = option(0.0, ge=0, doc="RL^2: weight of the entropy bonus.")
    max_grad_norm: float = option(0.5, gt=0, doc="RL^2: gradient-norm clip of each update.")


class ProMPConfig(ConfigModel):
    steps: int = option(5, ge=1, doc="ProMP: Adam steps on the clipped objective per iteration (same samples).")
    clip: float = option(0.3, gt=0, doc="ProMP: clip range of the outer probability ratio.")
    kl_coef: float = option(5e-4, ge=0, doc="ProMP: coefficient of the KL penalty on the inner step.")


class PEARLConfig(ConfigModel):
    latent_dim: int = option(5, ge=1, doc="PEARL: size of the task latent z.")
    hidden: list[int] = option(
        default_factory=lambda: [300, 300, 300], ge=1, doc="PEARL: hidden layers of the actor and the critics (ReLU)."
    )
    encoder_hidden: list[int] = option(
        default_factory=lambda: [200, 200, 200], ge=1, doc="PEARL: hidden layers of the context encoder (ReLU)."
    )
    next_obs_in_context: bool = option(False, doc="PEARL: context transitions (s, a, r, s') instead of (s, a, r).")
    train_tasks: int = option(100, ge=1, doc="PEARL: the fixed training tasks, each with its own replay buffers.")
    initial_steps: int = option(
        2000, ge=0, doc="PEARL: env steps collected per training task before the first update (z from the prior)."
    )
    tasks_per_iteration: int = option(5, ge=1, doc="PEARL: training tasks collected for in each iteration.")
    prior_steps: int = option(
        400, ge=0, doc="PEARL: env steps per collected task with z from the prior (RL and context buffers)."
    )
    posterior_steps: int = option(
        0, ge=0, doc="PEARL: env steps per collected task with z from the posterior (RL and context buffers)."
    )
    extra_rl_steps: int = option(
        600,
        ge=0,
        doc="PEARL: env steps per collected task with z from the posterior, for the RL buffer only (the first "
        "episode of each phase uses the prior, as the paper's code).",
    )
    gradient_steps: int = option(2000, ge=1, doc="PEARL: gradient steps (meta_batch_size tasks each) per iteration.")
    batch_size: int = option(256, ge=1, doc="PEARL: RL transitions per task per gradient step.")
    context_size: int = option(100, ge=1, doc="PEARL: context transitions per task per gradient step.")
    buffer_capacity: int = option(
        100_000, ge=1, doc="PEARL: transitions kept per task in each of the two replay buffers (oldest dropped)."
    )
    checkpoint_buffers: bool = option(
        True,
        doc="PEARL: store the replay buffers in checkpoints (an exact resume; false: smaller checkpoints, a resume "
        "starts with empty buffers and collects initial_steps again).",
    )
    lr: float = option(3e-4, gt=0, doc="PEARL: Adam learning rate of every network.")
    reward_scale: float = option(5.0, gt=0, doc="PEARL: SAC's reward scale (the inverse entropy weight).")
    kl_lambda: float = option(0.1, ge=0, doc="PEARL: weight of KL(q(z|c) || N(0, I)), summed over tasks and dims.")
    tau: float = option(0.005, gt=0, le=1, doc="PEARL: soft-update rate of V's target.")
    policy_mean_reg: float = option(1e-3, ge=0, doc="PEARL: weight of the actor's mean^2 penalty.")
    policy_std_reg: float = option(1e-3, ge=0, doc="PEARL: weight of the actor's log-std^2 penalty.")


class RayConfig(ConfigModel):
    workers: int = option(
        0, ge=0, doc="Ray rollout workers, sampler.physics_threads CPUs each (0: sample in-process, no Ray)."
    )
    address: str | None = option(
        None, doc="Ray cluster to join (auto, HOST:6379, ray://HOST:10001); null: RAY_ADDRESS, else a new local Ray."
    )


class SamplerConfig(ConfigModel):
    batch_physics: bool = option(
        True,
        doc="Step the MuJoCo locomotion families' envs together: physics per env, observations and rewards in "
        "NumPy for all (the same episodes as each env's own step; false: each env's step).",
    )
    physics_threads: int = option(
        1, ge=1, doc="Threads stepping that physics in the sampler (in each Ray worker, which then takes as many CPUs)."
    )


class EvalConfig(ConfigModel):
    num_tasks: int = option(40, ge=1, doc="Held-out tasks of `metarl evaluate`.")
    steps: int = option(3, ge=0, doc="Adaptation steps evaluated: the return after 0..steps steps.")
    episodes_per_task: int | None = option(None, ge=1, doc="Episodes per adaptation step (null: episodes_per_task).")
    every: int = option(0, ge=0, doc="Meta-validate every this many iterations (0: never).")
    val_tasks: int = option(20, ge=1, doc="Tasks of each meta-validation.")


class RLConfig(ConfigModel):
    family: str = option(doc="Task family registered as metarl/<family>-v0 (e.g. Navigation2D, HalfCheetahVel).")
    algorithm: str = option(
        doc="Meta-learner: an algorithm registered for the rl family in agents/ (maml_trpo, fomaml, reptile, "
        "promp, rl2, pearl)."
    )
    num_iterations: int = option(doc="Meta-iterations (meta-updates) to train.", ge=1)
    env: dict[str, Any] = option(
        default_factory=dict, doc="Constructor arguments of the env (e.g. task_name for MetaWorld-ML1)."
    )
    seed: int = option(0, ge=0, doc="Run seed: policy init, tasks and episodes of every iteration.")
    device: Literal["auto", "cpu", "cuda"] = option("auto", doc="Where the learner runs (rollouts always on CPU).")
    threads: int = option(0, ge=0, doc="torch CPU threads of the learner (0: torch's default).")
    meta_batch_size: int = option(20, ge=1, doc="Tasks per meta-update.")
    episodes_per_task: int = option(20, ge=1, doc="Episodes per task for each inner step and for validation.")
    horizon: int | None = option(None, ge=1, doc="Episode length (null: the family's registered horizon).")
    episodes_per_trial: int = option(
        1,
        ge=1,
        doc="RL^2: episodes of one trial, the recurrent state carried across them (episodes_per_task is a "
        "multiple: that many trials per task). 1 for the other algorithms.",
    )
    gamma: float = option(0.99, ge=0, le=1, doc="Discount factor.")
    gae_lambda: float = option(1.0, ge=0, le=1, doc="GAE lambda (1: Monte-Carlo returns minus the baseline).")
    normalize_advantages: bool = option(True, doc="Normalise advantages per task.")
    bootstrap_truncated: bool = option(
        False,
        doc="false: the horizon is part of the task (finite-horizon objective, as MAML and pytorch-maml-rl): no "
        "value follows an episode's last step. true: the horizon is a time limit outside the task: episodes cut "
        "by it bootstrap with the baseline's value, fitted to bootstrapped returns.",
    )
    loss_average: Literal["steps", "episodes"] = option(
        "steps",
        doc="Task mean of the losses and KL: over all real steps (steps), or per episode, then over episodes "
        "(episodes, as pytorch-maml-rl). They differ when episodes end early.",
    )
    action_scale: float | None = option(
        None,
        gt=0,
        doc="Policy actions in [-action_scale, action_scale] are clipped and mapped linearly onto the env's action "
        "bounds (pytorch-maml-rl's normalization_scale); null: actions go to the env clipped to its bounds.",
    )
    checkpoint_every: int = option(50, ge=1, doc="Write a checkpoint every this many iterations (and at the end).")
    policy: PolicyConfig = option(default_factory=PolicyConfig, doc="Policy network.")
    inner: InnerConfig = option(default_factory=InnerConfig, doc="Inner loop (adaptation).")
    outer: OuterConfig = option(default_factory=OuterConfig, doc="Outer loop (meta-update).")
    ppo: PPOConfig = option(default_factory=PPOConfig, doc="RL^2's PPO.")
    promp: ProMPConfig = option(default_factory=ProMPConfig, doc="ProMP's outer step (its Adam rate: outer.lr).")
    pearl: PEARLConfig = option(default_factory=PEARLConfig, doc="PEARL: encoder, SAC, replay buffers, collection.")
    sampler: SamplerConfig = option(default_factory=SamplerConfig, doc="Episode sampling (in-process or per worker).")
    ray: RayConfig = option(default_factory=RayConfig, doc="Ray rollout workers (episode sampling).")
    eval: EvalConfig = option(default_factory=EvalConfig, doc="Meta-validation and evaluation.")

    @field_validator("algorithm")
    @classmethod
    def check_registered(cls, name: str) -> str:
        return registered_algorithm("rl", name)

    @model_validator(mode="after")
    def check_family_and_combinations(self) -> RLConfig:
        import envs

        if self.family not in envs.FAMILIES:
            raise field_error("", "family", f"must be one of {sorted(envs.FAMILIES)}, got {self.family!r}")
        if self.ray.address is not None and self.ray.workers == 0:
            raise field_error("", "ray.workers", "must be >= 1 to sample on the Ray cluster given by ray.address")
        if self.algorithm == "maml_trpo" and self.outer.optimizer != "trpo":
            raise field_error("", "outer.optimizer", "maml_trpo needs trpo (use algorithm fomaml for adam)")
        recurrent_algorithm = self.algorithm == "rl2"
        if recurrent_algorithm and self.policy.recurrent is None:
            raise field_error("", "policy.recurrent", "rl2 needs a recurrent policy: gru or lstm")
        if not recurrent_algorithm and self.policy.recurrent is not None:
            raise field_error(
                "", "policy.recurrent", f"must be null for {self.algorithm} (a recurrent policy is rl2's)"
            )
        if recurrent_algorithm and self.eval.episodes_per_task is not None:
            raise field_error(
                "",
                "eval.episodes_per_task",
                "must be null for rl2: it evaluates trials (as many per task as in training)",
            )
        if not recurrent_algorithm and self.episodes_per_trial != 1:
            raise field_error("", "episodes_per_trial", f"must be 1 for {self.algorithm} (trials are rl2's)")
        if self.algorithm == "pearl":
            if self.action_scale != 1.0:
                raise field_error(
                    "", "action_scale", "must be 1 for pearl: its tanh actions in [-1, 1] map onto the env's bounds"
                )
            if self.meta_batch_size > self.pearl.train_tasks:
                raise field_error(
                    "", "meta_batch_size", f"must be at most pearl.train_tasks ({self.pearl.train_tasks}) for pearl"
                )
            if self.pearl.tasks_per_iteration > self.pearl.train_tasks:
                raise field_error(
                    "", "pearl.tasks_per_iteration", f"must be at most pearl.train_tasks ({self.pearl.train_tasks})"
                )
        if self.episodes_per_task % self.episodes_per_trial:
            raise field_error(
                "",
                "episodes_per_task",
                f"must be a multiple of episodes_per_trial ({self.episodes_per_trial}): whole trials per task, "
                f"got {self.episodes_per_task}",
            )
        return self

    def env_kwargs(self, *, test: bool = False) -> dict[str, Any]:
        """Constructor arguments of the env; ``test``: Meta-World's held-out split (other families
        draw held-out tasks from the same distribution)."""
        kwargs = dict(self.env)
        if test and self.family.startswith("MetaWorld"):
            kwargs["split"] = "test"
        return kwargs

    @property
    def env_id(self) -> str:
        import envs

        return f"{envs.NAMESPACE}/{self.family}-v0"
