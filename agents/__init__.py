"""Every algorithm, one module each, registered by the name a config uses (``algorithm: ...``).

Importing this package registers them all (:func:`metarl.core.learner.register`); the policies
and models they train are in :mod:`agents.policies` and :mod:`agents.models`.
"""

from agents import maml, maml_trpo, metalstm, metasgd, pearl, pretrain, promp, protonet, reptile, rl2  # noqa: F401  (registration)
