"""Meta-reinforcement learning: the typed config and the experiment loop of ``metarl train`` for
task-distribution environments (policies and meta-learners live in ``agents/``)."""
