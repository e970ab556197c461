"""The Hugging Face callback: ``Trainer.train`` with ``DynprobeCallback`` on a tiny randomly initialized BERT
(dropout on, a model that computes its own loss from dict inputs) records a loadable run with C/D/S rows and
ghost maps, keeps the ε = 0 control at exactly 0, and leaves the training bit-for-bit unchanged — with gradient
accumulation and the Trainer's default gradient clipping (max_grad_norm=1)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import dynprobe  # noqa: E402
from dynprobe.config import Barriers  # noqa: E402
from dynprobe.integrations.huggingface import DynprobeCallback, eval_pairs, output_loss  # noqa: E402

SEQ, VOCAB, CLASSES = 8, 50, 3


def _examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=generator)
    labels = (ids[:, 0] % CLASSES)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _eval_batch() -> dict[str, torch.Tensor]:
    # No attention_mask: with one, BERT's sdpa mask builder branches on its values (`mask.all()`), which the
    # eNTK's vmap cannot trace; without one the model takes the same no-padding path.
    examples = _examples(48, seed=1)
    return {name: torch.stack([e[name] for e in examples]) for name in ("input_ids", "labels")}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=SEQ, num_labels=CLASSES,
                                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return transformers.BertForSequenceClassification(config)


def _train(tmp_path, callback=None, *, steps: int = 16, accumulate: int = 1, max_grad_norm: float = 1.0):
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3,
        gradient_accumulation_steps=accumulate, max_grad_norm=max_grad_norm, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_examples(128, seed=0),
                                   callbacks=[callback] if callback is not None else [])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer


def _assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _control_and_perturbed(run):
    control = next(g.ghost_id for g in run.ghosts if g.control)
    perturbed = [g.ghost_id for g in run.ghosts if not g.control]
    return control, perturbed


def test_train_with_ghosts_and_kernel_is_bitwise_unchanged_and_control_stays_exact(tmp_path):
    reference, _ = _train(tmp_path / "plain", steps=12)
    callback = DynprobeCallback(
        eval_data=_eval_batch(), schedule=[0, 1, 4, 8, 12], kernel=dynprobe.KernelConfig(n=8, lag_steps=0),
        ghosts=dynprobe.Ghosts(at=[0, 4], perturbation=dynprobe.Perturbation(1e-4, "l2")),
        barriers=Barriers(alphas=3), errors="raise",
    )
    state, trainer = _train(tmp_path / "probed", callback, steps=12)
    _assert_bitwise(reference, state)
    assert callback.probe.out == tmp_path / "probed" / "dynprobe"
    run = dynprobe.load_run(callback.probe.out)
    assert run.status == "closed" and list(run.steps) == [0, 1, 4, 8, 12]
    assert trainer.state.global_step == 12
    assert run.C[-1, 0] > 0 and np.all(np.diag(run.C) == 0) and np.isfinite(run.D[-1, 0])
    assert run.has_kernels and run.S[-1, 0] > 0
    assert not [e for e in run.events if e["event"] in ("control_drift", "probe_error", "grad_edit_detected")]
    assert run.config["ghosts"]["clip_grad_norm"] == 1.0
    control, perturbed = _control_and_perturbed(run)
    assert len(perturbed) == 2
    for name in ("C", "L2", "D"):
        assert np.all(run.chaos[name][control] == 0), name
    assert np.all(run.chaos["C"][perturbed[0]][1:] > 0)


@pytest.mark.parametrize("accumulate,max_grad_norm", [(3, 0.05), pytest.param(2, 1.0, marks=pytest.mark.slow)])
def test_accumulation_and_clipping_keep_training_unchanged_and_control_exact(tmp_path, accumulate, max_grad_norm):
    reference, _ = _train(tmp_path / "plain", steps=6, accumulate=accumulate, max_grad_norm=max_grad_norm)
    callback = DynprobeCallback(eval_data=_eval_batch(), schedule=dynprobe.schedule.every(2),
                                ghosts=dynprobe.Ghosts(at=[0]), barriers=Barriers(ghosts=False), errors="raise")
    state, _ = _train(tmp_path / "probed", callback, steps=6, accumulate=accumulate, max_grad_norm=max_grad_norm)
    _assert_bitwise(reference, state)
    run = dynprobe.load_run(callback.probe.out)
    assert list(run.steps) == [0, 2, 4, 6]
    assert not [e for e in run.events if e["event"] in ("control_drift", "probe_error", "grad_edit_detected")]
    control, perturbed = _control_and_perturbed(run)
    assert np.all(run.chaos["C"][control] == 0) and np.all(run.chaos["L2"][control] == 0)
    assert run.chaos["C"][perturbed[0]][-1] > 0


def test_a_loss_outside_the_model_is_caught_by_the_control(tmp_path):
    """Negative control: the Trainer's label smoothing is a loss the ghosts cannot replay, so attaching ghosts with
    it is an error; a penalty added in an overridden compute_loss is invisible too, and the control drifts (so the
    exactness checks above can fail). A rescaled model loss (2 * loss) is replayed exactly: its gradient scale is
    recorded."""
    callback = DynprobeCallback(eval_data=_eval_batch(), ghosts=dynprobe.Ghosts(at=[0]),
                                barriers=Barriers(ghosts=False))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "smooth"), max_steps=2, use_cpu=True,
                                          report_to=[], save_strategy="no", label_smoothing_factor=0.1,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=_examples(32, 0), callbacks=[callback])
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        trainer.train()

    class Customized(transformers.Trainer):
        penalty = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = 2 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss + self.penalty * sum(p.pow(2).sum() for p in model.parameters())

    for penalty, drifts in ((0.0, False), (1e-2, True)):
        callback = DynprobeCallback(eval_data=_eval_batch(), schedule=[0, 4], errors="raise",
                                    ghosts=dynprobe.Ghosts(at=[0]), barriers=Barriers(ghosts=False))
        args = transformers.TrainingArguments(output_dir=str(tmp_path / f"custom{penalty}"), max_steps=4,
                                              use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                                              max_grad_norm=0.0)
        trainer = Customized(model=_model(), args=args, train_dataset=_examples(32, 0), callbacks=[callback])
        trainer.penalty = penalty
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        dynprobe_warnings = [str(w.message) for w in caught if "dynprobe" in str(w.message)]
        run = dynprobe.load_run(callback.probe.out)
        drift = [e for e in run.events if e["event"] == "control_drift"]
        assert bool(drift) == drifts, (penalty, dynprobe_warnings)
        if not drifts:  # max_grad_norm=0: the Trainer's clip_grad_norm_(inf) is not reported as a gradient edit
            # the one warning: AdamW moves the attention key bias (a softmax-invariant shift) on rounding noise
            assert len(dynprobe_warnings) == 1 and "attention.self.key.bias" in dynprobe_warnings[0]


class LossRecordingTrainer(transformers.Trainer):
    """The Trainer's own loss accounting, per micro-batch: what ``training_step`` returns (summed per step, as the
    Trainer's logged ``loss``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.micro_losses: list[tuple[int, float]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.micro_losses.append((self.state.global_step + 1, float(loss)))
        return loss


@pytest.mark.parametrize("accumulate, with_ghosts", [(1, False), (2, True)])
def test_train_loss_is_the_trainers_own_loss_per_step(tmp_path, accumulate, with_ghosts):
    callback = DynprobeCallback(eval_data=_eval_batch(), schedule=[0, 2, 5, 6], errors="raise",
                                ghosts=dynprobe.Ghosts(at=[0]) if with_ghosts else None,
                                barriers=Barriers(ghosts=False))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-3,
        gradient_accumulation_steps=accumulate, use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = LossRecordingTrainer(model=_model(), args=args, train_dataset=_examples(128, seed=0),
                                   callbacks=[callback])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        trainer.train()
    run = dynprobe.load_run(callback.probe.out)
    per_step: dict[int, float] = {}
    for step, loss in trainer.micro_losses:
        per_step[step] = per_step.get(step, 0.0) + loss
    assert sorted(per_step) == [1, 2, 3, 4, 5, 6] and len(trainer.micro_losses) == 6 * accumulate
    assert np.isnan(run.train_loss[0])  # step 0: no training yet
    previous = 0
    for k, step in enumerate(run.steps[1:], start=1):
        expected = np.mean([per_step[s] for s in range(previous + 1, int(step) + 1)])
        assert run.train_loss[k] == pytest.approx(expected, rel=1e-6), (k, step)
        previous = int(step)


def test_output_loss_and_eval_pairs():
    loss = torch.tensor(1.5)
    assert output_loss({"loss": loss, "logits": None}) is loss
    assert output_loss((loss, torch.zeros(2))) is loss
    with pytest.raises(ValueError, match="labels"):
        output_loss({"logits": torch.zeros(2)})
    inputs, labels = eval_pairs({"input_ids": torch.zeros(3, 2), "labels": [0, 1, 2]})
    assert set(inputs) == {"input_ids"} and labels.tolist() == [0, 1, 2]


def test_missing_eval_data_and_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="eval_data"):
        DynprobeCallback()
    with pytest.raises(TypeError, match="unknown option"):
        DynprobeCallback(eval_data=_eval_batch(), ghost=dynprobe.Ghosts())
