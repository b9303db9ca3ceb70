"""Meta-World's own evaluation protocol on a run: its vector envs, ``metalearning_evaluation`` per split.

:func:`make_eval_envs` builds Meta-World's vector env of a run's benchmark and split
(:func:`eval_env_settings`: how each class's goals are dealt to the sub-envs);
:func:`evaluate_splits` runs the protocol on the train and test splits (``metarl evaluate
--metaworld``) and :func:`score` one split, with the run's agent (:mod:`metarl.app.metaworld_agent`).

Every sub-env's episodes are counted. Meta-World documents its meta-RL protocol as evaluating each
adapted sub-env for ``evaluation_episodes`` episodes and averaging within each sub-env, then across
them; Metaworld 3.0's ``evaluation`` instead stops once each task *class* has that many finished
episodes, and with ``terminate_on_success`` a successful episode ends early, so the first
episodes to finish are the successes: for ML1 (20 sub-envs of one class, 3 episodes) the shipped
figure is about "did 3 of 20 sub-envs succeed before the others' 500 steps". :func:`evaluate_every_sub_env`
runs ``metalearning_evaluation``'s evaluation step to the documented count and also computes the
shipped figure from the same episodes (its loop steps the same envs with the same actions, so its
first episodes are these), recorded as ``metaworld_3_0``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np

from metarl.app.metaworld_agent import agent_of, default_adaptation_steps

#: Goals of every Meta-World 3 class in each split (ML1, ML10 and ML45 alike).
GOALS_PER_CLASS = 50


def benchmark_of(cfg: Any) -> str:
    """ML1, ML10 or ML45: the Meta-World benchmark of a run's family (``MetaWorld-ML10``, ...)."""
    return cfg.family.removeprefix("MetaWorld-")


def eval_env_settings(cfg: Any, *, split: str = "test", meta_batch_size: int | None = None) -> dict[str, Any]:
    """The sub-envs of Meta-World's vector env for a run's benchmark and split.

    ``meta_batch_size`` sub-envs (default 20 for ML1, 5 per class otherwise; a multiple of the
    split's classes), each class's goals dealt out among its sub-envs: Meta-World deals
    ``total_tasks_per_cls`` goals per class and needs each sub-env to get as many, so it is the
    largest multiple of the sub-envs per class up to the class's 50 goals (40 for ML1's 20
    sub-envs, the setting ``metalearning_evaluation``'s own comment assumes). A size the classes do
    not divide raises ValueError naming the valid ones.
    """
    benchmark = benchmark_of(cfg)
    classes = 1 if benchmark == "ML1" else 5 if split == "test" else (10 if benchmark == "ML10" else 45)
    size = meta_batch_size or (20 if benchmark == "ML1" else 5 * classes)
    if size < classes or size % classes or size // classes > GOALS_PER_CLASS:
        raise ValueError(
            f"--meta-batch-size must be a multiple of the {classes} classes of {benchmark}'s {split} split, at most "
            f"{classes * GOALS_PER_CLASS}, got {size}"
        )
    per_class = size // classes
    return {"meta_batch_size": size, "total_tasks_per_cls": GOALS_PER_CLASS - GOALS_PER_CLASS % per_class}


def make_eval_envs(cfg: Any, *, split: str = "test", meta_batch_size: int | None = None, seed: int | None = None):
    """Meta-World's own vector env of a run's benchmark (ML1 task or ML10/ML45) and split
    (:func:`eval_env_settings`), the goals of ``metaworld.ML1/ML10/ML45(seed)`` (default: the
    run's ``env.seed``, 0), Meta-World's horizon. RL^2 runs get the previous action and reward in
    the observation (see the module docstring).

    Built with ``metaworld.make_ml_envs_train`` / ``make_ml_envs_test``, the functions behind
    Meta-World's ``gym.make_vec`` ids, rather than the ids: Metaworld 3.0 registers
    ``Meta-World/ML1-train`` and ``ML1-test`` in a loop whose lambda reads the loop variable late,
    so both ids build the *test* split (ML10 and ML45 are registered correctly).
    """
    import metaworld

    benchmark = benchmark_of(cfg)
    seed = cfg.env.get("seed", 0) if seed is None else seed
    make = metaworld.make_ml_envs_train if split == "train" else metaworld.make_ml_envs_test
    kwargs: dict[str, Any] = {"vector_strategy": "sync", "seed": seed}
    kwargs.update(eval_env_settings(cfg, split=split, meta_batch_size=meta_batch_size))
    if cfg.policy.recurrent is not None:
        kwargs["recurrent_info_in_obs"] = True
    return make(cfg.env["task_name"] if benchmark == "ML1" else benchmark, **kwargs)


def evaluate_every_sub_env(agent: Any, envs: Any, num_episodes: int) -> tuple[dict[str, Any], tuple]:
    """Meta-World's ``evaluation`` step run until every sub-env has ``num_episodes`` finished episodes.

    Steps, resets and the terminate-on-success toggle are those of ``metaworld.evaluation.evaluation``.
    Returns the documented figures (success rate within each sub-env, averaged over each class's
    sub-envs, then over classes; mean return of every counted episode; success per class) and the
    4-tuple Metaworld 3.0's ``evaluation`` returns, computed from the first ``num_episodes`` episodes
    to finish in each class (its own count)."""
    from metaworld.evaluation import _get_task_names

    terminate_on_success = bool(np.all(envs.get_attr("terminate_on_success")))
    envs.call("toggle_terminate_on_success", True)
    obs, _ = envs.reset()
    agent.reset(np.ones(envs.num_envs, dtype=np.bool_))
    names = _get_task_names(envs)
    episodes: list[list[tuple[float, bool]]] = [[] for _ in range(envs.num_envs)]  # per sub-env, in order
    # in the order they finish; keyed in set order, as metalearning_evaluation reads the values by it
    by_class: dict[str, list[tuple[float, bool]]] = {name: [] for name in set(names)}
    while any(len(e) < num_episodes for e in episodes):
        obs, _, terminations, truncations, infos = envs.step(agent.eval_action(obs))
        dones = np.logical_or(terminations, truncations)
        agent.reset(dones)
        for i in np.flatnonzero(dones):
            episode = (float(infos["final_info"]["episode"]["r"][i]), bool(infos["final_info"]["success"][i]))
            by_class[names[i]].append(episode)
            if len(episodes[i]) < num_episodes:
                episodes[i].append(episode)
    envs.call("toggle_terminate_on_success", terminate_on_success)

    per_class = {
        name: float(np.mean([np.mean([s for _, s in episodes[i]]) for i in range(len(names)) if names[i] == name]))
        for name in by_class
    }
    every = {
        "success": float(np.mean(list(per_class.values()))),
        "return": float(np.mean([r for e in episodes for r, _ in e])),
        "per_task": per_class,
    }
    first = {name: e[:num_episodes] for name, e in by_class.items()}
    shipped_per_class = {name: sum(s for _, s in e) / num_episodes for name, e in first.items()}
    shipped = (
        float(np.mean(list(shipped_per_class.values()))),
        float(np.mean([[r for r, _ in e] for e in first.values()])),
        shipped_per_class,
        {name: [r for r, _ in e] for name, e in first.items()},
    )
    return every, shipped


def evaluate_splits(
    meta: Any,
    *,
    num_evals: int = 10,
    adaptation_episodes: int = 10,
    evaluation_episodes: int = 3,
    meta_batch_size: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Meta-train and meta-test success rates by Meta-World's protocol, with 95% CIs over rounds.

    Each of ``num_evals`` rounds is one ``metalearning_evaluation`` call (new goals for every
    sub-env, the agent re-initialised, adaptation, evaluation). Returns, per split, the shape of
    ``metarl evaluate``'s JSON with ``"metric": "success"`` (``steps``: the adaptation steps
    taken), the success rate per task name, the mean return and every round's figures.
    ``progress`` gets one line per round (split, round, success, return, time left)."""
    import metaworld.evaluation
    from metaworld.evaluation import metalearning_evaluation

    from metarl.runs.experiment import mean_and_ci95

    steps = default_adaptation_steps(meta)
    settings = {
        "protocol": "metaworld.evaluation.metalearning_evaluation",
        "counted": "every sub-env's evaluation episodes (metaworld_3_0: the shipped evaluation's first per class)",
        "num_evals": num_evals,
        "adaptation_steps": steps,
        "adaptation_episodes": adaptation_episodes,
        "evaluation_episodes": evaluation_episodes,
        "sub_envs": {
            split: eval_env_settings(meta.cfg, split=split, meta_batch_size=meta_batch_size)
            for split in ("train", "test")
        },
        "seed": seed,
    }
    splits = {}
    t0, done, total = time.perf_counter(), 0, 2 * num_evals
    for split in ("train", "test"):
        envs = make_eval_envs(meta.cfg, split=split, meta_batch_size=meta_batch_size)
        agent = agent_of(meta, seed=seed)
        rounds = []
        try:
            for _ in range(num_evals):
                counted: list[dict[str, Any]] = []

                def evaluation(agent, envs, num_episodes, counted=counted):
                    every, shipped = evaluate_every_sub_env(agent, envs, num_episodes)
                    counted.append(every)
                    return shipped

                # Meta-World's adaptation, then its evaluation step counting every sub-env
                with mock.patch.object(metaworld.evaluation, "evaluation", evaluation):
                    shipped_success, shipped_return, shipped_per_task = metalearning_evaluation(
                        agent,
                        envs,
                        num_evals=1,
                        adaptation_steps=steps,
                        adaptation_episodes=adaptation_episodes,
                        evaluation_episodes=evaluation_episodes,
                    )
                (every,) = counted
                success, mean_return = every["success"], every["return"]
                rounds.append(
                    {
                        **every,
                        "metaworld_3_0": {
                            "success": shipped_success,
                            "return": shipped_return,
                            "per_task": {k: float(v) for k, v in shipped_per_task.items()},
                        },
                    }
                )
                done += 1
                if progress is not None:
                    elapsed = time.perf_counter() - t0
                    progress(
                        f"{split} split: round {len(rounds)}/{num_evals}, success {success:.3f}, "
                        f"return {mean_return:.1f} (Metaworld 3.0's count: {shipped_success:.3f}) "
                        f"({elapsed / 60:.1f} min, about "
                        f"{elapsed / done * (total - done) / 60:.1f} min left)"
                    )
        finally:
            envs.close()
        summary = mean_and_ci95(np.array([[r["success"]] for r in rounds]))
        names = sorted(rounds[0]["per_task"])
        per_task = {
            name: {
                k: v[0]
                for k, v in mean_and_ci95(np.array([[r["per_task"][name]] for r in rounds])).items()
                if k != "num_tasks"
            }
            for name in names
        }
        shipped = mean_and_ci95(np.array([[r["metaworld_3_0"]["success"]] for r in rounds]))
        splits[split] = {
            "metric": "success",
            "steps": [steps],
            "mean": summary["mean"],
            "ci95": summary["ci95"],
            "num_evals": num_evals,
            "per_task": per_task,
            "mean_return": float(np.mean([r["return"] for r in rounds])),
            "metaworld_3_0": {
                "mean": shipped["mean"],
                "ci95": shipped["ci95"],
                "mean_return": float(np.mean([r["metaworld_3_0"]["return"] for r in rounds])),
            },
            "rounds": rounds,
        }
    return {"metric": "success", "settings": settings, "splits": splits}


def score(
    meta: Any,
    *,
    split: str = "test",
    num_evals: int = 10,
    adaptation_steps: int | None = None,
    adaptation_episodes: int = 10,
    evaluation_episodes: int = 3,
    meta_batch_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float, dict[str, float]]:
    """``metaworld.evaluation.metalearning_evaluation`` of a run's agent as Metaworld 3.0 ships it
    (its first-per-class count, not :func:`evaluate_splits`' every sub-env): mean success rate, mean
    return, success rate per task name. ``adaptation_steps``: default the run's inner steps (RL^2: 1,
    one batch of ``adaptation_episodes`` episodes of the trial)."""
    from metaworld.evaluation import metalearning_evaluation

    agent = agent_of(meta, seed=seed)
    steps = adaptation_steps or default_adaptation_steps(meta)
    envs = make_eval_envs(meta.cfg, split=split, meta_batch_size=meta_batch_size)
    try:
        return metalearning_evaluation(
            agent,
            envs,
            num_evals=num_evals,
            adaptation_steps=steps,
            adaptation_episodes=adaptation_episodes,
            evaluation_episodes=evaluation_episodes,
        )
    finally:
        envs.close()
