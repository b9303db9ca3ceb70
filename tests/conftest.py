"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: light on a shared machine, and bit-reproducible reductions."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def on_first_ray_wait(monkeypatch):
    """``install(action)``: the first time the code under test calls ``ray.wait`` (in a sampling call:
    every share submitted, none collected), ``action()`` runs and its result is appended to the list
    that ``install`` returns; then the wait goes on. Kills a worker mid-call with no timer to race."""

    def install(action):
        import ray

        wait, results = ray.wait, []

        def act_then_wait(*args, **kwargs):
            if not results:
                results.append(action())
            return wait(*args, **kwargs)

        monkeypatch.setattr(ray, "wait", act_then_wait)
        return results

    return install
