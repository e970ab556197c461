"""``dynprobe._util.transfers`` (many device values in one host read) and ``dynprobe._util.user_warnings``
(warnings attributed to the user's line, past dynprobe's and the frameworks' frames)."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from dynprobe._util.transfers import read_together
from dynprobe._util.user_warnings import user_stacklevel, warn_user


def test_read_together_returns_each_tensor_exactly_as_float64():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=generator), torch.tensor(True), torch.arange(5, dtype=torch.int64) * 2**40,
               torch.randn(2, generator=generator, dtype=torch.float64), torch.zeros(0), torch.tensor([False, True])]
    values = read_together(tensors)
    assert len(values) == len(tensors)
    for tensor, value in zip(tensors, values):
        assert value.dtype == np.float64
        np.testing.assert_array_equal(value, np.array(tensor.reshape(-1).tolist(), dtype=np.float64))
    assert read_together([]) == []


def test_read_together_transfers_once(monkeypatch):
    tensors = [torch.ones(2), torch.full((3,), 2.0)]
    original = torch.Tensor.cpu
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)  # torch's host copy, counted (not dynprobe's code)
    read_together(tensors)
    assert calls == [torch.Size([5])]


def fake_dynprobe_hook():
    """Two frames of code whose module name is dynprobe's (as a probe hook's), around a warn_user call."""
    namespace = {"__name__": "dynprobe.fake", "warn_user": warn_user}
    exec("def inner(m):\n    warn_user(m)\ndef outer(m):\n    inner(m)\n", namespace)
    return namespace["outer"]


def test_warn_user_points_at_the_first_frame_outside_dynprobe():
    hook = fake_dynprobe_hook()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hook("look here")  # the line the warning must name
    (warning,) = caught
    assert warning.filename == __file__ and warning.category is RuntimeWarning and str(warning.message) == "look here"
    named = open(__file__).read().splitlines()[warning.lineno - 1].strip()
    assert named == 'hook("look here")  # the line the warning must name'


def test_user_stacklevel_of_a_user_frame_is_one():
    assert user_stacklevel() == 1
