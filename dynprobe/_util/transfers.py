"""Reading device values on the host: many small tensors in one transfer.

Every host read of a device tensor (``float(t)``, ``bool(t)``, ``.item()``, ``.tolist()``, ``.cpu()``) waits until
the device has finished all the work queued before it, so the user's loop can no longer run ahead. Per-step values
(the ghosts' separations and finiteness, the control's equality) therefore stay on the device and are read here,
together, at snapshots or every few steps.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["read_together"]


def read_together(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Each tensor's values as a flat float64 numpy array, read with one device-to-host transfer.

    The tensors are flattened, converted to float64 (exact for float32/float64 values, bools and integers below
    2**53) and concatenated on the device of the first one, then copied to the host once.
    """
    if not tensors:
        return []
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    values = flat.cpu().numpy()
    sizes = np.cumsum([t.numel() for t in tensors])[:-1]
    return np.split(values, sizes)
