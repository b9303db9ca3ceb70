"""The typed config of a few-shot experiment (``experiments/sinusoid/*.yaml``, ``experiments/omniglot/*.yaml``)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import field_validator, model_validator

from metarl.core.config import ConfigModel, field_error, option
from metarl.runs.algorithm_names import registered_algorithm


class InnerConfig(ConfigModel):
    steps: int = option(1, ge=0, doc="Inner-loop gradient steps per task during meta-training.")
    lr: float | list[float] = option(
        0.01, gt=0, doc="Inner learning rate: one value, or one per step (the last repeats)."
    )
    batch_size: int | None = option(
        None,
        ge=1,
        doc="Support examples per inner step, taken in turn with every class equally represented "
        "(Reptile's minibatches; null: the whole support set).",
    )


class OuterConfig(ConfigModel):
    lr: float = option(1e-3, gt=0, doc="Adam learning rate of the meta-update (maml, fomaml, pretrain).")
    epsilon_start: float = option(1.0, gt=0, le=1, doc="Reptile: outer step size at iteration 0.")
    epsilon_end: float = option(0.0, ge=0, le=1, doc="Reptile: outer step size at the last iteration (linear anneal).")


class DataConfig(ConfigModel):
    k_shot: int = option(10, ge=1, doc="Support examples per class (per task for regression) in meta-training.")
    k_query: int = option(10, ge=1, doc="Query examples per class (per task for regression) in meta-training.")


class SinusoidConfig(ConfigModel):
    amplitude: tuple[float, float] = option((0.1, 5.0), gt=0, doc="Amplitude range [low, high], drawn uniformly.")
    phase: tuple[float, float] = option((0.0, math.pi), doc="Phase range [low, high], drawn uniformly.")
    x_range: tuple[float, float] = option((-5.0, 5.0), doc="Input range [low, high], drawn uniformly.")
    hidden: list[int] = option(default_factory=lambda: [40, 40], ge=1, doc="Hidden widths of the ReLU MLP.")

    @model_validator(mode="after")
    def check_ranges(self) -> SinusoidConfig:
        for name in ("amplitude", "phase", "x_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise field_error("", name, f"must be [low, high] with low <= high, got {[lo, hi]}")
        return self


class OmniglotConfig(ConfigModel):
    """Omniglot data, split and task drawing.

    ``split: characters`` holds out whole characters and draws each task's classes across alphabets
    (MAML's protocol); ``split: alphabets`` holds out whole alphabets and, by default
    (``within_alphabet: null``), draws every validation and test task from one unseen alphabet
    (Lake et al.'s one-shot protocol). Training tasks are drawn across the training alphabets unless
    ``train_within_alphabet``.
    """

    root: str = option("../shared/data/omniglot", doc="Data directory with the Omniglot zips or extracted folders.")
    n_way: int = option(5, ge=2, doc="Classes per task.")
    image_size: int = option(28, ge=8, doc="Images are resized to image_size x image_size.")
    rotations: bool = option(True, doc="Count rotations by 90, 180, 270 degrees as new classes.")
    split: Literal["characters", "alphabets"] = option(
        "characters", doc="Hold out whole characters, or whole alphabets (evaluation on alphabets unseen in training)."
    )
    num_val_characters: int = option(30, ge=1, doc="split characters: characters held out for meta-validation.")
    num_test_characters: int = option(50, ge=1, doc="split characters: characters held out for the final evaluation.")
    num_val_alphabets: int = option(1, ge=1, doc="split alphabets: alphabets held out for meta-validation.")
    num_test_alphabets: int = option(2, ge=1, doc="split alphabets: alphabets held out for the final evaluation.")
    split_seed: int = option(
        0, ge=0, doc="Seed of the fixed character or alphabet split (independent of the run seed)."
    )
    within_alphabet: bool | None = option(
        None,
        doc="Draw each validation and test task's n_way characters from one alphabet, at one rotation "
        "(null: true with split alphabets, false with split characters).",
    )
    train_within_alphabet: bool = option(
        False, doc="Draw each training task from one alphabet too (false: across all training alphabets)."
    )
    filters: int = option(64, ge=1, doc="Filters of each of the 4 conv blocks.")

    @property
    def eval_within_alphabet(self) -> bool:
        """Whether validation and test tasks are drawn within one alphabet (``within_alphabet`` resolved)."""
        return self.split == "alphabets" if self.within_alphabet is None else self.within_alphabet


# -- per-method settings (one section per method of agents/; a method reads only its own) ----------
class ProtoNetConfig(ConfigModel):
    distance: Literal["euclidean", "cosine"] = option(
        "euclidean", doc="protonet: distance of a query to a prototype (the paper's squared Euclidean, or cosine)."
    )


class MatchingNetConfig(ConfigModel):
    fce: bool = option(
        False,
        doc="matchingnet: full-context embeddings (a bidirectional LSTM over the support set, an attention "
        "LSTM for the queries; the paper uses them on miniImageNet, not on Omniglot).",
    )
    fce_steps: int = option(5, ge=1, doc="matchingnet: attention reads K of the query's full-context embedding.")
    scale: float = option(
        1.0,
        gt=0,
        doc="matchingnet: the attention is the softmax of scale x cosine similarity (1: the paper; the Omniglot "
        "configs use 10, see agents/matchingnet.py).",
    )


class RelationNetConfig(ConfigModel):
    blocks: int = option(
        2,
        ge=0,
        doc="relationnet: fully connected layers (filters units, batch norm, ReLU) standing for the paper's two "
        "conv blocks of the relation module, which have no room to convolve on the backbone's 1x1 feature map.",
    )
    hidden: int = option(8, ge=1, doc="relationnet: units of the relation module's last hidden layer (paper: 8).")


class SiameseConfig(ConfigModel):
    """siamese settings: none (the verifier is a learned weighted L1 distance; its pairs are fixed by the task)."""


class MetaSGDConfig(ConfigModel):
    alpha_init: Literal["inner_lr", "uniform"] = option(
        "inner_lr",
        doc="metasgd: start of the learned per-coordinate learning rates: inner.lr everywhere, or uniform in "
        "alpha_range (the paper's).",
    )
    alpha_range: tuple[float, float] = option(
        (0.005, 0.1), gt=0, doc="metasgd: [low, high] of the uniform initialisation (the paper's [0.005, 0.1])."
    )

    @model_validator(mode="after")
    def check_range(self) -> MetaSGDConfig:
        lo, hi = self.alpha_range
        if lo > hi:
            raise field_error("", "alpha_range", f"must be [low, high] with low <= high, got {[lo, hi]}")
        return self


class MetaLSTMConfig(ConfigModel):
    hidden: int = option(20, ge=1, doc="metalstm: width of the first (standard) LSTM layer (the paper's 20).")
    preprocess_p: float = option(
        10.0, gt=0, doc="metalstm: p of the gradient and loss preprocessing (Andrychowicz et al. 2016: 10)."
    )
    forget_bias: tuple[float, float] = option(
        (4.0, 5.0), doc="metalstm: [low, high] of the uniform initial forget-gate bias (high: forget gate near 1)."
    )
    input_bias: tuple[float, float] = option(
        (-5.0, -4.0), doc="metalstm: [low, high] of the uniform initial input-gate bias (low: small learning rates)."
    )
    weight_init: float = option(
        0.01,
        ge=0,
        doc="metalstm: every other meta-learner weight and bias starts uniform in [-weight_init, weight_init].",
    )
    grad_clip: float = option(0.25, ge=0, doc="metalstm: clip the meta-gradient's global norm to this (0: no clip).")
    test_bn: Literal["support", "batch"] = option(
        "support",
        doc="metalstm: batch norm of query images at evaluation: the support set's statistics (the paper's) or "
        "their own batch's (as MAML).",
    )

    @model_validator(mode="after")
    def check_ranges(self) -> MetaLSTMConfig:
        for name in ("forget_bias", "input_bias"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise field_error("", name, f"must be [low, high] with low <= high, got {[lo, hi]}")
        return self


class MAMLPPConfig(ConfigModel):
    """mamlpp settings (inner.steps, inner.lr and outer.lr as maml's; inner.lr initialises the learned rates)."""

    msl_iterations: int = option(
        5000,
        ge=0,
        doc="mamlpp: iterations over which the multi-step loss weights move from uniform to the last step "
        "(the paper's 10 epochs of 500 iterations); only the last step's loss after them.",
    )
    first_order_iterations: int = option(
        25000,
        ge=0,
        doc="mamlpp: iterations with first-order meta-gradients, second order after (the paper's 50 epochs).",
    )
    min_outer_lr: float = option(
        1e-5, ge=0, doc="mamlpp: the outer learning rate is cosine-annealed from outer.lr to this over num_iterations."
    )


class ANILConfig(ConfigModel):
    """anil has no settings of its own: inner.steps, inner.lr (the head's) and outer.lr as maml's."""


class IMAMLConfig(ConfigModel):
    lam: float = option(
        2.0,
        gt=0,
        doc="imaml: lambda of the proximal inner problem L_support(phi) + lambda/2 ||phi - theta||^2 "
        "(the paper: 2.0 on Omniglot).",
    )
    cg_steps: int = option(
        5, ge=1, doc="imaml: conjugate-gradient iterations of each task's meta-gradient (the paper: 5)."
    )
    cg_damping: float = option(
        0.0, ge=0, doc="imaml: extra damping d of the CG matrix (1 + d) I + H / lambda (0: the paper's I + H / lambda)."
    )
    cg_truncate: bool = option(
        False,
        doc="imaml: stop each task's CG at the first direction of negative curvature of I + H / lambda (truncated "
        "CG; the meta-gradient is then the iterate reached, or the query gradient itself if the first direction "
        "has it). False: the paper's plain CG, which needs I + H / lambda positive definite.",
    )
    eval_lam: float | None = option(
        None,
        ge=0,
        doc="imaml: lambda of the proximal steps at evaluation and prediction (null: lam; 0: plain fine-tuning).",
    )
    backtrack: int = option(
        0,
        ge=0,
        doc="imaml: each inner step takes the longest of lr, lr/2, ..., lr/2^backtrack that does not increase "
        "the proximal objective, or no step if none is (0: plain steps, as the paper); hessian_free: of 1, 1/2, ... "
        "times its Newton step (0: the full step).",
    )
    inner_solver: Literal["gd", "hessian_free"] = option(
        "gd",
        doc="imaml: the inner solver: gd, inner.steps gradient steps of inner.lr ('iMAML, GD'); hessian_free, "
        "inner.steps Newton steps, each by cg_steps of truncated CG on (H + lam I) and a line search of "
        "backtrack halvings ('iMAML, HF'; inner.lr unused).",
    )


class R2D2Config(ConfigModel):
    init_lambda: float = option(
        1.0, gt=0, doc="r2d2: initial ridge regularisation lambda (learned, as exp of its log)."
    )
    init_alpha: float = option(1.0, doc="r2d2: initial scale alpha of the ridge outputs (learned).")
    init_beta: float = option(0.0, doc="r2d2: initial offset beta of the ridge outputs (learned).")


#: Methods that adapt by inner steps in training (at least one is needed).
INNER_LOOP = ("maml", "fomaml", "reptile", "mamlpp", "anil", "metasgd", "metalstm", "imaml")

#: Methods whose inner update is learned (the evaluation takes eval.steps of it; eval.lr does not apply).
LEARNED_UPDATES = ("metasgd", "metalstm", "mamlpp")

#: Methods that only classify (no regression head or loss): refused on the sinusoid family.
CLASSIFICATION_ONLY = ("protonet", "matchingnet", "relationnet", "siamese", "r2d2")


class EvalConfig(ConfigModel):
    steps: int = option(10, ge=0, doc="Inner steps evaluated: the metric is reported after 0..steps steps.")
    lr: float | list[float] | None = option(None, gt=0, doc="Inner learning rate at evaluation (null: inner.lr).")
    k_shot: int | None = option(None, ge=1, doc="Support examples at evaluation (null: data.k_shot).")
    k_query: int | None = option(None, ge=1, doc="Query examples at evaluation (null: data.k_query).")
    num_tasks: int = option(600, ge=1, doc="Held-out tasks of `metarl evaluate`.")
    every: int = option(500, ge=0, doc="Meta-validate every this many iterations (0: never).")
    val_tasks: int = option(100, ge=1, doc="Tasks of each meta-validation.")
    chunk: int = option(50, ge=1, doc="Tasks evaluated at once (bounds memory).")


class FewShotConfig(ConfigModel):
    family: Literal["sinusoid", "omniglot"] = option(doc="Task family.")
    algorithm: str = option(
        doc="Meta-learner: an algorithm registered for the fewshot family in agents/ (maml, fomaml, reptile, "
        "protonet, ...; pretrain: the multi-task baseline)."
    )
    num_iterations: int = option(doc="Meta-iterations (meta-updates) to train.", ge=1)
    seed: int = option(0, ge=0, doc="Run seed: model init, task sampling of every iteration.")
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", doc="Where the learner runs; auto takes cuda when available."
    )
    threads: int = option(0, ge=0, doc="torch CPU threads (0: torch's default).")
    meta_batch_size: int = option(25, ge=1, doc="Tasks per meta-update.")
    batched: bool = option(True, doc="Inner loop of all tasks at once under torch.func.vmap (else a per-task loop).")
    checkpoint_every: int = option(500, ge=1, doc="Write a checkpoint every this many iterations (and at the end).")
    inner: InnerConfig = option(default_factory=InnerConfig, doc="Inner loop (adaptation).")
    outer: OuterConfig = option(default_factory=OuterConfig, doc="Outer loop (meta-update).")
    data: DataConfig = option(default_factory=DataConfig, doc="Task shape in meta-training.")
    eval: EvalConfig = option(default_factory=EvalConfig, doc="Meta-validation and evaluation.")
    sinusoid: SinusoidConfig = option(default_factory=SinusoidConfig, doc="Sinusoid regression family.")
    omniglot: OmniglotConfig = option(default_factory=OmniglotConfig, doc="Omniglot classification family.")
    protonet: ProtoNetConfig = option(default_factory=ProtoNetConfig, doc="Prototypical Networks.")
    matchingnet: MatchingNetConfig = option(default_factory=MatchingNetConfig, doc="Matching Networks.")
    relationnet: RelationNetConfig = option(default_factory=RelationNetConfig, doc="Relation Networks.")
    siamese: SiameseConfig = option(default_factory=SiameseConfig, doc="Siamese verification networks.")
    metasgd: MetaSGDConfig = option(default_factory=MetaSGDConfig, doc="Meta-SGD.")
    metalstm: MetaLSTMConfig = option(default_factory=MetaLSTMConfig, doc="The Meta-Learner LSTM.")
    mamlpp: MAMLPPConfig = option(default_factory=MAMLPPConfig, doc="MAML++.")
    anil: ANILConfig = option(default_factory=ANILConfig, doc="ANIL.")
    imaml: IMAMLConfig = option(default_factory=IMAMLConfig, doc="iMAML.")
    r2d2: R2D2Config = option(default_factory=R2D2Config, doc="R2-D2.")

    @field_validator("algorithm")
    @classmethod
    def check_registered(cls, name: str) -> str:
        return registered_algorithm("fewshot", name)

    @model_validator(mode="after")
    def check_inner_steps(self) -> FewShotConfig:
        if self.algorithm in INNER_LOOP and self.inner.steps < 1:
            raise field_error("", "inner.steps", f"{self.algorithm} needs at least 1 inner step")
        if self.algorithm in LEARNED_UPDATES and self.eval.lr is not None:
            raise field_error(
                "", "eval.lr", f"{self.algorithm} learns its inner updates; eval.lr does not apply (set it to null)"
            )
        if self.algorithm == "metasgd" and isinstance(self.inner.lr, list):
            raise field_error("", "inner.lr", f"{self.algorithm} takes one inner.lr, got the list {self.inner.lr}")
        if self.algorithm == "imaml" and self.inner.batch_size is not None:
            raise field_error(
                "", "inner.batch_size", "imaml solves the proximal problem of the whole support set; leave it null"
            )
        if self.algorithm in CLASSIFICATION_ONLY and self.family != "omniglot":
            raise field_error("", "algorithm", f"{self.algorithm} classifies images; use it with family omniglot")
        return self

    @property
    def eval_lr(self) -> float | list[float]:
        return self.inner.lr if self.eval.lr is None else self.eval.lr

    @property
    def eval_k_shot(self) -> int:
        return self.data.k_shot if self.eval.k_shot is None else self.eval.k_shot

    @property
    def eval_k_query(self) -> int:
        return self.data.k_query if self.eval.k_query is None else self.eval.k_query
