"""Ghost replicas trained in lock-step with the main run (the chaos experiment, §4 of the two-phase paper)."""
