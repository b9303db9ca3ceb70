"""Config validation of ``algorithm``: a name registered in ``agents/`` for the config's family."""

from __future__ import annotations

import difflib

from metarl.core.config import field_error
from metarl.core.learner import algorithms


def registered_algorithm(family: str, name: str) -> str:
    """``name`` if an algorithm of ``family`` is registered under it, else a one-line error listing them."""
    import agents  # noqa: F401  (registers the algorithms)

    names = algorithms(family)
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        message = f"must be a registered algorithm ({', '.join(names)}), got {name!r}"
        raise field_error("", "", message + (f"; did you mean {hint[0]!r}?" if hint else ""))
    return name
