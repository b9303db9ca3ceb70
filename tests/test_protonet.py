"""Prototypical Networks and the metric-based learner base: prototypes, distances, training, classifier."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from image_tasks import random_image_task

from agents.models import ConvNet
from agents.protonet import ProtoNet, prototype_logits
from metarl.fewshot.batch import FewShotBatch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def test_prototype_logits_by_hand():
    # 2 classes x 2 shots in 2-D: prototypes (1, 0) and (0, 3)
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    logits = prototype_logits(support, query, 2, "euclidean")
    # |(1,1)-(1,0)|^2 = 1, |(1,1)-(0,3)|^2 = 1 + 4 = 5; |(0,3)-(1,0)|^2 = 1 + 9 = 10, |(0,3)-(0,3)|^2 = 0
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -5.0], [-10.0, 0.0]]))
    cosine = prototype_logits(support, query, 2, "cosine")
    s = 2**-0.5
    torch.testing.assert_close(cosine, torch.tensor([[s, s], [0.0, 1.0]]))


_task = random_image_task


def test_task_logits_are_distances_to_class_mean_embeddings():
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8)
    learner = ProtoNet(model, n_way=3)
    task = _task()
    logits = learner.task_logits(learner.theta(), task.support_x, task.support_y, task.query_x)
    with torch.no_grad():  # an independent computation: the backbone on all images, then the means
        z = model.features(torch.cat([task.support_x, task.query_x])).flatten(1)
    prototypes = torch.stack([z[:6][task.support_y == c].mean(0) for c in range(3)])
    expected = -torch.cdist(z[6:], prototypes).pow(2)
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-4, atol=1e-3)
    # the order of the shots within a class does not matter
    swap = torch.tensor([1, 0, 3, 2, 5, 4])
    again = learner.task_logits(learner.theta(), task.support_x[swap], task.support_y, task.query_x)
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batched", [False, True])
def test_step_is_one_adam_step_on_the_mean_query_cross_entropy(batched):
    torch.manual_seed(0)
    model = ConvNet(n_way=3, filters=8, vmap_safe_norm=batched)
    reference = ConvNet(n_way=3, filters=8, vmap_safe_norm=batched)
    reference.load_state_dict(model.state_dict())
    learner = ProtoNet(model, n_way=3, outer_lr=1e-2, batched=batched)
    tasks = [_task(seed=s) for s in (1, 2)]
    batch = FewShotBatch(*(torch.stack(x) for x in zip(*tasks)))
    metrics = learner.step(batch, 0)
    # by hand: the mean over tasks of the cross-entropy of -squared distances, one Adam step
    losses = []
    for t in tasks:
        z = reference.features(torch.cat([t.support_x, t.query_x])).flatten(1)
        protos = z[:6].view(3, 2, -1).mean(1)
        logits = -((z[6:, None] - protos[None]) ** 2).sum(-1)
        losses.append(torch.nn.functional.cross_entropy(logits, t.query_y))
    loss = torch.stack(losses).mean()
    loss.backward()
    assert metrics["loss_post_adapt"] == pytest.approx(float(loss.detach()), rel=1e-4)
    for name, value in model.named_parameters():  # the learner's gradient is that of this loss
        torch.testing.assert_close(value.grad, dict(reference.named_parameters())[name].grad, rtol=1e-3, atol=1e-5)
    before = dict(reference.named_parameters())["features.0.weight"]
    moved = (model.features[0].weight - before).abs()  # Adam's first step: lr x sign of the gradient
    assert torch.allclose(moved[before.grad.abs() > 1e-4], torch.tensor(1e-2), rtol=1e-3)
    curve = learner.adaptation_curve(batch)
    assert curve["accuracy"].shape == (2, 1) and curve["loss"].shape == (2, 1)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"Omniglot data not found at {DATA}")
def test_protonet_run_trains_evaluates_and_classifies(tmp_path, capsys):
    import json

    from metarl.app.classifier import FewShotClassifier
    from metarl.app.cli import main

    run = tmp_path / "run"
    args = ["train", "experiments/omniglot/protonet_5w1s.yaml", "--run-dir", str(run), "--no-progress",
            f"omniglot.root={DATA}", "omniglot.filters=8", "num_iterations=40", "eval.every=0"]  # fmt: skip
    assert main(args) == 0
    assert main(["evaluate", str(run), "--num-tasks", "100"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["steps"] == [0]
    assert result["mean"][0] > 0.35  # 40 steps of 8 tasks with 8 filters (measured 0.49); chance is 0.2
    clf = FewShotClassifier.from_run(run)
    exp_task = _task(n_way=5, k=1, q=1, seed=3)
    adapted = clf.adapt(list(exp_task.support_x[:, 0].numpy()), list("abcde"))
    # a support image is its own nearest prototype
    assert list(adapted.predict(list(exp_task.support_x[:, 0].numpy()))) == list("abcde")
    capsys.readouterr()
    assert (
        main(["train", "experiments/sinusoid/maml.yaml", "algorithm=protonet", "--run-dir", str(tmp_path / "s")]) == 2
    )
    assert "protonet classifies images; use it with family omniglot" in capsys.readouterr().err
