"""metarl: a meta-reinforcement-learning lab."""
__version__ = "0.1.0"
