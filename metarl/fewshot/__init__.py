"""Few-shot supervised learning: the sanity-check task family (sinusoid regression, Omniglot)."""
