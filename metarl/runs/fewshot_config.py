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
    root: str = option("../shared/data/omniglot", doc="Data directory with the Omniglot zips or extracted folders.")
    n_way: int = option(5, ge=2, doc="Classes per task.")
    image_size: int = option(28, ge=8, doc="Images are resized to image_size x image_size.")
    rotations: bool = option(True, doc="Count rotations by 90, 180, 270 degrees as new classes.")
    num_val_characters: int = option(30, ge=1, doc="Characters held out for meta-validation.")
    num_test_characters: int = option(50, ge=1, doc="Characters held out for the final evaluation.")
    split_seed: int = option(0, ge=0, doc="Seed of the fixed character split (independent of the run seed).")
    filters: int = option(64, ge=1, doc="Filters of each of the 4 conv blocks.")


# -- per-method settings (one section per method of agents/; a method reads only its own) ----------
class ProtoNetConfig(ConfigModel):
    distance: Literal["euclidean", "cosine"] = option(
        "euclidean", doc="protonet: distance of a query to a prototype (the paper's squared Euclidean, or cosine)."
    )


class MatchingNetConfig(ConfigModel):
    """matchingnet settings (filled in by its module)."""


class RelationNetConfig(ConfigModel):
    """relationnet settings (filled in by its module)."""


class SiameseConfig(ConfigModel):
    """siamese settings (filled in by its module)."""


class MetaSGDConfig(ConfigModel):
    """metasgd settings (filled in by its module)."""


class MetaLSTMConfig(ConfigModel):
    """metalstm settings (filled in by its module)."""


class MAMLPPConfig(ConfigModel):
    """mamlpp settings (filled in by its module)."""


class ANILConfig(ConfigModel):
    """anil settings (filled in by its module)."""


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
    eval_lam: float | None = option(
        None,
        ge=0,
        doc="imaml: lambda of the proximal steps at evaluation and prediction (null: lam; 0: plain fine-tuning).",
    )


class R2D2Config(ConfigModel):
    init_lambda: float = option(
        1.0, gt=0, doc="r2d2: initial ridge regularisation lambda (learned, as exp of its log)."
    )
    init_alpha: float = option(1.0, doc="r2d2: initial scale alpha of the ridge outputs (learned).")
    init_beta: float = option(0.0, doc="r2d2: initial offset beta of the ridge outputs (learned).")


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
        if self.algorithm == "reptile" and self.inner.steps < 1:
            raise field_error("", "inner.steps", "reptile needs at least 1 inner step")
        if self.algorithm in ("maml", "fomaml", "imaml") and self.inner.steps < 1:
            raise field_error("", "inner.steps", f"{self.algorithm} needs at least 1 inner step")
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
