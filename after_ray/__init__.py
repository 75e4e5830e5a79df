"""after-ray: a Ray-distributed active-learning engine for speech emotion recognition (AFTER)."""

__version__ = "0.1.0"
