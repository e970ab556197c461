"""Offline experiments on a recorded run: linearized training and the switching experiment (Fig. 6 of the
two-phase paper), and loss barriers between stored snapshots."""
from .linear import LinearizedModel, linearize
from .switching import switching_experiment

__all__ = ["LinearizedModel", "linearize", "switching_experiment"]
