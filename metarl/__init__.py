"""metarl: a meta-reinforcement-learning lab.

``metarl.load(run_dir)`` gives the meta-policy of a run; ``.adapt(task, episodes=..., steps=...)``
adapts it to a new task (see :mod:`metarl.app.adapt`).
"""

__version__ = "0.1.0"


def load(run_dir):
    """The meta-policy of a meta-RL run directory (see :func:`metarl.app.adapt.load`)."""
    from metarl.app.adapt import load as _load

    return _load(run_dir)


def load_adapted(out_dir):
    """An adapted policy saved by ``AdaptedPolicy.save`` or ``metarl adapt --out``."""
    from metarl.app.adapt import load_adapted as _load_adapted

    return _load_adapted(out_dir)
