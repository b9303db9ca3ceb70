"""Siamese verification networks: pair scores, class scores, the balanced pair BCE, training, classifier."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from image_tasks import random_image_task
from torch import nn

from agents.models import ConvNet
from agents.siamese import Siamese, class_log_scores, pair_logits, pair_weights
from metarl.fewshot.batch import FewShotBatch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


_task = random_image_task


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_scores_by_hand():
    head = nn.Linear(2, 1)  # w = (1, -2), b = 0.5
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -2.0]]))
        head.bias.fill_(0.5)
    support = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0], [1.0, 0.5]])
    support_y = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    logits = pair_logits(head, support, query)
    # |q - s|: (1, 0), (0, 1), (2, 0), (0, 0.5) -> 1 + 0.5, -2 + 0.5, 2 + 0.5, -1 + 0.5
    torch.testing.assert_close(logits, torch.tensor([[1.5, -1.5, 2.5, -0.5]]))
    class_scores = class_log_scores(logits, support_y, 2).exp()  # mean p(same) of each class's support images
    expected = [(_sigmoid(1.5) + _sigmoid(-1.5)) / 2, (_sigmoid(2.5) + _sigmoid(-0.5)) / 2]
    torch.testing.assert_close(class_scores, torch.tensor([expected]))
    # one-shot: the class of the best-matching support image
    one = class_log_scores(logits[:, [1, 3]], torch.tensor([0, 1]), 2).exp()
    torch.testing.assert_close(one, torch.tensor([[_sigmoid(-1.5), _sigmoid(-0.5)]]))
    # saturated scores stay finite in log space
    assert torch.isfinite(class_log_scores(torch.tensor([[-200.0, -300.0, -250.0, -400.0]]), support_y, 2)).all()


def test_pair_weighting_counts_same_and_different_pairs_equally():
    # 3-way 2-shot, 2 queries per class: 6 x 6 pairs, 12 same-class (weight 1/24), 24 different (1/48)
    query_y = torch.tensor([0, 0, 1, 1, 2, 2])
    support_y = torch.tensor([0, 0, 1, 1, 2, 2])
    w = pair_weights(query_y, support_y)
    same = query_y[:, None] == support_y[None]
    assert same.sum() == 12
    torch.testing.assert_close(w[same], torch.full((12,), 1 / 24))
    torch.testing.assert_close(w[~same], torch.full((24,), 1 / 48))
    assert float(w[same].sum()) == pytest.approx(0.5) and float(w[~same].sum()) == pytest.approx(0.5)
    # 20-way 1-shot, 1 query per class: one positive per query among 20 pairs
    w20 = pair_weights(torch.arange(20), torch.arange(20))
    torch.testing.assert_close(w20.diagonal(), torch.full((20,), 1 / 40))
    assert float(w20.sum()) == pytest.approx(1.0) and float(w20[0, 1]) == pytest.approx(1 / (2 * 380))


@pytest.mark.parametrize("batched", [False, True])
def test_step_is_one_adam_step_on_the_balanced_pair_bce(batched):
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8, vmap_safe_norm=batched)
    reference = ConvNet(n_way=3, filters=8, vmap_safe_norm=batched)
    reference.load_state_dict(model.state_dict())
    learner = Siamese(model, n_way=3, outer_lr=1e-2, batched=batched)
    w, b = learner.modules.weight.detach().clone().requires_grad_(), learner.modules.bias.detach().clone()
    b.requires_grad_()
    tasks = [_task(seed=s) for s in (1, 2)]
    batch = FewShotBatch(*(torch.stack(x) for x in zip(*tasks)))
    metrics = learner.step(batch, 0)
    losses, correct = [], []  # by hand: every query-support pair, -[y log p + (1 - y) log(1 - p)], per-kind means
    for t in tasks:
        z = reference.features(torch.cat([t.support_x, t.query_x])).flatten(1)
        pos, neg, class_scores = [], [], torch.zeros(6, 3)
        for i in range(6):
            for j in range(6):
                p = torch.sigmoid((w * (z[6 + i] - z[j]).abs()).sum() + b).squeeze()
                if t.query_y[i] == t.support_y[j]:
                    pos.append(-torch.log(p))
                else:
                    neg.append(-torch.log(1 - p))
                class_scores[i, t.support_y[j]] += p.detach() / 2
        losses.append(0.5 * torch.stack(pos).mean() + 0.5 * torch.stack(neg).mean())
        correct.append((class_scores.argmax(1) == t.query_y).float().mean())
    loss = torch.stack(losses).mean()
    loss.backward()
    assert metrics["loss_post_adapt"] == pytest.approx(float(loss.detach()), rel=1e-4)
    assert metrics["accuracy_post_adapt"] == pytest.approx(float(torch.stack(correct).mean()))
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.grad, dict(reference.named_parameters())[name].grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(learner.modules.weight.grad, w.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(learner.modules.bias.grad, b.grad, rtol=1e-3, atol=1e-6)
    curve = learner.adaptation_curve(batch)
    assert curve["accuracy"].shape == (2, 1) and curve["loss"].shape == (2, 1)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_siamese_run_trains_evaluates_and_classifies(tmp_path):
    import json

    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main
    from metarl.fewshot.images import preprocess_images

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/siamese_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=40", "eval.every=0"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "100"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["steps"] == [0]
    assert result["mean"][0] > 0.3  # 40 steps of 8 tasks with 8 filters (measured 0.38); chance is 0.2
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["learner"]["modules"]
    clf = FewShotClassifier.from_run(run)
    torch.testing.assert_close(clf.learner.modules.weight, saved["weight"])  # the verifier's w, b come back
    torch.testing.assert_close(clf.learner.modules.bias, saved["bias"])
    task = _task(n_way=5, k=1, q=2, seed=3)
    adapted = clf.adapt(list(task.support_x[:, 0].numpy()), list("abcde"))
    proba = adapted.predict_proba(list(task.query_x[:, 0].numpy()))
    # one-shot: predict_proba is p(same | query, support image) normalised over the 5 support images
    query = preprocess_images(list(task.query_x[:, 0].numpy()), image_size=28)
    with torch.no_grad():
        p = torch.sigmoid(clf.learner.pair_logits(clf.learner.theta(), adapted.support_x, query))
    torch.testing.assert_close(torch.from_numpy(proba), p / p.sum(1, keepdim=True), rtol=1e-4, atol=1e-5)
