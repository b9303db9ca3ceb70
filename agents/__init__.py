"""Every algorithm, one module each, registered by the name a config uses (``algorithm: ...``).

Importing this package registers them all (:func:`metarl.core.learner.register`); the policies
and models they train are in :mod:`agents.policies` and :mod:`agents.models`.
"""

from agents import (  # noqa: F401  (registration)
    anil,
    imaml,
    maml,
    maml_trpo,
    mamlpp,
    matchingnet,
    metalstm,
    metasgd,
    pearl,
    pretrain,
    promp,
    protonet,
    r2d2,
    relationnet,
    reptile,
    rl2,
    siamese,
)
