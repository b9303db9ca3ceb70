"""Policies and policy meta-learners (MAML-TRPO, FOMAML, Reptile) built on ``metarl``'s core."""
