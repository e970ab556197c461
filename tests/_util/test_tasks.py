"""Language-model and regression targets through a real Probe with ghosts.

Every stored number is recomputed independently from the stored states: Hugging Face's own causal-LM loss, numpy
argmax / squared distances, and a brute-force α loop (fresh model copies loaded with ``load_state_dict``) for the
barriers.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynprobe
from dynprobe import schedule
from dynprobe.config import Barriers, TokenTask

from .test_evaluation import Regressor, numpy_token_reference, tiny_gpt2, token_data

transformers = pytest.importorskip("transformers")


def unflatten(model: nn.Module, flat: np.ndarray) -> dict[str, torch.Tensor]:
    """A flat vec(θ) (trainable parameters in named_parameters order) as a state dict of ``model``."""
    state, offset = {}, 0
    for name, parameter in model.named_parameters():
        state[name] = torch.as_tensor(np.array(flat[offset: offset + parameter.numel()])).reshape(parameter.shape)
        offset += parameter.numel()
    return state


def loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    replica = copy.deepcopy(model)
    replica.load_state_dict(state, strict=False)
    return replica.eval()


def brute_force_barriers(losses: list[float], alphas: np.ndarray) -> tuple[float, float]:
    """(B_mean, B_linear) of a curve whose first point is α = 0 (θ_b) and last α = 1 (θ_a)."""
    curve = np.array(losses)
    b_mean = curve.max() - 0.5 * (curve[0] + curve[-1])
    b_linear = (curve - (alphas * curve[-1] + (1 - alphas) * curve[0])).max()
    return b_mean, b_linear


def lerp_states(a: dict, b: dict, alpha: float) -> dict:
    return {name: torch.lerp(b[name].double(), a[name].double(), alpha).to(a[name].dtype) for name in a}


# ------------------------------------------------------------------------------------------------ a tiny GPT-2


@pytest.mark.slow
def test_gpt2_run_records_token_loss_d_and_ghost_barriers_that_match_independent_computations(tmp_path):
    model = tiny_gpt2(0)
    train_inputs, train_labels = token_data(n=64, seed=10)
    eval_inputs, eval_labels = token_data(n=16, seed=11)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with dynprobe.Probe(model, optimizer, eval_data=(eval_inputs, eval_labels), out=tmp_path / "lm",
                        task=TokenTask(shift=True), schedule=schedule.at([0, 3, 6]), loss_from_output=True,
                        ghosts=dynprobe.Ghosts(at=[0, 3], save_params=True, vectorize=False), total_steps=6):
        model.train()
        for step in range(6):
            rows = slice(8 * step, 8 * step + 8)
            batch = {name: t[rows] for name, t in train_inputs.items()}
            model(**batch, labels=train_labels[rows]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    run = dynprobe.load_run(tmp_path / "lm")
    assert run.manifest["eval"]["task"] == {"name": "tokens", "ignore_index": -100, "shift": True}
    template = tiny_gpt2(0)
    states = [run.state_dict(snapshot_index=k) for k in range(len(run))]
    top1 = []
    for k, state in enumerate(states):
        replica = loaded(template, state)
        with torch.no_grad():
            expected = float(replica(**eval_inputs, labels=eval_labels).loss)  # Hugging Face's own shifted loss
            logits = replica(**eval_inputs).logits
        assert run.eval_loss[k] == pytest.approx(expected, rel=1e-5)
        _, preds, accuracy = numpy_token_reference(logits, eval_labels, shift=True)
        assert run.eval_accuracy[k] == pytest.approx(accuracy, abs=1e-12)
        np.testing.assert_array_equal(run.predictions(snapshot_index=k), preds)
        top1.append(preds)
    for i in range(len(run)):
        for j in range(i + 1):
            assert run.D[i, j] == pytest.approx(float((top1[i] != top1[j]).mean()), abs=1e-12)
    assert run.D[2, 0] > 0
    # Ghosts: the control's D and B are exactly 0; the perturbed ghost's D from its own stored parameters.
    control, ghost = run.ghosts[0].ghost_id, run.ghosts[-1].ghost_id  # the ε = 0 control and the ghost spawned at 3
    assert run.ghosts[0].control and run.ghosts[-1].spawn_step == 3
    last = len(run) - 1
    assert run.chaos["D"][control, last] == 0 and run.chaos["B"][control, last] == 0
    ghost_state = unflatten(template, run.ghost_params(ghost, snapshot_index=last))
    with torch.no_grad():
        ghost_logits = loaded(template, {**states[last], **ghost_state})(**eval_inputs).logits
    _, ghost_preds, _ = numpy_token_reference(ghost_logits, eval_labels, shift=True)
    assert run.chaos["D"][ghost, last] == pytest.approx(float((ghost_preds != top1[last]).mean()), abs=1e-12)
    # The final ghost barrier (forced whatever the budget) against a brute-force α loop of Hugging Face losses.
    alphas = np.linspace(0, 1, Barriers().alphas)
    losses = []
    for alpha in alphas:  # α = 1 is the main run, α = 0 the ghost
        with torch.no_grad():
            replica = loaded(template, lerp_states(states[last], {**states[last], **ghost_state}, float(alpha)))
            losses.append(float(replica(**eval_inputs, labels=eval_labels).loss))
    b_mean, b_linear = brute_force_barriers(losses, alphas)
    assert run.chaos["B"][ghost, last] == pytest.approx(b_mean, rel=1e-4, abs=1e-7)
    assert run.chaos["B_linear"][ghost, last] == pytest.approx(b_linear, rel=1e-4, abs=1e-7)


# ------------------------------------------------------------------------------------------------ a regressor


def test_regression_run_records_mse_output_distance_and_both_barriers(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    x_eval, y_eval = x[160:], y[160:]
    model = Regressor(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    barriers = Barriers(alphas=7, previous_snapshots=1, time_budget=math.inf)
    with dynprobe.Probe(model, optimizer, eval_data=(x_eval, y_eval), out=tmp_path / "reg", barriers=barriers,
                        schedule=schedule.at([0, 4, 8, 12]), total_steps=12,
                        ghosts=dynprobe.Ghosts(at=[4], save_params=True, vectorize=False)) as probe:
        criterion = probe.watch(nn.MSELoss())
        for step in range(12):
            rows = torch.randint(0, 160, (16,))
            loss = criterion(model(x[rows]), y[rows, None])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    run = dynprobe.load_run(tmp_path / "reg")
    assert run.manifest["eval"]["task"] == {"name": "regression", "loss": "mse"}
    template = Regressor(0)
    outputs = []
    for k in range(len(run)):
        with torch.no_grad():
            out = loaded(template, run.state_dict(snapshot_index=k))(x_eval).double().numpy()[:, 0]
        outputs.append(out)
        assert run.eval_loss[k] == pytest.approx(np.mean((out - y_eval.double().numpy()) ** 2), rel=1e-5)
        assert np.isnan(run.eval_accuracy[k])
        assert np.isfinite(run.train_loss[k]) or k == 0
    for i in range(len(run)):
        for j in range(i + 1):
            assert run.D[i, j] == pytest.approx(np.mean((outputs[i] - outputs[j]) ** 2), rel=1e-5, abs=1e-12)
    assert run.D[3, 0] > 0
    # Trajectory barriers B(t_k, t_{k-1}), both references, against a brute-force α loop of MSEs.
    alphas = np.linspace(0, 1, 7)
    for k in range(1, len(run)):
        a, b = run.state_dict(snapshot_index=k), run.state_dict(snapshot_index=k - 1)
        losses = []
        for alpha in alphas:
            with torch.no_grad():
                out = loaded(template, lerp_states(a, b, float(alpha)))(x_eval).squeeze(1)
            losses.append(float(F.mse_loss(out.double(), y_eval.double())))
        b_mean, b_linear = brute_force_barriers(losses, alphas)
        assert run.B[k, k - 1] == pytest.approx(b_mean, rel=1e-4, abs=1e-8)
        assert run.B_linear[k, k - 1] == pytest.approx(b_linear, rel=1e-4, abs=1e-8)
        # the two references differ by at most half the endpoint gap: for every α, L(α) − ½(L_a + L_b) equals
        # L(α) − (αL_a + (1 − α)L_b) + (α − ½)(L_a − L_b); B_linear ≥ 0 because the grid holds both endpoints
        half_gap = abs(losses[0] - losses[-1]) / 2
        assert run.B_linear[k, k - 1] >= 0
        assert abs(run.B[k, k - 1] - run.B_linear[k, k - 1]) <= half_gap * (1 + 1e-6) + 1e-12
    # The ghost's D: the mean squared distance between its outputs and the main run's.
    ghost = run.ghosts[-1].ghost_id
    last = len(run) - 1
    ghost_state = unflatten(template, run.ghost_params(ghost, snapshot_index=last))
    with torch.no_grad():
        ghost_out = loaded(template, ghost_state)(x_eval).double().numpy()[:, 0]
    assert run.chaos["D"][ghost, last] == pytest.approx(np.mean((ghost_out - outputs[last]) ** 2), rel=1e-5)
    assert np.isfinite(run.chaos["B"][ghost, last]) and np.isfinite(run.chaos["B_linear"][ghost, last])


def test_task_and_barriers_are_validated_at_construction(tmp_path):
    x, y = torch.randn(20, 6), torch.randn(20)
    model = Regressor(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="task must be 'auto', one of"):
        dynprobe.Probe(model, optimizer, eval_data=(x, y), out=tmp_path / "a", task="lm")
    with pytest.raises(TypeError, match="barriers must be a dynprobe.Barriers"):
        dynprobe.Probe(model, optimizer, eval_data=(x, y), out=tmp_path / "b", barriers={"alphas": 5})
    with pytest.raises(ValueError, match="integer class labels"):  # real targets named as classification
        dynprobe.Probe(model, optimizer, eval_data=(x, y), out=tmp_path / "c", task="classification")
    x_nan = x.clone()
    x_nan[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"holds NaN or inf values \(example 3"):
        dynprobe.Probe(model, optimizer, eval_data=(x_nan, y), out=tmp_path / "d")
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "abcd")
