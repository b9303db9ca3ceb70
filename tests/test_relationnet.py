"""Relation Networks: class sums, relation scores, the MSE to the one-hot match, training, classifier."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from image_tasks import random_image_task
from torch import nn

from agents.models import ConvNet
from agents.relationnet import RelationModule, RelationNet, class_sums, relation_logits
from metarl.fewshot.batch import FewShotBatch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


_task = random_image_task


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_relation_scores_by_hand_with_a_fixed_relation_module():
    # 2 classes x 2 shots in 2-D: class sums (1, 2) and (0, -1)
    support = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0], [-1.0, 0.0]])
    support_y = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    g = nn.Linear(4, 1)  # g([c, q]) = c1 - c2 + 0.5 q1 + 2 q2 - 1
    with torch.no_grad():
        g.weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 2.0]]))
        g.bias.fill_(-1.0)
    logits = relation_logits(lambda pairs: g(pairs).squeeze(-1), support, support_y, query, 2)
    # q (1, 1): class 0: 1 - 2 + 0.5 + 2 - 1 = 0.5; class 1: 0 + 1 + 0.5 + 2 - 1 = 2.5
    # q (2, 0): class 0: 1 - 2 + 1 + 0 - 1 = -1;   class 1: 0 + 1 + 1 + 0 - 1 = 1
    torch.testing.assert_close(logits, torch.tensor([[0.5, 2.5], [-1.0, 1.0]]))
    scores = torch.sigmoid(logits)
    torch.testing.assert_close(scores, torch.tensor([[_sigmoid(0.5), _sigmoid(2.5)], [_sigmoid(-1), _sigmoid(1)]]))


def test_k_shot_class_features_are_sums():
    support = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [0.0, 1.0], [0.0, 10.0], [2.0, 0.0]])
    support_y = torch.tensor([0, 0, 0, 1, 1, 1])
    torch.testing.assert_close(class_sums(support, support_y, 2), torch.tensor([[9.0, 12.0], [2.0, 11.0]]))
    # through the learner: the relation module sees [sum of the class's embeddings, the query's embedding]
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8)
    learner = RelationNet(model, n_way=3)
    task = _task(k=3)
    seen = []
    learner.modules.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    logits = learner.relation_logits(learner.theta(), task.support_x, task.support_y, task.query_x)
    with torch.no_grad():
        z = model.features(torch.cat([task.support_x, task.query_x])).flatten(1)
    pairs = seen[0]
    assert pairs.shape == (6, 3, 16)
    sums = torch.stack([z[3 * c : 3 * c + 3].sum(0) for c in range(3)])
    torch.testing.assert_close(pairs[..., :8].detach(), sums.expand(6, 3, 8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pairs[..., 8:].detach(), z[9:, None].expand(6, 3, 8), rtol=1e-5, atol=1e-5)
    swap = torch.tensor([2, 0, 1, 4, 5, 3, 8, 6, 7])  # the order of the shots within a class does not matter
    again = learner.relation_logits(learner.theta(), task.support_x[swap], task.support_y, task.query_x)
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-5)


def test_relation_module_shape_and_scores_in_unit_interval():
    torch.manual_seed(0)
    g = RelationModule(8, blocks=2, hidden=8)
    linears = [m for m in g.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 8), (8, 8), (8, 8), (8, 1)]
    assert [(m.in_features, m.out_features) for m in RelationModule(8, blocks=0, hidden=5).modules()
            if isinstance(m, nn.Linear)] == [(16, 5), (5, 1)]  # fmt: skip
    torch.manual_seed(0)
    learner = RelationNet(ConvNet(n_way=3, filters=8), n_way=3)
    task = _task()
    scores = learner.task_logits(learner.theta(), task.support_x, task.support_y, task.query_x).exp()
    assert scores.shape == (6, 3) and (scores > 0).all() and (scores < 1).all()
    with pytest.raises(ValueError, match="hidden >= 1"):
        RelationNet(ConvNet(n_way=3, filters=8), n_way=3, hidden=0)


@pytest.mark.parametrize("batched", [False, True])
def test_step_is_one_adam_step_on_the_mse_to_the_one_hot_match(batched):
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8, vmap_safe_norm=batched)
    reference = ConvNet(n_way=3, filters=8, vmap_safe_norm=batched)
    reference.load_state_dict(model.state_dict())
    learner = RelationNet(model, n_way=3, outer_lr=1e-2, batched=batched)
    relation = RelationModule(8)
    relation.load_state_dict(learner.modules.state_dict())
    tasks = [_task(seed=s) for s in (1, 2)]
    batch = FewShotBatch(*(torch.stack(x) for x in zip(*tasks)))
    metrics = learner.step(batch, 0)
    losses, correct = [], []  # by hand: every (class, query) pair scored, squared error to 1 / 0
    for t in tasks:
        z = reference.features(torch.cat([t.support_x, t.query_x])).flatten(1)
        pairs, targets = [], []
        for i in range(6):
            for c in range(3):
                pairs.append(torch.cat([z[2 * c] + z[2 * c + 1], z[6 + i]]))
                targets.append(float(t.query_y[i] == c))
        scores = torch.sigmoid(relation(torch.stack(pairs)).squeeze(-1))
        losses.append(((scores - torch.tensor(targets)) ** 2).sum() / 18)
        correct.append((scores.view(6, 3).argmax(1) == t.query_y).float().mean())
    loss = torch.stack(losses).mean()
    loss.backward()
    assert metrics["loss_post_adapt"] == pytest.approx(float(loss.detach()), rel=1e-4)
    assert metrics["accuracy_post_adapt"] == pytest.approx(float(torch.stack(correct).mean()))
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.grad, dict(reference.named_parameters())[name].grad, rtol=1e-3, atol=1e-5)
    for name, value in learner.modules.named_parameters():
        torch.testing.assert_close(value.grad, dict(relation.named_parameters())[name].grad, rtol=1e-3, atol=1e-6)
    curve = learner.adaptation_curve(batch)
    assert curve["accuracy"].shape == (2, 1) and curve["loss"].shape == (2, 1)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_relationnet_run_trains_evaluates_and_classifies(tmp_path):
    import json

    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main
    from metarl.fewshot.images import preprocess_images

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/relationnet_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=40", "eval.every=0",
            "outer.lr=0.003"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "100"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["steps"] == [0]
    # the MSE first pushes every score towards 0 (4 of 5 targets); with 8 filters and lr 0.003 the
    # training accuracy is 0.46 after 40 steps (0.32 with lr 0.001); measured 0.43 here; chance is 0.2
    assert result["mean"][0] > 0.3
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["learner"]["modules"]
    clf = FewShotClassifier.from_run(run)
    for name, value in clf.learner.modules.state_dict().items():  # the relation module comes back
        torch.testing.assert_close(value, saved[name])
    task = _task(n_way=5, k=1, q=2, seed=3)
    adapted = clf.adapt(list(task.support_x[:, 0].numpy()), list("abcde"))
    proba = adapted.predict_proba(list(task.query_x[:, 0].numpy()))
    assert proba.shape == (10, 5)
    # predict_proba normalises the relation scores over the classes
    query = preprocess_images(list(task.query_x[:, 0].numpy()), image_size=28)
    with torch.no_grad():
        logits = clf.learner.relation_logits(clf.learner.theta(), adapted.support_x, torch.arange(5), query)
    scores = torch.sigmoid(logits)
    torch.testing.assert_close(torch.from_numpy(proba), scores / scores.sum(1, keepdim=True), rtol=1e-4, atol=1e-5)
