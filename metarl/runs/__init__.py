"""Runs: experiment configs, run directories (checkpoints, logs, locks) and the experiment loop."""
