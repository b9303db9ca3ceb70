"""A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head that runs no
workers, as on a real cluster, and three nodes of one CPU each): rollout workers spread over the
nodes, a node lost mid-call, and a run without an address that starts its own Ray beside it."""

from __future__ import annotations

import pytest
import torch

from metarl.rl.sampling import VectorSampler, task_seeds

ray = pytest.importorskip("ray")
CHEETAH = "metarl/HalfCheetahVel-v0"


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from metarl.rl.sampling import init_ray

    ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    init_ray(nodes.address)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def _setup(horizon: int, n: int):
    import gymnasium as gym

    from agents.policies import make_policy

    local = VectorSampler(CHEETAH, episodes_per_task=4, horizon=horizon)
    torch.manual_seed(0)
    policy = make_policy(local.observation_space, local.action_space, hidden=(16,))
    env = gym.make(CHEETAH)
    env.reset(seed=0)
    tasks = env.unwrapped.sample_tasks(n)
    return local, policy, tasks, task_seeds(3, 0, n=n)


def _same(a, b) -> bool:
    return all(
        (x is None and y is None) or torch.equal(x, y) for x, y in zip(a._asdict().values(), b._asdict().values())
    )


def test_workers_on_two_nodes_sample_the_in_process_episodes(cluster):
    from metarl.rl.sampling import RaySampler

    local, policy, tasks, seeds = _setup(horizon=30, n=5)
    sampler = RaySampler(CHEETAH, policy=policy, episodes_per_task=4, horizon=30, num_workers=2)
    try:
        nodes = sampler.worker_nodes()
        assert len(set(nodes)) == 2 and set(nodes) <= {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert _same(sampler.sample(policy.params(), tasks, seeds), local.sample(policy, policy.params(), tasks, seeds))
    finally:
        sampler.close()


def test_losing_the_node_of_a_worker_mid_call_completes_the_call(cluster, on_first_ray_wait):
    """The node that runs worker 0 is removed (its raylet and processes killed) while the call runs; the
    worker is replaced on the node that was free and the call returns every episode, equal to in-process.

    The node goes the moment the call first waits on its workers (every share submitted, none collected),
    so the worker cannot finish first however fast this machine samples: a timer raced it on CI."""
    from metarl.rl.sampling import RaySampler

    horizon, n = 1000, 6  # each share: 3 tasks x 4 episodes x 1000 steps, far longer than killing a node
    local, policy, tasks, seeds = _setup(horizon=horizon, n=n)
    events: list[dict] = []
    sampler = RaySampler(
        CHEETAH, policy=policy, episodes_per_task=4, horizon=horizon, num_workers=2, on_event=events.append
    )
    try:
        victim_id = sampler.worker_nodes()[0]
        victim = next(node for node in cluster.list_all_nodes() if node.node_id == victim_id)

        def remove_victim():
            cluster.remove_node(victim, allow_graceful=False)
            return len(events)  # no worker replaced yet when the node went

        removed = on_first_ray_wait(remove_victim)
        episodes = sampler.sample(policy.params(), tasks, seeds)
        assert removed == [0]
        assert episodes.num_tasks == n and episodes.num_steps() == n * 4 * horizon
        assert _same(episodes, local.sample(policy, policy.params(), tasks, seeds))
        assert [e["worker"] for e in events] == [0] and events[0]["tasks"] == [0, 3]
        assert victim_id not in sampler.worker_nodes()
    finally:
        sampler.close()


def test_a_run_without_an_address_starts_its_own_ray_beside_a_running_cluster(cluster):
    """`ray.init()` with no address joins the cluster last started on the machine (Ray records it in
    its temp dir); metarl's own Ray, asked for with no address, is a new local one of the CPUs it wants."""
    import os
    import subprocess
    import sys

    code = (
        "from metarl.rl.sampling import init_ray; import ray; init_ray(num_cpus=2); "
        "print(len(ray.nodes()), ray.cluster_resources()['CPU'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "2.0"]  # the cluster has 4 nodes and 3 CPUs
