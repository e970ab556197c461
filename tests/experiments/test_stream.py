"""The standard run's data stream replayed for every switch point (dynprobe.experiments._stream): each source
form yields exactly the batches of the asked steps, a second pass that differs for some step is an error, one-shot
iterators and non-streams are refused, and the batch digest sees values, dtypes, shapes and keys."""
from __future__ import annotations

import pytest
import torch

from dynprobe.experiments._stream import BatchStream, digest


def batch_of(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((2, 3), float(step)), torch.tensor([step % 3, (step + 1) % 3])


class Restarting:
    """A re-iterable: each iter() replays the stream from batch 0."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self):
        return (batch_of(step) for step in range(self.count))


@pytest.mark.parametrize("source, kind", [(batch_of, "callable"), ([batch_of(s) for s in range(6)], "sequence"),
                                          (Restarting(6), "iterable")])
def test_every_source_form_yields_the_batches_of_the_asked_steps(source, kind):
    stream = BatchStream(source, total_steps=6)
    assert stream.kind == kind
    for start, stop in ((0, 6), (2, 5), (4, 6), (3, 3)):
        got = list(stream.batches(start, stop))
        assert [step for step, _ in got] == list(range(start, stop))
        for step, (inputs, targets) in got:
            expected_inputs, expected_targets = batch_of(step)
            assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)
    assert stream.first_digest() == digest(*batch_of(0))


def test_a_batch_that_differs_on_a_later_pass_is_an_error():
    draws = iter(range(100))
    stream = BatchStream(lambda step: (torch.full((2,), float(next(draws))), torch.tensor([0, 1])), total_steps=3)
    list(stream.batches(0, 3))
    with pytest.raises(ValueError, match="different batch for step 1 than on an earlier pass"):
        list(stream.batches(1, 3))


@pytest.mark.parametrize("source, error, match", [
    (iter([batch_of(0)]), TypeError, "one-shot iterator"),
    ((torch.zeros(4, 2), torch.zeros(4)), TypeError, "pair of tensors"),
    (torch.zeros(4, 2), TypeError, "must be the run's data stream"),
    ({"x": 1}, TypeError, "must be the run's data stream"),
    (42, TypeError, "must be the run's data stream"),
    ([batch_of(0), batch_of(1)], ValueError, "holds 2 batches; training to total_steps=3 needs batches 0..2"),
])
def test_what_is_not_a_replayable_stream_is_refused(source, error, match):
    with pytest.raises(error, match=match):
        BatchStream(source, total_steps=3)


def test_a_re_iterable_that_runs_out_says_how_far_it_got():
    with pytest.raises(ValueError, match="ran out after 4 batches"):
        list(BatchStream(Restarting(4), total_steps=6).batches(0, 6))


def test_the_digest_sees_values_dtypes_shapes_and_keys_but_not_key_order():
    x, y = torch.zeros(2, 3), torch.tensor([0, 1])
    base = digest(x, y)
    assert digest(x.clone(), y.clone()) == base
    changed = x.clone()
    changed[1, 2] = 1e-30
    assert digest(changed, y) != base
    assert digest(torch.zeros(2, 3, dtype=torch.int32), y) != base  # the same bytes in another dtype
    assert digest(torch.zeros(3, 2), y) != base  # the same bytes in another shape
    a, b = torch.ones(2, 1), torch.zeros(2, 1)
    assert digest({"a": a, "b": b}, y) == digest({"b": b, "a": a}, y)
    assert digest({"a": a, "b": b}, y) != digest({"a": b, "b": a}, y)
    assert digest(x[:, ::2], y) == digest(x[:, ::2].contiguous(), y)  # a strided view hashes its values
