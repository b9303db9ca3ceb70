"""Few-shot data: task batches, sinusoid regression, Omniglot, and their support/query losses."""
