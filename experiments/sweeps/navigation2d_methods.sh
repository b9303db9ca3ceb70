#!/usr/bin/env bash
# Issue 18's recorded sweep: Navigation2D, MAML-TRPO vs FOMAML vs Reptile, 5 seeds each, the
# configs' own 500 iterations, one learner thread per trial, two trials at a time on a 2-core
# machine (--cpus 2; CPUS=1 for one at a time). Resumable: run this script again and it continues
# (`metarl sweep --resume`), finished trials kept. The trials live in the repository
# (experiments/results/sweeps/navigation2d-methods/), so a sweep that spans sessions on machines
# that keep nothing but git is committed as it goes and resumed on the next machine. When every trial is done, compare them into experiments/results/:
#
#   bash experiments/sweeps/navigation2d_methods.sh            # start or continue
#   bash experiments/sweeps/navigation2d_methods.sh compare    # the README's curves and IQM table
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/results/sweeps/navigation2d-methods}
NAME=navigation2d-methods
if [ "${1:-}" = compare ]; then
    exec metarl compare "$OUT" --out experiments/results/navigation2d_sweep --last 10
fi
if [ -f "$OUT/sweep.json" ]; then
    exec metarl sweep --resume "$NAME" --out "$OUT" --cpus "${CPUS:-2}"
fi
exec metarl sweep experiments/navigation2d/{maml_trpo,fomaml,reptile}.yaml --seeds 0-4 --name "$NAME" \
    --out "$OUT" --cpus "${CPUS:-2}" threads=1
