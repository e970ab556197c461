"""What a run's manifest records: versions, configuration, model layout, eval-set fingerprint, conventions."""
from __future__ import annotations

import hashlib
import platform
from typing import Any

import numpy as np
import torch
from torch import nn

from dynprobe._util.evaluation import EvalSet
from dynprobe._version import __version__

from .writer import json_safe

__all__ = ["CONVENTIONS", "GHOST_CONVENTIONS", "GHOST_MODE_CONVENTIONS", "build_manifest", "eval_fingerprint"]

CONVENTIONS: dict[str, str] = {
    "step": "optimizer steps taken so far; step 0 is the initialization",
    "theta": "trainable parameters (requires_grad) in named_parameters() order, flattened",
    "C": "eq. (1): 1 - <θ_i, θ_j> / (‖θ_i‖‖θ_j‖), float64 accumulation",
    "D": "eq. (6): fraction of eval examples whose argmax prediction differs",
    "eval_loss": "mean cross-entropy of the logits on the eval set, model in eval mode",
    "train_loss": "mean of the watched training loss over the steps since the previous snapshot",
}

GHOST_CONVENTIONS: dict[str, str] = {
    "ghosts": "reference of the chaos maps: set by the ghosts' mode (manifest ghost_mode, ghost_mode event), "
              "decided when the ghosts first train; until then 'sequential': compared with the main model itself",
    "chaos_C": "1 - cos(θ_main(t1), θ_ghost(t1)), float64, parameters only",
    "chaos_L2": "‖θ_main(t1) - θ_ghost(t1)‖₂, float64",
    "chaos_D": "disagreement of eval predictions, main vs ghost, eval mode",
    "chaos_B": "eq. (5): max_α L(α θ_main + (1-α) θ_ghost) - (L_main + L_ghost)/2 on the eval set; α evenly "
               "spaced on [0, 1] with endpoints; float parameters and float buffers interpolated, integer buffers "
               "from θ_main; eval mode, no BN reset",
    "perturbation": "ghost i: θ' = θ + ε with seed = perturbation.seed + (index among perturbed ghosts); "
                    "realized_norm = ‖θ' - θ‖₂ after the float add",
}

# conventions["ghosts"] once the ghosts' mode is known (Ghosts(vectorize=...); see dynprobe._vectorized_ghosts).
GHOST_MODE_CONVENTIONS: dict[str, str] = {
    "sequential": "sequential deep copies, each compared with the main model itself (bit-exact reference: the ε=0 "
                  "control stays bitwise equal to the main run)",
    "vectorized": "one torch.func.vmap stack (randomness='same') that also holds an ε=0 shadow of the main run, "
                  "copied from the main model when the stack is built (at a spawn step: see the ghost_mode events; "
                  "before it, ghosts were sequential and compared with the main model itself, which the shadow "
                  "then equals); every ghost spawned later is the shadow's state at its t0 plus ε, and every ghost "
                  "is compared with the shadow, not with the main model "
                  "(vmapped BatchNorm/LayerNorm/matmul kernels differ from plain ones in the last bits, so the "
                  "shadow drifts from the main run: see the shadow_drift events); the ε=0 control is a second ε=0 "
                  "row of the stack, bitwise equal to the shadow",
}


def eval_fingerprint(eval_set: EvalSet) -> str:
    """A hash of the eval examples (targets and input bytes): a resumed run must evaluate the same set."""
    digest = hashlib.sha1()
    digest.update(eval_set.targets.numpy().tobytes())
    inputs = eval_set.inputs
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else [inputs[k] for k in sorted(inputs)]
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_manifest(
    *,
    model: nn.Module,
    named_params: list[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    eval_set: EvalSet,
    num_classes: int,
    storage_dtype: torch.dtype,
    device: torch.device,
    config: dict[str, Any],
    conventions: dict[str, str],
    command: str | None = None,
) -> dict[str, Any]:
    """The manifest of a new run (the writer adds format, status and timestamps); ``command``: the redacted command
    line (:func:`dynprobe._util.command.redacted_command`), recorded only when given."""
    offset = 0
    parameters = []
    for name, p in named_params:
        parameters.append({"name": name, "shape": list(p.shape), "dtype": _dtype_name(p.dtype), "offset": offset,
                           "numel": p.numel()})
        offset += p.numel()
    buffers = [{"name": n, "shape": list(b.shape), "dtype": _dtype_name(b.dtype)}
               for n, b in model.named_buffers() if b is not None]
    return {
        "dynprobe_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        **({"command": command} if command is not None else {}),
        "config": json_safe(config),
        "model": {
            "class": type(model).__name__,
            "num_parameters": offset,
            "storage_dtype": _dtype_name(storage_dtype),
            "device": str(device),
            "parameters": parameters,
            "buffers": buffers,
        },
        "optimizer": {"class": type(optimizer).__name__, "defaults": json_safe(optimizer.defaults)},
        "eval": {"n": eval_set.n, "num_classes": num_classes, "fingerprint": eval_fingerprint(eval_set),
                 "task": eval_set.task.to_config(), "prediction_size": eval_set.prediction_size},
        "conventions": conventions,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
