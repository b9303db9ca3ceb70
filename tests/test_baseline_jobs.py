"""metarl.app.baseline_jobs: the PPO jobs of `evaluate --baselines` kept on disk, and retried on Ray."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from metarl.app.baseline_jobs import Job, JobRunner

CALLS: list[tuple[int, int]] = []


def power(x: int, n: int) -> dict[str, torch.Tensor]:
    CALLS.append((x, n))
    return {"value": torch.tensor(float(x) ** n)}


def test_finished_jobs_are_kept_and_not_run_again(tmp_path):
    CALLS.clear()
    lines: list[str] = []
    jobs = [Job("a", power, (2, 3)), Job("b", power, (3, 2))]
    first = JobRunner(tmp_path, log=lines.append)
    first.start(jobs)
    assert CALLS == []  # in this process, the jobs run when their results are asked for
    done = first.results()
    assert {k: v["value"].item() for k, v in done.items()} == {"a": 8.0, "b": 9.0}
    assert CALLS == [(2, 3), (3, 2)] and len(list(tmp_path.glob("*.pt"))) == 2
    assert lines[0].startswith("baseline job a: 1/2 done") and lines[1].startswith("baseline job b: 2/2 done")

    # the same jobs again: loaded, not run; a job with other arguments has another key and runs
    CALLS.clear()
    lines.clear()
    again = JobRunner(tmp_path, log=lines.append)
    again.start([Job("a", power, (2, 3)), Job("b", power, (3, 3))])
    done = again.results()
    assert {k: v["value"].item() for k, v in done.items()} == {"a": 8.0, "b": 27.0}
    assert CALLS == [(3, 3)] and again.kept == ["a"]
    assert lines[0].startswith("baseline jobs: 1 of 2 already done")


def test_a_damaged_kept_result_is_run_again(tmp_path):
    CALLS.clear()
    job = Job("a", power, (5, 2))
    runner = JobRunner(tmp_path, log=lambda _: None)
    runner.start([job])
    runner.results()
    (path,) = tmp_path.glob("a-*.pt")
    path.write_bytes(path.read_bytes()[:20])
    runner = JobRunner(tmp_path, log=lambda _: None)
    runner.start([job])
    assert runner.results()["a"]["value"].item() == 25.0 and CALLS == [(5, 2), (5, 2)] and runner.kept == []


def test_job_keys_follow_every_argument():
    keys = {
        Job("a", power, (2, 3)).key,
        Job("a", power, (2, 4)).key,
        Job("a", power, (np.array([2.0]), 3)).key,
        Job("a", power, (np.array([2.5]), 3)).key,
    }
    assert len(keys) == 4
    assert Job("x", power, (np.array([2.0]), 3)).key == Job("y", power, ([2.0], 3)).key  # the name is not identity


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    yield
    ray.shutdown()  # the next test that needs Ray starts its own


def test_a_ray_job_whose_process_is_killed_is_run_again(tmp_path, local_ray):
    marker = tmp_path / "first_attempt.pid"

    def slow_square(x: int, marker_path: str) -> int:  # pickled by value: Ray workers need no test module
        import os
        import time

        try:  # the first attempt of either job claims the marker, says where it runs and waits to be killed
            fd = os.open(marker_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return x * x
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(120)
        return -1

    def kill_first_attempt() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            if marker.exists() and marker.read_text():  # the pid is written right after the file is made
                os.kill(int(marker.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_attempt, daemon=True)
    killer.start()
    lines: list[str] = []
    runner = JobRunner(tmp_path / "kept", workers=2, log=lines.append)
    runner.start([Job("a", slow_square, (7, str(marker))), Job("b", slow_square, (3, str(marker)))])
    t0 = time.time()
    done = runner.results()
    killer.join(timeout=1)
    assert done == {"a": 49, "b": 9}
    assert time.time() - t0 < 100  # the retry, not the 120 s sleep, produced the result
    assert len(list((tmp_path / "kept").glob("*.pt"))) == 2 and len(lines) == 2

    # an exception of the job itself is not retried: it reaches the caller as itself, not Ray's wrapper
    def fails(x: int) -> int:
        raise ValueError(f"bad input {x}")

    runner = JobRunner(tmp_path / "kept", workers=2, log=lines.append)
    runner.start([Job("bad", fails, (3,))])
    with pytest.raises(ValueError, match="bad input 3"):
        runner.results()
    assert not list((tmp_path / "kept").glob("bad-*.pt"))
