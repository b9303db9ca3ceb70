"""Policy meta-learners: the MAML-TRPO meta-gradient against finite differences, the Fisher-vector
product against the plain Hessian of the KL, the trust region, the inner loop, and CLI runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from agents.maml import MAML
from agents.maml_trpo import MAMLTRPO
from agents.policies import GaussianMLPPolicy
from agents.reptile import Reptile
from metarl.core.trpo import flatten, make_hvp, unflatten
from metarl.rl.advantages import compute_advantages
from metarl.rl.episodes import Episodes
from metarl.rl.objective import PolicyGradientObjective, RLBatch, StepData, expand_to_tasks, masked_task_mean
from metarl.rl.sampling import VectorSampler, task_seeds
from metarl.rl.value_baselines import LinearFeatureBaseline

ROOT = Path(__file__).resolve().parents[1]
NAV = "metarl/Navigation2D-v0"


def double(ep: Episodes) -> Episodes:
    return Episodes(*(x.double() if x is not None and x.is_floating_point() else x for x in ep))


def tiny_batch(n=3, e=4, horizon=12, seed=0, hidden=(8,), lr=0.5):
    """Real Navigation2D episodes of a tiny policy, in float64: (policy, learner, train, valid)."""
    sampler = VectorSampler(NAV, episodes_per_task=e, horizon=horizon)
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(2, 2, hidden=hidden, init_std=0.5)
    env = gym.make(NAV)
    env.reset(seed=seed)
    tasks = env.unwrapped.sample_tasks(n)
    baseline = LinearFeatureBaseline()

    def data(ep):
        ep = double(ep)
        return StepData(ep, compute_advantages(ep, baseline, gamma=0.99, gae_lambda=1.0, normalize=True))

    learner = MAMLTRPO(policy, inner_lrs=[lr], max_kl=0.01)
    train = [data(sampler.sample(policy, policy.params(), tasks, task_seeds(seed, 0, n=n)))]
    policy.double()
    phi = learner.adapt(learner.theta(), train)
    valid_ep = sampler.sample(
        policy.float(), {k: v.float() for k, v in phi.items()}, tasks, task_seeds(seed, 1, n=n), per_task=True
    )
    policy.double()
    # the sampler's log-probs are float32: recompute them in float64 so the surrogate's ratios are exactly 1
    valid_ep = double(valid_ep)
    with torch.no_grad():
        log_probs = policy(valid_ep.observations, phi).log_prob(valid_ep.actions) * valid_ep.mask
    valid = data(valid_ep._replace(log_probs=log_probs))
    return policy, learner, train, valid


def test_inner_loop_takes_each_tasks_own_policy_gradient_step():
    policy, learner, train, _ = tiny_batch()
    theta = learner.theta()
    phi = learner.adapt(theta, train)
    for i in range(train[0].episodes.num_tasks):
        one = StepData(train[0].episodes.task(i), train[0].advantages[i : i + 1])
        p = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        loss = learner.objective.support_loss(expand_to_tasks(p, 1), one)
        grads = torch.autograd.grad(loss, list(p.values()))
        for (name, value), g in zip(theta.items(), grads):
            torch.testing.assert_close(phi[name][i], value - 0.5 * g, rtol=1e-10, atol=1e-12)


def test_maml_trpo_meta_gradient_matches_finite_differences():
    policy, learner, train, valid = tiny_batch()
    theta0 = learner.theta()
    old = learner.old_outputs(theta0, train, valid)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    surrogate, _ = learner.surrogate_and_kl(theta, train, valid, old)
    grad = flatten(dict(zip(theta, torch.autograd.grad(surrogate, list(theta.values())))))
    flat0 = flatten(theta0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        d = torch.randn(flat0.shape, generator=gen, dtype=flat0.dtype)
        eps = 1e-5

        def f(x):
            with torch.no_grad():
                return learner.surrogate_and_kl(unflatten(x, theta0), train, valid, old)[0]

        fd = (f(flat0 + eps * d) - f(flat0 - eps * d)) / (2 * eps)
        torch.testing.assert_close(grad @ d, fd, rtol=1e-5, atol=1e-9)
    # the first-order gradient differs: the second-order term through the inner loop matters here
    fo = MAMLTRPO(policy, inner_lrs=[0.5], first_order=True)
    theta_fo = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    s_fo, _ = fo.surrogate_and_kl(theta_fo, train, valid, old)
    grad_fo = flatten(dict(zip(theta_fo, torch.autograd.grad(s_fo, list(theta_fo.values())))))
    assert (grad - grad_fo).norm() > 1e-3 * grad.norm()


def test_fisher_vector_product_equals_the_hessian_of_the_kl():
    policy, learner, train, valid = tiny_batch()
    theta0 = learner.theta()
    old = learner.old_outputs(theta0, train, valid)
    learner.fvp_subsample = 1.0
    fvp = learner.fisher_vector_product(theta0, train, valid)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    hvp = make_hvp(lambda p: learner.surrogate_and_kl(p, train, valid, old)[1], theta, damping=learner.cg_damping)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(flatten(theta0).shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(fvp(v), hvp(v), rtol=1e-7, atol=1e-10)


def shortened(data: StepData, lengths: torch.Tensor, average: str) -> StepData:
    """``data`` with every episode cut to ``lengths [N, E]`` (as if it had ended there)."""
    ep = data.episodes
    mask = (torch.arange(ep.horizon).view(1, -1, 1) < lengths.unsqueeze(1)).to(ep.mask.dtype)
    ep = ep._replace(mask=mask, lengths=lengths, rewards=ep.rewards * mask, log_probs=ep.log_probs * mask).check()
    return StepData(ep, data.advantages * mask, average)


def test_fisher_vector_product_equals_the_hessian_of_the_kl_averaged_per_episode():
    """With losses averaged per episode (pytorch-maml-rl), F is the Hessian of that KL mean, and
    the subsample's products are those of the KL mean over its first episodes."""
    policy, learner, train, valid = tiny_batch(e=4)
    n, e = valid.episodes.num_tasks, valid.episodes.episodes_per_task
    lengths = torch.tensor([[12, 3, 7, 1], [5, 12, 2, 9], [1, 1, 12, 4]])
    valid = shortened(valid, lengths, "episodes")
    theta0 = learner.theta()
    old = learner.old_outputs(theta0, train, valid)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    gen = torch.Generator().manual_seed(2)
    for fraction, sub in ((1.0, valid), (0.5, valid.head(0.5))):
        learner.fvp_subsample = fraction
        learner.first_order = True  # the subsample's inner-loop Jacobian is checked elsewhere
        fvp = learner.fisher_vector_product(theta0, train, valid)
        old_sub = tuple(o[:, :, : sub.episodes.episodes_per_task] for o in old)
        by_steps = sub._replace(average="steps")
        hvp = make_hvp(
            lambda p, sub=sub, old_sub=old_sub: learner.surrogate_and_kl(p, train, sub, old_sub)[1],
            theta,
            damping=learner.cg_damping,
        )
        steps = make_hvp(
            lambda p, by_steps=by_steps, old_sub=old_sub: learner.surrogate_and_kl(p, train, by_steps, old_sub)[1],
            theta,
            damping=learner.cg_damping,
        )
        v = torch.randn(flatten(theta0).shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(fvp(v), hvp(v), rtol=1e-7, atol=1e-10)
        assert (fvp(v) - steps(v)).norm() > 1e-2 * fvp(v).norm()  # the per-step mean is another matrix
    assert n == 3 and e == 4


def test_subsampled_fisher_vector_product_uses_the_first_episodes_at_the_full_batch_point():
    policy, learner, train, valid = tiny_batch(e=4)
    theta0 = learner.theta()
    learner.fvp_subsample = 0.5
    fvp = learner.fisher_vector_product(theta0, train, valid)
    # the same product, written out: J^T M J on the first 2 episodes of each task, where J is the
    # Jacobian of the outputs at phi(theta) (full batch) through the inner loop of the 2 episodes
    sub_train, sub_valid = [train[0].head(0.5)], valid.head(0.5)
    full_phi = learner.adapt(theta0, train)
    sub_phi0 = learner.adapt(theta0, sub_train)

    def outputs(flat):
        th = unflatten(flat, theta0)
        phi = {k: full_phi[k] + learner.adapt(th, sub_train)[k] - sub_phi0[k] for k in th}
        return torch.cat([o.reshape(-1) for o in policy.outputs(sub_valid.episodes.observations, phi)])

    jac = torch.autograd.functional.jacobian(outputs, flatten(theta0))
    eps = sub_valid.episodes
    w = (eps.mask / eps.mask.sum((1, 2), keepdim=True) / eps.num_tasks).unsqueeze(-1)
    mean, log_std = policy.outputs(eps.observations, full_phi)
    m = torch.cat([(w * torch.exp(-2 * log_std)).expand_as(mean).reshape(-1), (2 * w).expand_as(mean).reshape(-1)])
    v = torch.randn(jac.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = jac.T @ (m * (jac @ v)) + learner.cg_damping * v
    torch.testing.assert_close(fvp(v), expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("max_kl", [1e-4, 1e-3, 1e-2])
def test_trpo_step_stays_inside_the_trust_region(max_kl):
    policy, learner, train, valid = tiny_batch(seed=3)
    learner.max_kl = max_kl
    theta0 = learner.theta()
    old = learner.old_outputs(theta0, train, valid)
    with torch.no_grad():
        before, _ = learner.surrogate_and_kl(theta0, train, valid, old)
    metrics = learner.step(RLBatch(train, valid), 0)
    theta1 = learner.theta()
    with torch.no_grad():
        after, kl = learner.surrogate_and_kl(theta1, train, valid, old)
    assert metrics["line_search/accepted"] == 1.0
    assert float(kl) <= max_kl and metrics["kl"] == pytest.approx(float(kl), rel=1e-9)
    assert float(after) < float(before)
    assert 1 <= metrics["line_search/steps"] <= learner.line_search_steps


def test_no_improvement_leaves_the_policy_unchanged():
    policy, learner, train, valid = tiny_batch(seed=4)
    theta0 = flatten(learner.theta()).clone()
    flat = StepData(valid.episodes, torch.zeros_like(valid.advantages))  # a surrogate that no step can lower
    metrics = learner.step(RLBatch(train, flat), 0)
    assert metrics["line_search/accepted"] == 0.0 and metrics["grad_norm"] == 0.0
    assert torch.equal(flatten(learner.theta()), theta0)


def test_reptile_moves_theta_toward_the_mean_adapted_parameters():
    policy, _, train, _ = tiny_batch()
    reptile = Reptile(
        policy, PolicyGradientObjective(policy), inner_lrs=[0.5], epsilon_start=0.5, epsilon_end=0.0, num_iterations=10
    )
    theta = {k: v.detach().clone() for k, v in policy.named_parameters()}
    phi = reptile.adapt(theta, train)
    metrics = reptile.step(RLBatch(train, None), iteration=2)
    assert metrics["epsilon"] == pytest.approx(0.4)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(
            p.detach(), theta[name] + 0.4 * (phi[name].mean(0) - theta[name]), rtol=1e-12, atol=1e-12
        )


def test_fomaml_adam_gradient_is_the_query_gradient_at_the_adapted_parameters():
    policy, _, train, valid = tiny_batch()
    learner = MAML(policy, PolicyGradientObjective(policy), inner_lrs=[0.5], outer_lr=1e-3, first_order=True)
    theta = {k: v.detach() for k, v in policy.named_parameters()}
    phi = {k: v.detach().requires_grad_(True) for k, v in learner.adapt(theta, train).items()}
    eps = valid.episodes
    ratio = torch.exp(policy(eps.observations, phi).log_prob(eps.actions) - eps.log_probs)
    loss = -masked_task_mean(ratio * valid.advantages, eps.mask).mean()
    expected = {k: g.sum(0) for k, g in zip(phi, torch.autograd.grad(loss, list(phi.values())))}
    learner.optimizer.step = lambda: None  # keep theta: only look at the gradient
    learner.step(RLBatch(train, valid), 0)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- CLI runs

TINY = [
    "num_iterations=2",
    "meta_batch_size=2",
    "episodes_per_task=2",
    "horizon=10",
    "checkpoint_every=1",
    "eval.num_tasks=2",
    "eval.steps=1",
    "policy.hidden=[8]",
    "threads=1",
]


def metarl(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "metarl", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "family, algorithm, extra",
    [
        ("Navigation2D", "maml_trpo", []),
        ("Navigation2D", "fomaml", []),
        ("Navigation2D", "fomaml", ["outer.optimizer=adam"]),
        ("Navigation2D", "reptile", ["inner.steps=2"]),
        ("HalfCheetahVel", "maml_trpo", []),
        ("HalfCheetahVel", "fomaml", []),
        ("HalfCheetahVel", "reptile", ["inner.steps=2"]),
    ],
)
def test_one_iteration_smoke_runs(tmp_path, family, algorithm, extra):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"family: {family}\nalgorithm: {algorithm}\nnum_iterations: 1\n")
    run = tmp_path / "run"
    result = metarl("train", str(cfg), "--run-dir", str(run), "--no-progress", *TINY, *extra)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in (
        "return/pre_adapt",
        "return/post_adapt",
        "env_steps",
        "time/iteration",
        "time/sampling",
        "time/meta_update",
    ):
        assert key in rows[-1], key
    steps = 2 if "inner.steps=2" in extra else 1
    learned_phases = steps if algorithm == "reptile" else steps + 1  # Reptile never uses the validation episodes
    most = 2 * learned_phases * 2 * 2 * 10  # iterations x phases x tasks x episodes x horizon
    if family == "HalfCheetahVel":  # never terminates: every episode runs the horizon
        assert rows[-1]["env_steps"] == most
        if algorithm == "reptile":  # its post-adaptation episodes are counted apart
            assert rows[-1]["env_steps_monitoring"] == 2 * 2 * 2 * 10
        else:
            assert "env_steps_monitoring" not in rows[-1]
    else:  # a Navigation2D episode ends early when it reaches its goal
        assert 0 < rows[0]["env_steps"] < rows[1]["env_steps"] <= most
    result = metarl("evaluate", str(run), "--json", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["metric"] == "return" and ev["steps"] == [0, 1] and ev["num_tasks"] == 2 and len(ev["ci95"]) == 2


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    cfg = ROOT / "experiments" / "navigation2d" / "maml_trpo.yaml"
    args = [
        "meta_batch_size=3",
        "episodes_per_task=3",
        "horizon=15",
        "checkpoint_every=2",
        "policy.hidden=[8]",
        "threads=1",
    ]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert (
        metarl("train", str(cfg), "--run-dir", str(whole), "--no-progress", "num_iterations=4", *args).returncode == 0
    )
    assert metarl("train", str(cfg), "--run-dir", str(part), "--no-progress", "num_iterations=2", *args).returncode == 0
    result = metarl("train", "--resume", "--run-dir", str(part), "--no-progress", "num_iterations=4")
    assert result.returncode == 0, result.stderr
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4 and a["env_steps"] == b["env_steps"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "env_steps_per_s"))}
    assert [strip(r) for r in rows(whole)] == [strip(r) for r in rows(part)]


def test_bad_rl_config_values_are_named(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("family: Navigation3D\nalgorithm: maml_trpo\nnum_iterations: 1\n")
    result = metarl("train", str(cfg), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "family" in result.stderr and "Navigation2D" in result.stderr
    cfg.write_text("family: Navigation2D\nalgorithm: maml_trpo\nnum_iterations: 1\nouter: {optimizer: adam}\n")
    result = metarl("train", str(cfg), "--run-dir", str(tmp_path / "r2"))
    assert result.returncode == 2 and "outer.optimizer" in result.stderr
    result = metarl(
        "train",
        str(ROOT / "experiments/navigation2d/maml_trpo.yaml"),
        "--run-dir",
        str(tmp_path / "r3"),
        "outer.trpo.max_kl=-1",
    )
    assert result.returncode == 2 and "outer.trpo.max_kl" in result.stderr and "Traceback" not in result.stderr


def test_passing_the_sampling_parameters_gives_the_same_update():
    policy, learner, train, valid = tiny_batch(seed=6)
    theta0 = {k: v.clone() for k, v in learner.theta().items()}
    adapted = learner.adapt(theta0, train, first_order=True)
    a = learner.step(RLBatch(train, valid), 0)
    after_a = flatten(learner.theta()).clone()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            p.copy_(theta0[name])
    b = learner.step(RLBatch(train, valid, adapted), 0)
    assert a == b and torch.equal(flatten(learner.theta()), after_a)


def test_ray_workers_give_the_same_run_as_in_process_sampling(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("family: HalfCheetahVel\nalgorithm: maml_trpo\nnum_iterations: 2\n")
    runs = {}
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        result = metarl("train", str(cfg), "--run-dir", str(run), "--no-progress", *TINY, f"ray.workers={workers}")
        assert result.returncode == 0, result.stderr
        runs[workers] = run
    a = torch.load(runs[0] / "checkpoint.pt", weights_only=True)
    b = torch.load(runs[2] / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "env_steps_per_s"))}
    assert [strip(r) for r in rows(runs[0])] == [strip(r) for r in rows(runs[2])]
