"""torch.distributed (DDP): implementations of the probe's interfaces for several ranks."""
