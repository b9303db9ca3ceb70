"""Adapted-policy directories (``metarl adapt --out``): choosing and checking one before adapting, and
reading one defensively: every damaged, missing or hostile file is one RunError line, and nothing
in a file is run (``weights_only=True``).

The directory holds ``adapted.json`` (task, returns, the run's path relative to the directory) and
``policy.pt`` (``{"model": {name: tensor}}``, the adapted parameters; for RL^2 also ``"context"``,
the recurrent state and previous action, reward and done flag after the adaptation episodes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from metarl.runs.rundir import CONFIG, RunError, check_writable

ADAPTED_POLICY = "policy.pt"
ADAPTED_INFO = "adapted.json"


def read_adapted_info(path: Path) -> dict[str, Any]:
    """``adapted.json`` checked: a JSON object with run_dir (str), task (object), returns (numbers),
    episodes (int >= 1), optional kept_step (a step of returns) and run_dir_absolute (str)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RunError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise RunError(f"{path} is not valid JSON{where}: it is damaged; re-run metarl adapt") from None
    if not isinstance(info, dict):
        raise RunError(f"{path} is not a metarl adapted.json (expected a JSON object, got {type(info).__name__})")

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    checks = {
        "run_dir": (lambda v: isinstance(v, str) and v != "", "a path string"),
        "task": (lambda v: isinstance(v, dict), "a JSON object"),
        "returns": (lambda v: isinstance(v, list) and len(v) >= 1 and all(number(x) for x in v), "a list of numbers"),
        "episodes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    }
    for key, (ok, want) in checks.items():
        if key not in info:
            raise RunError(f"{path} is not a metarl adapted.json: key {key!r} is missing")
        if not ok(info[key]):
            raise RunError(f"{path}: {key!r} must be {want}, got {json.dumps(info[key])[:80]}")
    kept, last = info.get("kept_step"), len(info["returns"]) - 1
    if kept is not None and not (isinstance(kept, int) and not isinstance(kept, bool) and 0 <= kept <= last):
        raise RunError(f"{path}: 'kept_step' must be an integer in [0, {last}], got {json.dumps(kept)[:80]}")
    if not isinstance(info.get("run_dir_absolute", ""), str):
        raise RunError(f"{path}: 'run_dir_absolute' must be a path string")
    return info


def read_adapted_params(path: Path) -> dict[str, torch.Tensor]:
    """``policy.pt``'s parameters (see :func:`read_adapted_policy`)."""
    return read_adapted_policy(path)[0]


CONTEXT_KEYS = ("state", "prev_action", "prev_reward", "done")


def read_adapted_policy(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``policy.pt`` with ``weights_only=True``: ``{"model": {name: tensor}}`` and, for RL^2, the
    ``"context"`` tensors; else a one-line RunError."""
    if not path.is_file():
        raise RunError(f"{path} is missing: the adapted-policy directory is incomplete; re-run metarl adapt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged, truncated, or a pickle that wants to run code: torch's text spans lines
        raise RunError(
            f"{path} cannot be read ({type(exc).__name__}): it is damaged or not a metarl adapted policy "
            "(nothing in it was run); re-run metarl adapt"
        ) from None
    model = state.get("model") if isinstance(state, dict) else None
    if (
        not isinstance(model, dict)
        or not model
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items())
    ):
        raise RunError(f"{path} is not a metarl adapted policy (expected {{'model': {{name: tensor}}}})")
    context = state.get("context")
    if context is not None and not (
        isinstance(context, dict)
        and set(context) == set(CONTEXT_KEYS)
        and all(isinstance(v, torch.Tensor) for v in context.values())
    ):
        raise RunError(f"{path}: 'context' must hold the tensors {', '.join(CONTEXT_KEYS)} (an RL^2 adapted policy)")
    return dict(model), (dict(context) if context is not None else None)


def find_run(out: Path, info: dict[str, Any]) -> Path:
    """The run of an adapted policy: ``run_dir`` relative to ``out`` (or absolute, as older files
    stored it), else ``run_dir_absolute``; the first that is a run directory."""
    stored = Path(info["run_dir"])
    candidates = [stored if stored.is_absolute() else out / stored]
    if info.get("run_dir_absolute"):
        candidates.append(Path(info["run_dir_absolute"]))
    for run in candidates:
        if (run / CONFIG).is_file():
            return run.resolve()
    raise RunError(
        f"{out / ADAPTED_INFO} names the run {info['run_dir']}, but {candidates[0].resolve()} is not "
        "a metarl run directory (moved or deleted?); keep adapted policies inside their run's directory, "
        "or edit 'run_dir' in adapted.json"
    )


def check_adapted_out(out_dir: str | Path) -> Path:
    """Raise a one-line RunError unless ``out_dir`` can take a new adapted policy: not a file, not
    an existing adapted-policy directory, writable. Cheap; the CLI calls it before adapting."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is an existing file; choose a directory path for the adapted policy")
    if (out / ADAPTED_INFO).exists() or (out / ADAPTED_POLICY).exists():
        raise RunError(f"--out {out} already holds an adapted policy; choose another directory or delete it first")
    check_writable(out)
    return out


def default_adapted_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/adapted/TIMESTAMP``, with ``-2``, ``-3``... when that exists (two adaptations in a second)."""
    base = Path(run_dir) / "adapted" / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out
