"""The user surface: the ``metarl`` command, adaptation, evaluation against baselines, export, plots."""
