"""The functional core: parameters as dicts, the inner loop, the meta-learner interface, TRPO
and the config engine. Nothing here knows an environment, a sampler or a run directory."""
