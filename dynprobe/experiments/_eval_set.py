"""The run's eval set rebuilt from the user's eval data (checked against the run's fingerprint)."""
from __future__ import annotations

from typing import Any

import torch

from dynprobe._util.evaluation import EvalSet, index_inputs
from dynprobe._util.tasks import task_from_config
from dynprobe.store.manifest import eval_fingerprint

__all__ = ["run_eval_set"]


def run_eval_set(run: Any, eval_data: Any) -> EvalSet:
    """The examples ``run`` evaluated on (``run.eval_indices``), taken from ``eval_data`` as given to the probe."""
    task = task_from_config((run.manifest.get("eval") or {}).get("task"))  # the run's task, not a new guess
    full = EvalSet.from_user(eval_data, max_examples=10**12, seed=0, task=task)
    indices = torch.as_tensor(run.eval_indices)
    if int(indices.max()) >= full.n:
        raise ValueError(f"eval_data has {full.n} examples but the run evaluated example {int(indices.max())}; "
                         "pass the eval data the probe was given")
    subset = EvalSet(index_inputs(full.inputs, indices), full.targets[indices], indices, full.task)
    if eval_fingerprint(subset) != run.manifest.get("eval", {}).get("fingerprint"):
        raise ValueError("eval_data differs from the run's eval set (fingerprint mismatch); pass the eval data the "
                         "probe was given")
    return subset
