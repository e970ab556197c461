"""What the probe records at a snapshot: parameters, evaluation, eNTK, and loss barriers to earlier snapshots."""
