"""From a config file or a run directory to a config and an experiment of the right family.

Configs whose ``family`` is sinusoid or omniglot are few-shot experiments
(:class:`~metarl.runs.fewshot_config.FewShotConfig`); any other family is a meta-RL experiment
on ``metarl/<family>-v0`` (:class:`~metarl.runs.rl_config.RLConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from metarl.core.config_files import load_config
from metarl.runs.fewshot_config import FewShotConfig
from metarl.runs.rl_config import RLConfig
from metarl.runs.rundir import CONFIG, RunError, require_run_dir

FEWSHOT_FAMILIES = ("sinusoid", "omniglot")


def config_class(path: str | Path, overrides: list[str]) -> type:
    """The config class of an experiment file (a ``family=`` override wins over the file)."""
    family = None
    for item in overrides:
        if item.startswith("family="):
            family = item.split("=", 1)[1]
    if family is None:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            raw = None  # load_config reports the problem with the file
        family = raw.get("family") if isinstance(raw, dict) else None
    return FewShotConfig if family in FEWSHOT_FAMILIES else RLConfig


def load_experiment_config(path: str | Path, overrides: list[str] = ()) -> Any:
    """Load a config; a relative data directory is made absolute so the run dir works from anywhere."""
    overrides = list(overrides)
    cfg = load_config(config_class(path, overrides), path, overrides)
    if isinstance(cfg, FewShotConfig):
        cfg.omniglot.root = str(Path(cfg.omniglot.root).expanduser().resolve())
    return cfg


def load_run_config(run_dir: str | Path) -> Any:
    """The resolved config of a run directory; one-line errors for a missing directory or config."""
    run_dir = require_run_dir(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunError(
            f"{run_dir} is not a metarl run directory (no {CONFIG}); pass the directory given by `metarl train`"
        )
    return load_experiment_config(run_dir / CONFIG)


def experiment_class(cfg: Any) -> type:
    """The experiment class of a config's family."""
    if isinstance(cfg, FewShotConfig):
        from metarl.runs.fewshot import FewShotExperiment

        return FewShotExperiment
    if cfg.algorithm == "pearl":
        from metarl.runs.pearl import PEARLExperiment

        return PEARLExperiment
    from metarl.runs.rl import RLExperiment

    return RLExperiment


def make_experiment(cfg: Any) -> Any:
    return experiment_class(cfg)(cfg)


def restore(cfg: Any, run_dir: str | Path) -> tuple[Any, int]:
    """The experiment of ``cfg`` with the latest checkpoint of ``run_dir`` loaded, and its iteration."""
    return experiment_class(cfg).restore(cfg, Path(run_dir))
