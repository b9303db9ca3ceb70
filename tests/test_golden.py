"""Golden regression tests: the exact ``metrics.jsonl`` rows (and ``eval.json``) of short seeded runs.

The expected rows in ``tests/golden/runs_avx2.json`` were recorded from the code before the one-core
redesign (issue 12); a refactor must reproduce them bit for bit. Timings are left out (the keys
``time/*`` and ``env_steps_per_s``), everything else is compared exactly.

Re-record (only for a change that is meant to move results; say so in the commit and re-measure)::

    python tests/test_golden.py --record

Floating-point reductions differ between CPU instruction sets, and a few RL iterations grow a
last-bit difference into a different run, so there is one file per torch CPU capability
(``runs_<capability>.json``; ``runs_avx512.json`` was recorded from code that reproduced
``runs_avx2.json`` exactly), and per vendor where they differ: an AMD EPYC with AVX512 differs in
the last bits from the Intel CPU that recorded ``runs_avx512.json``, so it has
``runs_avx512_authenticamd.json`` (recorded 2026-12-01 from the code at a4e5eb3, before that
session's changes). On a CPU with no file of its own the test is skipped and says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CAPABILITY = torch.backends.cpu.get_cpu_capability()


def _cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo (GenuineIntel, AuthenticAMD, ...); empty where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# Intel's (and unknown vendors') files carry the capability alone, as recorded first.
VENDOR = "" if _cpu_vendor() in ("", "GenuineIntel") else f"_{_cpu_vendor().lower()}"
GOLDEN = Path(__file__).with_name("golden") / f"runs_{CAPABILITY.lower()}{VENDOR}.json"
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"

COMMON = ["threads=1", "--no-progress"]
# name -> (config, overrides); each is a few iterations of the real config, validation included.
SIN = ["meta_batch_size=5", "eval.val_tasks=8", "eval.chunk=8", "eval.num_tasks=10", "eval.steps=2"]
OMNI = ["meta_batch_size=2", "eval.val_tasks=4", "eval.chunk=4", "eval.num_tasks=4", "eval.steps=2",
        "omniglot.filters=8", f"omniglot.root={OMNIGLOT}"]  # fmt: skip
NAV = ["num_iterations=3", "meta_batch_size=4", "episodes_per_task=5"]
NAV_EVAL = ["eval.every=3", "eval.val_tasks=4", "eval.num_tasks=4", "eval.steps=2"]
RUNS: dict[str, tuple[str, list[str]]] = {
    "sinusoid_maml": ("experiments/sinusoid/maml.yaml", ["num_iterations=4", "eval.every=2", *SIN]),
    "sinusoid_fomaml": ("experiments/sinusoid/fomaml.yaml", ["num_iterations=3", "eval.every=3", *SIN]),
    "sinusoid_reptile": ("experiments/sinusoid/reptile.yaml", ["num_iterations=3", "eval.every=3", *SIN]),
    "sinusoid_pretrain": ("experiments/sinusoid/pretrain.yaml", ["num_iterations=3", "eval.every=3", *SIN]),
    "omniglot_maml_5w1s": ("experiments/omniglot/maml_5w1s.yaml", ["num_iterations=3", "eval.every=3", *OMNI]),
    "omniglot_reptile_5w1s": ("experiments/omniglot/reptile_5w1s.yaml", ["num_iterations=2", "eval.every=2", *OMNI]),
    "navigation2d_maml_trpo": ("experiments/navigation2d/maml_trpo.yaml", [*NAV, *NAV_EVAL]),
    "navigation2d_fomaml": ("experiments/navigation2d/fomaml.yaml", [*NAV, *NAV_EVAL]),
    "navigation2d_fomaml_adam": (
        "experiments/navigation2d/fomaml.yaml",
        [*NAV, "outer.optimizer=adam", "outer.lr=0.01", "eval.num_tasks=4", "eval.steps=1"],
    ),
    "navigation2d_reptile": ("experiments/navigation2d/reptile.yaml", [*NAV, *NAV_EVAL]),
    "navigation2d_promp": ("experiments/navigation2d/promp.yaml", [*NAV, "promp.steps=2", *NAV_EVAL]),
    "navigation2d_rl2": (
        "experiments/navigation2d/rl2.yaml",
        [*NAV, "episodes_per_trial=5", "policy.rnn_size=16", "ppo.epochs=2", "ppo.minibatches=2", *NAV_EVAL],
    ),
    "halfcheetah_vel_maml_trpo": (
        "experiments/halfcheetah_vel/maml_trpo.yaml",
        [
            "num_iterations=1",
            "meta_batch_size=3",
            "episodes_per_task=2",
            "ray.workers=0",
            "eval.num_tasks=2",
            "eval.steps=1",
        ],
    ),
}
NEEDS_OMNIGLOT = {name for name in RUNS if name.startswith("omniglot")}


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "env_steps_per_s"}


def run(name: str, out: Path) -> dict:
    """Train and evaluate one golden run into ``out``; its rows and evaluation."""
    from metarl.app.cli import main

    config, overrides = RUNS[name]
    run_dir = out / name
    assert main(["train", str(ROOT / config), *overrides, *COMMON, "--run-dir", str(run_dir)]) == 0
    assert main(["evaluate", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"rows": [_comparable(r) for r in rows], "eval": json.loads((run_dir / "eval.json").read_text())}


@pytest.fixture(scope="module")
def golden() -> dict:
    if not GOLDEN.exists():
        pytest.skip(f"no golden runs recorded for this CPU's instruction set ({CAPABILITY}): {GOLDEN.name}")
    recorded = json.loads(GOLDEN.read_text())
    assert recorded["cpu_capability"] == CAPABILITY
    return recorded


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run_is_reproduced(name, golden, tmp_path):
    if name in NEEDS_OMNIGLOT and not OMNIGLOT.is_dir():
        pytest.skip(f"no Omniglot data at {OMNIGLOT}")
    got = run(name, tmp_path)
    want = golden["runs"][name]
    assert got["rows"] == want["rows"]
    assert got["eval"] == want["eval"]


def record() -> None:
    import tempfile

    out = {"cpu_capability": CAPABILITY, "torch": torch.__version__, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in RUNS:
            out["runs"][name] = run(name, Path(tmp))
            print(f"recorded {name}: {len(out['runs'][name]['rows'])} rows", file=sys.stderr)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    record()
