"""A node lost mid-sweep, on a multi-node Ray cluster built on this machine.

Builds ``ray.cluster_utils.Cluster``: a head that runs nothing and ``--nodes`` nodes of one CPU
each, the way ``ray start --head --num-cpus 0`` and ``ray start --address HEAD:6379`` on each
machine would. Then runs ``metarl sweep`` against it (2 settings x 2 seeds of a small Navigation2D
MAML-TRPO, one CPU per trial), and once a trial is half-way, removes the node that runs it (its
raylet and every process on it killed, as when a machine dies). Tune restarts the trial on another
node, from the last checkpoint of its run directory (shared: the same disk here; NFS on a real
cluster). At the end, each trial is trained again without Ray in this process, and its metrics
(without timings) are compared with the trial's.

Prints the sweep's own lines, then the outcome; writes ``--out/node_loss.json``.

    python experiments/cluster/node_loss.py [--nodes 3] [--iterations 40] [--out /tmp/node-loss]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments/navigation2d/maml_trpo.yaml"
SMALL = ["meta_batch_size=4", "episodes_per_task=5", "horizon=50", "policy.hidden=[16]", "threads=1"]
TIMING = ("time/", "env_steps_per_s")


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def learning(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rs]


def node_of(pid: int, cluster: Cluster):
    """The cluster node whose raylet is an ancestor of process ``pid``."""
    ancestors = set()
    while pid > 1:  # up the parent chain through /proc (Linux)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        ancestors.add(pid)
    for node in cluster.list_all_nodes():
        raylet = node.all_processes["raylet"][0].process.pid
        if raylet in ancestors:
            return node
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--out", default="/tmp/node-loss")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"node_loss: {out} exists; give a new --out")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print(f"cluster at {cluster.address}: a head and {args.nodes} nodes of 1 CPU", flush=True)
    sweep = out / "sweep"
    command = [sys.executable, "-m", "metarl", "sweep", str(CONFIG), "--seeds", "0-1", "--grid", "inner.lr=0.05,0.1"]
    command += ["--name", "node-loss", "--out", str(sweep), "--ray-address", cluster.address]
    command += [f"num_iterations={args.iterations}", "checkpoint_every=5", *SMALL]
    t0 = time.time()
    driver = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "METARL_SWEEP_PROGRESS_S": "5"})
    removed = None
    try:
        while removed is None and driver.poll() is None:
            time.sleep(0.2)
            if not (sweep / "sweep.json").exists():
                continue
            for trial in json.loads((sweep / "sweep.json").read_text())["trials"]:
                run_dir = Path(trial["run_dir"])
                holder = (run_dir / "train.lock").read_text().split() if (run_dir / "train.lock").exists() else []
                if len(rows(run_dir)) >= args.iterations // 2 and holder:
                    node = node_of(int(holder[0]), cluster)
                    if node is None:
                        continue
                    at = len(rows(run_dir))
                    cluster.remove_node(node, allow_graceful=False)
                    removed = {"trial": trial["name"], "iteration": at, "after_s": round(time.time() - t0, 1)}
                    print(f"node_loss: removed the node running {trial['name']} at iteration {at}", flush=True)
                    break
        code = driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.shutdown()
    wall = time.time() - t0
    identical = {}
    for trial in json.loads((sweep / "sweep.json").read_text())["trials"]:
        run_dir = Path(trial["run_dir"])
        reference = out / "reference" / trial["name"]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "metarl",
                "train",
                str(run_dir / "config.yaml"),
                "--run-dir",
                str(reference),
                "--no-progress",
                "ray.workers=0",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        identical[trial["name"]] = learning(rows(run_dir)) == learning(rows(reference))
    record = {
        "driver_exit": code,
        "removed": removed,
        "wall_s": round(wall, 1),
        "identical_to_uninterrupted": identical,
    }
    (out / "node_loss.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0 if code == 0 and removed and all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
