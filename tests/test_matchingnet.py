"""Matching Networks: cosine attention, the attended label vote, full-context embeddings, training, classifier."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from image_tasks import random_image_task
from torch import nn

from agents.matchingnet import FullContextEmbedding, MatchingNet, matching_attention, matching_probs
from agents.models import ConvNet
from metarl.fewshot.batch import FewShotBatch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


_task = random_image_task


def test_attention_of_each_query_sums_to_one():
    g = torch.Generator().manual_seed(0)
    query, support = torch.randn(7, 16, generator=g), torch.randn(10, 16, generator=g)
    a = matching_attention(query, support)
    assert a.shape == (7, 10) and (a > 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(7))
    # also through the learner, with full-context embeddings: the class probabilities sum to one
    torch.manual_seed(0)
    learner = MatchingNet(ConvNet(n_way=3, filters=8), n_way=3, fce=True, fce_steps=2)
    task = _task()
    probs = learner.task_logits(learner.theta(), task.support_x, task.support_y, task.query_x).exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))


def test_probabilities_by_hand_without_fce():
    # 2 classes x 2 shots in 2-D; class 0: (1, 0), (1, 1); class 1: (0, 1), (-1, 0)
    support = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    support_y = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    s = 2**-0.5
    # cosines of (2, 0): 1, s, 0, -1; of (0, 3): 0, s, 1, 0
    e = math.exp
    z0 = e(1) + e(s) + e(0) + e(-1)
    z1 = e(0) + e(s) + e(1) + e(0)
    expected_attention = torch.tensor([[e(1), e(s), e(0), e(-1)], [e(0), e(s), e(1), e(0)]]) / torch.tensor(
        [[z0], [z1]]
    )
    torch.testing.assert_close(matching_attention(query, support), expected_attention)
    expected = torch.tensor([[(e(1) + e(s)) / z0, (e(0) + e(-1)) / z0], [(e(0) + e(s)) / z1, (e(1) + e(0)) / z1]])
    torch.testing.assert_close(matching_probs(query, support, support_y, 2), expected)
    # the labels, not the positions, decide the vote
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(matching_probs(query, support[perm], support_y[perm], 2), expected)


def test_scale_multiplies_the_cosines_before_the_softmax():
    # the support and query of the hand test above; scale 3: a = softmax(3 cos)
    support = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    support_y = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[2.0, 0.0]])
    s, e = 2**-0.5, math.exp
    weights = [e(3), e(3 * s), e(0), e(-3)]
    z = sum(weights)
    torch.testing.assert_close(matching_attention(query, support, 3.0), torch.tensor([weights]) / z)
    expected = torch.tensor([[(weights[0] + weights[1]) / z, (weights[2] + weights[3]) / z]])
    torch.testing.assert_close(matching_probs(query, support, support_y, 2, 3.0), expected)
    # the learner applies its scale to the backbone's embeddings
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8)
    learner = MatchingNet(model, n_way=3, scale=10.0)
    task = _task()
    with torch.no_grad():
        emb = model.features(torch.cat([task.support_x, task.query_x])).flatten(1)
        cos = torch.nn.functional.normalize(emb[6:], dim=-1) @ torch.nn.functional.normalize(emb[:6], dim=-1).T
        by_hand = (torch.softmax(10.0 * cos, -1) @ torch.nn.functional.one_hot(task.support_y, 3).float()).log()
    logits = learner.task_logits(learner.theta(), task.support_x, task.support_y, task.query_x)
    torch.testing.assert_close(logits.detach(), by_hand, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scale must be positive"):
        MatchingNet(ConvNet(n_way=3, filters=8), n_way=3, scale=0.0)


def _reference_fce(fce: FullContextEmbedding, g: torch.Tensor, f: torch.Tensor, steps: int) -> torch.Tensor:
    """The paper's equations with PyTorch's own fused LSTM kernels (nn.LSTM, nn.LSTMCell) holding the same weights."""
    d = g.shape[-1]
    bi = nn.LSTM(d, d, bidirectional=True)
    att = nn.LSTMCell(2 * d, d)
    with torch.no_grad():
        for suffix, cell in (("_l0", fce.forward_lstm), ("_l0_reverse", fce.backward_lstm)):
            for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"):
                getattr(bi, name + suffix).copy_(getattr(cell, name))
        att.load_state_dict(fce.attention_lstm.state_dict())
    out, _ = bi(g)  # [S, 2D]: forward and backward hidden states
    g_full = g + out[:, :d] + out[:, d:]
    h, c = f, torch.zeros_like(f)
    for _ in range(steps):
        a = torch.softmax(h @ g_full.T, dim=-1)  # a(h_{k-1}, g(x_i)) = softmax(h^T g)
        r = a @ g_full
        h_hat, c = att(torch.cat([f, r], -1), (h, c))
        h = h_hat + f
    return g_full, h


def test_fce_follows_the_paper_and_its_lstms_learn():
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8)
    learner = MatchingNet(model, n_way=3, fce=True, fce_steps=3)
    plain = MatchingNet(model, n_way=3)
    task = _task()
    with torch.no_grad():
        z = model.features(torch.cat([task.support_x, task.query_x])).flatten(1)
        g_ref, f_ref = _reference_fce(learner.fce, z[:6], z[6:], 3)
        g, f = learner.fce.support(z[:6]), learner.fce.query(z[6:], learner.fce.support(z[:6]))
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    assert (g - z[:6]).abs().max() > 1e-2 and (f - z[6:]).abs().max() > 1e-2  # the embedding changes
    logits = learner.task_logits(learner.theta(), task.support_x, task.support_y, task.query_x)
    expected = matching_probs(f_ref, g_ref, task.support_y, 3).log()
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-4, atol=1e-5)
    without = plain.task_logits(plain.theta(), task.support_x, task.support_y, task.query_x)
    assert (logits - without).abs().max() > 1e-3
    # one step: every LSTM weight gets a gradient and moves, and the learner checkpoints them
    before = {k: v.clone() for k, v in learner.modules.state_dict().items()}
    batch = FewShotBatch(*(torch.stack(x) for x in zip(task, _task(seed=1))))
    learner.step(batch, 0)
    for name, p in learner.modules.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p.detach(), before[name]), name
    assert (
        set(learner.state_dict()["modules"]) == set(before) and len(before) == 12
    )  # 3 nn.LSTMCell x (weight_ih, bias_ih, weight_hh, bias_hh)


@pytest.mark.parametrize("batched", [False, True])
def test_step_is_one_adam_step_on_minus_log_of_the_attended_true_label(batched):
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8, vmap_safe_norm=batched)
    reference = ConvNet(n_way=3, filters=8, vmap_safe_norm=batched)
    reference.load_state_dict(model.state_dict())
    learner = MatchingNet(model, n_way=3, outer_lr=1e-2, batched=batched)
    tasks = [_task(seed=s) for s in (1, 2)]
    batch = FewShotBatch(*(torch.stack(x) for x in zip(*tasks)))
    metrics = learner.step(batch, 0)
    losses = []  # by hand: cosine attention, the summed attention on the true class, -log
    for t in tasks:
        z = reference.features(torch.cat([t.support_x, t.query_x])).flatten(1)
        s, q = z[:6], z[6:]
        cos = (q @ s.T) / (q.norm(dim=1)[:, None] * s.norm(dim=1)[None])
        a = cos.exp() / cos.exp().sum(1, keepdim=True)
        p_true = (a * (t.query_y[:, None] == t.support_y[None])).sum(1)
        losses.append(-p_true.log().mean())
    loss = torch.stack(losses).mean()
    loss.backward()
    assert metrics["loss_post_adapt"] == pytest.approx(float(loss.detach()), rel=1e-4)
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.grad, dict(reference.named_parameters())[name].grad, rtol=1e-3, atol=1e-5)
    curve = learner.adaptation_curve(batch)
    assert curve["accuracy"].shape == (2, 1) and curve["loss"].shape == (2, 1)


def test_fce_under_vmap_matches_the_loop():
    torch.manual_seed(0)
    loop = MatchingNet(ConvNet(n_way=3, filters=8, vmap_safe_norm=True), n_way=3, fce=True, fce_steps=2)
    vmapped = MatchingNet(loop.model, n_way=3, fce=True, fce_steps=2, batched=True)
    vmapped.modules.load_state_dict(loop.modules.state_dict())
    batch = FewShotBatch(*(torch.stack(x) for x in zip(_task(seed=1), _task(seed=2))))
    a, b = loop.adaptation_curve(batch), vmapped.adaptation_curve(batch)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_matchingnet_run_trains_evaluates_and_classifies(tmp_path):
    import json

    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main
    from metarl.fewshot.images import preprocess_images

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/matchingnet_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=40", "eval.every=0"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "100"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["steps"] == [0]
    assert result["mean"][0] > 0.35  # 40 steps of 8 tasks with 8 filters (measured 0.63 with scale 10); chance is 0.2
    clf = FewShotClassifier.from_run(run)
    task = _task(n_way=5, k=1, q=1, seed=3)
    adapted = clf.adapt(list(task.support_x[:, 0].numpy()), list("abcde"))
    proba = adapted.predict_proba(list(task.query_x[:, 0].numpy()))
    # the classifier's probabilities are the attention vote itself (softmax of its log)
    query = preprocess_images(list(task.query_x[:, 0].numpy()), image_size=28)
    with torch.no_grad():
        z = clf.learner.model.features(torch.cat([adapted.support_x, query])).flatten(1)
    expected = matching_probs(z[5:], z[:5], torch.arange(5), 5, 10.0)  # the config's matchingnet.scale
    torch.testing.assert_close(torch.from_numpy(proba), expected, rtol=1e-4, atol=1e-5)
    # full-context embeddings: the LSTMs come back from the checkpoint
    fce_run = tmp_path / "fce"
    args = ["train", "experiments/omniglot/matchingnet_5w1s.yaml", "--run-dir", str(fce_run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=3", "eval.every=0",
            "matchingnet.fce=true", "matchingnet.fce_steps=2"]  # fmt: skip
    assert main(args) == 0
    saved = torch.load(fce_run / "checkpoint.pt", weights_only=True)["learner"]["modules"]
    restored = FewShotClassifier.from_run(fce_run).learner.modules.state_dict()
    assert set(saved) == set(restored) and len(saved) == 12
    for name, value in saved.items():
        torch.testing.assert_close(restored[name], value)
