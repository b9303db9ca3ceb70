"""Per-task replay buffers (metarl.rl.replay): contents, ring overwrite, seeded draws, checkpoint round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from metarl.rl.episodes import Episodes
from metarl.rl.replay import TaskReplayBuffers


def _fields(rewards, obs_dim=3, act_dim=2):
    """Transitions whose every entry encodes its reward r: obs r, action -r, next obs r + 0.5, terminal r odd."""
    r = np.asarray(rewards, dtype=np.float32)
    return {
        "observations": np.repeat(r[:, None], obs_dim, 1),
        "actions": np.repeat(-r[:, None], act_dim, 1),
        "rewards": r,
        "next_observations": np.repeat(r[:, None] + 0.5, obs_dim, 1),
        "terminals": (r % 2 == 1).astype(np.float32),
    }


def test_draws_are_the_added_transitions_at_the_generators_indices():
    buffers = TaskReplayBuffers(num_tasks=3, capacity=10, obs_dim=3, act_dim=2)
    buffers.add(0, **_fields([0, 1, 2, 3]))
    buffers.add(2, **_fields([10, 11]))
    batch = buffers.sample([2, 0], 5, np.random.default_rng(7))
    # the draw is rng.integers(0, size) per task, in the order asked
    rng = np.random.default_rng(7)
    expected_2 = np.array([10, 11], dtype=np.float32)[rng.integers(0, 2, 5)]
    expected_0 = np.array([0, 1, 2, 3], dtype=np.float32)[rng.integers(0, 4, 5)]
    assert batch.rewards.shape == (2, 5) and batch.observations.shape == (2, 5, 3) and batch.actions.shape == (2, 5, 2)
    np.testing.assert_array_equal(batch.rewards.numpy(), np.stack([expected_2, expected_0]))
    np.testing.assert_array_equal(batch.observations[..., 1].numpy(), batch.rewards.numpy())
    np.testing.assert_array_equal(batch.actions[..., 0].numpy(), -batch.rewards.numpy())
    np.testing.assert_array_equal(batch.next_observations[..., 2].numpy(), batch.rewards.numpy() + 0.5)
    np.testing.assert_array_equal(batch.terminals.numpy(), batch.rewards.numpy() % 2)


def test_past_capacity_the_oldest_transitions_are_overwritten():
    buffers = TaskReplayBuffers(num_tasks=1, capacity=5, obs_dim=3, act_dim=2)
    buffers.add(0, **_fields([0, 1, 2]))
    buffers.add(0, **_fields([3, 4, 5, 6]))
    assert buffers.sizes[0] == 5
    drawn = buffers.sample([0], 400, np.random.default_rng(0)).rewards.numpy()
    assert set(drawn.ravel().tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}
    buffers.add(0, **_fields(list(range(100, 112))))  # more than the capacity at once: the last 5 stay
    assert set(buffers.sample([0], 400, np.random.default_rng(0)).rewards.numpy().ravel().tolist()) == {
        107.0,
        108.0,
        109.0,
        110.0,
        111.0,
    }
    buffers.clear(0)
    with pytest.raises(ValueError, match="empty"):
        buffers.sample([0], 1, np.random.default_rng(0))


def test_add_episodes_links_next_observations_and_marks_only_terminations():
    # 2 tasks, horizon 3, 2 episodes each; task 1's episode 0 terminates after 2 steps
    n, h, e, d = 2, 3, 2, 1
    obs = torch.arange(n * h * e, dtype=torch.float32).reshape(n, h, e, d)
    lengths = torch.tensor([[3, 3], [2, 3]])
    mask = (torch.arange(h)[None, :, None] < lengths[:, None, :]).float()
    episodes = Episodes(
        observations=obs * mask[..., None],
        actions=(obs * 10) * mask[..., None],
        rewards=obs[..., 0] * mask,
        log_probs=torch.zeros(n, h, e),
        mask=mask,
        final_observations=torch.tensor([[[100.0], [101.0]], [[102.0], [103.0]]]),
        terminated=torch.tensor([[False, False], [True, False]]),
        lengths=lengths,
    ).check()
    buffers = TaskReplayBuffers(num_tasks=4, capacity=20, obs_dim=1, act_dim=1)
    assert buffers.add_episodes([3, 1], episodes) == 11
    state = buffers.state_dict()
    # task 0 of the batch went to buffer 3: episode 0 (obs 0, 2, 4) then episode 1 (obs 1, 3, 5)
    np.testing.assert_array_equal(state["observations"][3][:, 0].numpy(), [0, 2, 4, 1, 3, 5])
    np.testing.assert_array_equal(state["next_observations"][3][:, 0].numpy(), [2, 4, 100, 3, 5, 101])
    np.testing.assert_array_equal(state["actions"][3][:, 0].numpy(), [0, 20, 40, 10, 30, 50])
    np.testing.assert_array_equal(state["terminals"][3].numpy(), [0, 0, 0, 0, 0, 0])  # truncated: not terminal
    # task 1 of the batch went to buffer 1: episode 0 ran 2 steps and terminated
    np.testing.assert_array_equal(state["observations"][1][:, 0].numpy(), [6, 8, 7, 9, 11])
    np.testing.assert_array_equal(state["next_observations"][1][:, 0].numpy(), [8, 102, 9, 11, 103])
    np.testing.assert_array_equal(state["terminals"][1].numpy(), [0, 1, 0, 0, 0])
    assert buffers.sizes.tolist() == [0, 5, 0, 6]
    assert buffers.nbytes() == 11 * (1 + 1 + 1 + 1 + 1) * 4


def test_checkpoint_round_trip_continues_the_same_draws_and_overwrites():
    buffers = TaskReplayBuffers(num_tasks=2, capacity=5, obs_dim=3, act_dim=2)
    buffers.add(0, **_fields([0, 1, 2, 3, 4, 5, 6]))  # wrapped: the layout matters for the draws
    buffers.add(1, **_fields([20, 21]))
    file = io.BytesIO()
    torch.save(buffers.state_dict(), file)
    file.seek(0)
    restored = TaskReplayBuffers(num_tasks=2, capacity=5, obs_dim=3, act_dim=2)
    restored.load_state_dict(torch.load(file, weights_only=True))
    for buf in (buffers, restored):
        buf.add(0, **_fields([7]))
        buf.add(1, **_fields([22]))
    a = buffers.sample([0, 1, 0], 64, np.random.default_rng(3))
    b = restored.sample([0, 1, 0], 64, np.random.default_rng(3))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert set(a.rewards[0].tolist()) == {3.0, 4.0, 5.0, 6.0, 7.0}
    with pytest.raises(ValueError, match="capacity"):
        TaskReplayBuffers(num_tasks=2, capacity=6, obs_dim=3, act_dim=2).load_state_dict(buffers.state_dict())


def test_bad_input_names_the_value():
    buffers = TaskReplayBuffers(num_tasks=2, capacity=5, obs_dim=3, act_dim=2)
    with pytest.raises(ValueError, match="task index 2 out of range"):
        buffers.add(2, **_fields([0]))
    with pytest.raises(ValueError, match=r"observations must have shape \(1, 3\)"):
        buffers.add(0, **{**_fields([0]), "observations": np.zeros((1, 4))})
    with pytest.raises(ValueError, match="exactly the fields"):
        buffers.add(0, rewards=np.zeros(1))
    with pytest.raises(ValueError, match=">= 1"):
        TaskReplayBuffers(num_tasks=0, capacity=5, obs_dim=3, act_dim=2)
