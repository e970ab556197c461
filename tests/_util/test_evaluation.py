"""The eval set, its task (classification / tokens / regression) and side-effect-free evaluation.

References are independent: Hugging Face's own causal-LM loss, float64 numpy log-softmax and argmax, numpy MSE and
squared output distances — never the task code itself.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynprobe._util.checks import check_model
from dynprobe._util.evaluation import EvalSet, balanced_subset, check_model_outputs, evaluate
from dynprobe._util.inputs import labelled_batches, split_batch
from dynprobe._util.tasks import (
    ClassificationTask,
    RegressionTask,
    TokenTask,
    as_task,
    infer_task,
    task_from_config,
)

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 37, 10


def tiny_gpt2(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def token_data(n: int = 12, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token ids, an attention mask with right padding, and labels = ids with the prompt (first 3 tokens) and the
    padding set to -100."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    lengths = torch.randint(5, LENGTH + 1, (n,), generator=generator)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def numpy_token_reference(logits: torch.Tensor, labels: torch.Tensor, shift: bool):
    """(mean token cross-entropy, top-1 predictions, accuracy) over non-ignored tokens, float64 numpy."""
    logits = logits.detach().double().numpy()
    labels = labels.numpy()
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    z = logits[keep]
    log_softmax = z - z.max(axis=1, keepdims=True)
    log_softmax = log_softmax - np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
    target = labels[keep]
    loss = -log_softmax[np.arange(target.size), target].mean()
    preds = z.argmax(axis=1)
    return loss, preds, (preds == target).mean()


# ------------------------------------------------------------------------------------------------ tokens


def test_token_loss_with_shift_equals_hugging_faces_own_causal_lm_loss():
    model = tiny_gpt2(0)
    inputs, labels = token_data()
    eval_set = EvalSet.from_user((inputs, inputs["input_ids"].masked_fill(labels == -100, -100)), max_examples=100,
                                 seed=0, task=TokenTask(shift=True))
    result = evaluate(model, eval_set, batch_size=5)  # pooled over batches, not a mean of batch means
    with torch.no_grad():
        expected = model(**inputs, labels=labels).loss.double()
    assert result.loss == pytest.approx(float(expected), rel=1e-6)
    assert eval_set.task.name == "tokens" and result.num_classes == VOCAB


@pytest.mark.parametrize("shift", [False, True])
def test_token_loss_accuracy_and_predictions_match_numpy(shift):
    model = tiny_gpt2(1)
    inputs, labels = token_data(seed=1)
    eval_set = EvalSet.from_user((inputs, labels), max_examples=100, seed=0, task=TokenTask(shift=shift))
    result = evaluate(model, eval_set, batch_size=4)
    with torch.no_grad():
        logits = model(**inputs).logits
    loss, preds, accuracy = numpy_token_reference(logits, labels, shift)
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert result.accuracy == pytest.approx(accuracy, abs=1e-12)
    np.testing.assert_array_equal(result.preds.numpy(), preds)


def test_token_disagreement_is_top1_mismatch_over_non_ignored_tokens():
    inputs, labels = token_data(seed=2)
    eval_set = EvalSet.from_user((inputs, labels), max_examples=100, seed=0)
    assert isinstance(eval_set.task, TokenTask)  # (N, T) integer targets
    a, b = tiny_gpt2(2), tiny_gpt2(3)
    preds_a, preds_b = evaluate(a, eval_set).preds, evaluate(b, eval_set).preds
    with torch.no_grad():
        top_a = a(**inputs).logits.argmax(-1).numpy()
        top_b = b(**inputs).logits.argmax(-1).numpy()
    keep = labels.numpy() != -100
    expected = float((top_a[keep] != top_b[keep]).mean())
    assert 0 < expected < 1
    assert eval_set.task.disagreement(preds_a, preds_b) == pytest.approx(expected, abs=1e-15)
    row = eval_set.task.disagreement_to_many(preds_a, torch.stack([preds_a, preds_b]))
    np.testing.assert_allclose(row.numpy(), [0.0, expected], atol=1e-15)


def test_token_targets_equal_to_input_ids_without_shift_warn():
    inputs, _ = token_data()
    with pytest.warns(UserWarning, match="TokenTask\\(shift=True\\)"):
        EvalSet.from_user((inputs, inputs["input_ids"].clone()), max_examples=100, seed=0)


# ------------------------------------------------------------------------------------------------ regression


class Regressor(nn.Module):
    def __init__(self, seed: int, outputs: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def regression_data(n: int = 50, outputs: int | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = torch.randn(n, generator=generator) if outputs is None else torch.randn(n, outputs, generator=generator)
    return x, y


def test_regression_loss_is_mse_and_d_is_the_mean_squared_output_distance():
    x, y = regression_data()
    eval_set = EvalSet.from_user((x, y), max_examples=100, seed=0)
    assert isinstance(eval_set.task, RegressionTask)
    a, b = Regressor(0), Regressor(1)
    result_a, result_b = evaluate(a, eval_set, batch_size=7), evaluate(b, eval_set, batch_size=7)
    with torch.no_grad():
        out_a, out_b = a(x).double().numpy()[:, 0], b(x).double().numpy()[:, 0]  # (N, 1) outputs vs (N,) targets
    assert result_a.loss == pytest.approx(np.mean((out_a - y.double().numpy()) ** 2), rel=1e-6)
    assert np.isnan(result_a.accuracy)
    expected = np.mean((out_a - out_b) ** 2)
    assert eval_set.task.disagreement(result_a.preds, result_b.preds) == pytest.approx(expected, rel=1e-6)
    assert eval_set.task.disagreement(result_a.preds, result_a.preds) == 0.0


def test_regression_with_several_outputs_and_a_users_loss():
    x, y = regression_data(outputs=3)
    model = Regressor(0, outputs=3)
    task = RegressionTask(loss=F.huber_loss)
    result = evaluate(model, EvalSet.from_user((x, y), max_examples=100, seed=0, task=task), batch_size=16)
    with torch.no_grad():
        expected = F.huber_loss(model(x).double(), y.double())
    assert result.loss == pytest.approx(float(expected), rel=1e-6)  # batch means weighted by examples
    assert result.num_classes == 3 and task.to_config() == {"name": "regression", "loss": "huber_loss"}


# ------------------------------------------------------------------------------------------------ classification


def test_classification_loss_is_float64_cross_entropy_whatever_the_batch_size():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=generator), torch.randint(0, 4, (40,), generator=generator)
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    eval_set = EvalSet.from_user((x, y), max_examples=100, seed=0)
    small, large = evaluate(model, eval_set, batch_size=3), evaluate(model, eval_set, batch_size=512)
    with torch.no_grad():
        expected = F.cross_entropy(model(x).double(), y)
    assert small.loss == pytest.approx(float(expected), rel=1e-6)
    assert small.loss == pytest.approx(large.loss, rel=1e-12)
    assert small.accuracy == float((model(x).argmax(1) == y).double().mean())
    assert isinstance(eval_set.task, ClassificationTask) and small.nonfinite == 0


def test_nonfinite_outputs_are_counted_per_example():
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    x[2, 0], x[4, 0] = 0.0, 0.0  # inf * 0 = NaN on these two examples... and inf elsewhere
    result = evaluate(model, EvalSet.from_user((x, y), max_examples=10, seed=0))
    assert result.nonfinite == 6


# ------------------------------------------------------------------------------------------------ choosing the task


def test_the_task_is_inferred_from_the_targets_and_can_be_named():
    assert isinstance(infer_task(torch.zeros(4, dtype=torch.long)), ClassificationTask)
    assert isinstance(infer_task(torch.zeros(4, 3, dtype=torch.long)), TokenTask)
    assert isinstance(infer_task(torch.zeros(4)), RegressionTask)
    assert as_task(None) is None and as_task("auto") is None
    assert as_task("tokens") == TokenTask() and as_task("regression") == RegressionTask()
    with pytest.raises(ValueError, match="task must be 'auto', one of"):
        as_task("lm")
    with pytest.raises(TypeError, match="ignore_index"):
        TokenTask(ignore_index="pad")
    for task in (ClassificationTask(), TokenTask(ignore_index=0, shift=True), RegressionTask()):
        assert task_from_config(task.to_config()) == task
    assert task_from_config(None) == ClassificationTask()  # runs recorded before tasks


def test_integer_targets_can_be_treated_as_regression():
    x = torch.randn(8, 6)
    counts = torch.arange(8)
    eval_set = EvalSet.from_user((x, counts), max_examples=10, seed=0, task="regression")
    assert eval_set.targets.dtype == torch.float32
    assert evaluate(Regressor(0), eval_set).num_classes == 1


@pytest.mark.parametrize("task, outputs, targets, match", [
    ("classification", torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), "looks like regression"),
    ("classification", torch.zeros(4, 3, 5), torch.zeros(4, dtype=torch.long), "task='tokens'"),
    ("tokens", torch.zeros(4, 5), torch.zeros(4, 5, dtype=torch.long), r"\(N, T, vocabulary\) logits"),
    ("tokens", torch.zeros(4, 5, 3), torch.full((4, 5), 3), r"token labels must be in \[0, 2\]"),
    ("regression", torch.zeros(4, 2), torch.zeros(4), "must have the targets' shape"),
])
def test_outputs_that_do_not_fit_the_task_are_a_clear_error(task, outputs, targets, match):
    """Shapes per batch (check_outputs), label values once per eval set (check_target_range)."""
    task = as_task(task)
    with pytest.raises(ValueError, match=match):
        task.check_target_range(targets, task.num_outputs(task.check_outputs(outputs, targets)))


def test_labels_out_of_range_are_a_clear_error_before_the_first_loss_of_an_evaluation():
    x = torch.randn(6, 4)
    eval_set = EvalSet.from_user((x, torch.tensor([0, 1, 2, 3, 4, 5])), max_examples=10, seed=0)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]; got values in \[0, 5\]"):
        evaluate(nn.Linear(4, 3), eval_set, batch_size=2)


def test_targets_that_do_not_fit_the_task_are_a_clear_error():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="pass task='tokens'"):
        EvalSet.from_user((x, torch.zeros(4, 2, dtype=torch.long)), max_examples=10, seed=0, task="classification")
    with pytest.raises(ValueError, match="all ignore_index"):
        EvalSet.from_user((x, torch.full((4, 2), -100)), max_examples=10, seed=0)
    with pytest.raises(ValueError, match="targets must have one row per example"):
        EvalSet.from_user((x, torch.tensor(1.0)), max_examples=10, seed=0)


# ------------------------------------------------------------------------------------------------ bad eval data


def test_nan_or_inf_eval_inputs_and_targets_are_refused_naming_the_example():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"inputs holds NaN or inf values \(example 7; 1 examples"):
        EvalSet.from_user((x, y), max_examples=10, seed=0)
    ids = {"input_ids": torch.zeros(10, 4, dtype=torch.long), "scale": torch.ones(10)}
    ids["scale"][3] = float("inf")
    with pytest.raises(ValueError, match=r"inputs\['scale'\] holds NaN or inf"):
        EvalSet.from_user((ids, y), max_examples=10, seed=0)
    targets = torch.randn(10)
    targets[2] = float("nan")
    with pytest.raises(ValueError, match=r"targets hold NaN or inf values \(example 2"):
        EvalSet.from_user((torch.randn(10, 3), targets), max_examples=10, seed=0)


def test_meta_device_models_and_eval_data_are_refused():
    with pytest.raises(ValueError, match="meta device"):
        EvalSet.from_user((torch.empty(4, 3, device="meta"), torch.zeros(4, dtype=torch.long)), max_examples=10,
                          seed=0)
    with pytest.raises(ValueError, match="meta device"):
        EvalSet.from_user((torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta")), max_examples=10,
                          seed=0)
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="to_empty"):
        check_model(model)


def test_model_outputs_are_checked_at_attach():
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    eval_set = EvalSet.from_user((x, y), max_examples=10, seed=0)
    model = nn.Linear(3, 2)
    assert check_model_outputs(model, eval_set) == 2
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf .* initialization"):
        check_model_outputs(model, eval_set)
    with pytest.raises(ValueError, match="calling the model on eval_data inputs failed"):
        check_model_outputs(nn.Linear(4, 2), eval_set)
    beyond = EvalSet.from_user((x, torch.tensor([0, 1, 0, 1, 0, 2])), max_examples=10, seed=0)
    with pytest.raises(ValueError, match=r"class indices in \[0, 1\]; got values in \[0, 2\]"):
        check_model_outputs(nn.Linear(3, 2), beyond)  # the label range is checked on the whole set


# ------------------------------------------------------------------------------------------------ the one parser


def test_one_parser_for_labelled_data():
    x, y = torch.randn(10, 3), torch.arange(10)
    batches = labelled_batches((x, y), 4)
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    assert [b[1].shape[0] for b in labelled_batches(loader, 4)] == [6, 4]
    with pytest.raises(ValueError, match="3 inputs but 2 targets"):
        split_batch((x[:3], y[:2]), "batch")
    with pytest.raises(TypeError, match=r"must be \(inputs, targets, ...\)"):
        labelled_batches([x], 4)
    with pytest.raises(TypeError, match=r"data must be \(inputs, targets\)"):
        labelled_batches(x, 4)


def test_balanced_subset_draws_uniformly_when_targets_are_not_class_labels():
    tokens = torch.zeros(30, 5, dtype=torch.long)
    chosen = balanced_subset(tokens, 8, seed=0)
    assert chosen.tolist() == sorted(set(chosen.tolist())) and len(chosen) == 8
    assert torch.equal(chosen, balanced_subset(torch.zeros(30), 8, seed=0))
    labels = torch.tensor([0] * 20 + [1] * 10)
    assert torch.bincount(labels[balanced_subset(labels, 10, seed=0)]).tolist() == [5, 5]
