#!/usr/bin/env bash
# Issue 14: seconds per MAML-TRPO iteration at the reference (full-batch Fisher) settings, and its
# breakdown, for the ways of using this machine's 2 cores: learner threads against Ray workers
# (sampling and the meta-update alternate, so each phase can have both cores).
# Run on a quiet machine (nothing else running), from the project root:
#     bash experiments/rl/iteration_speed.sh [OUT_DIR]
# Each line records NAME@TAG in experiments/results/rl.json (median over the iterations, with
# machine and date). Takes about 15 minutes.
set -euo pipefail
OUT=${1:-runs/speed}
B="python experiments/rl/benchmark.py"
for cfg in halfcheetah_vel/maml_trpo; do
  $B $cfg num_iterations=6 threads=2 ray.workers=2 --tag speed-t2-ray2 --no-eval --out "$OUT"
  $B $cfg num_iterations=6 threads=2 ray.workers=0 sampler.physics_threads=2 --tag speed-t2-inproc2 --no-eval --out "$OUT"
  $B $cfg num_iterations=6 threads=1 ray.workers=2 --tag speed-t1-ray2 --no-eval --out "$OUT"
done
for cfg in navigation2d/maml_trpo; do  # no physics: sampling is a small share; threads decide
  $B $cfg num_iterations=20 threads=2 --tag speed-t2 --no-eval --out "$OUT"
  $B $cfg num_iterations=20 threads=1 --tag speed-t1 --no-eval --out "$OUT"
done
