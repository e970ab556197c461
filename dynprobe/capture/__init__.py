"""What a training step consumed (inputs, RNG, autocast, loss call) and the public PyTorch hooks that capture it."""
