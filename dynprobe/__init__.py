"""dynprobe: watch how a PyTorch network learns (interval metrics, ghost replicas, eNTK, phase transition)."""
__version__ = "0.1.0"
