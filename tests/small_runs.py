"""A small, complete run directory written through the real store API (RunWriter, TriangularRows, records):
every file a probe writes — parameters, buffers, predictions, kernels, ghost arrays, separation logs, C/D/S rows,
barriers, switching results — with exactly known contents. Not collected by pytest (no ``test_`` prefix)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dynprobe.store.files import append_jsonl
from dynprobe.store.layout import EVAL_INDICES, barriers_path, switching_results_path
from dynprobe.store.rows import TriangularRows
from dynprobe.store.writer import RunWriter

__all__ = ["EVAL_N", "PARAMS", "manifest", "write_small_run"]

EVAL_N = 8
PARAMS = [("layer.weight", [2, 3]), ("layer.bias", [2])]  # P = 8


def manifest(model_class: str = "Tiny", optimizer_class: str = "SGD", fingerprint: str = "f") -> dict:
    offset, specs = 0, []
    for name, shape in PARAMS:
        numel = int(np.prod(shape))
        specs.append({"name": name, "shape": shape, "dtype": "float32", "offset": offset, "numel": numel})
        offset += numel
    return {
        "config": {"schedule": {"kind": "test"}, "kernel": {"lag_steps": 2}},
        "conventions": {"C": "eq. (1)"},
        "model": {"class": model_class, "num_parameters": offset, "storage_dtype": "float32", "device": "cpu",
                  "parameters": specs, "buffers": [{"name": "running_mean", "shape": [2], "dtype": "float32"}]},
        "optimizer": {"class": optimizer_class, "defaults": {"lr": 0.1}},
        "eval": {"n": EVAL_N, "num_classes": 3, "fingerprint": fingerprint},
    }


def _cosine_dissimilarity(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.clip(1.0 - unit @ unit.T, 0.0, 2.0) * (1 - np.eye(len(vectors)))


def write_small_run(root: Path, *, steps: tuple[int, ...] = (0, 2, 4, 6, 8), ghosts: bool = True,
                    close: bool = True, seed: int = 0) -> dict:
    """Write the run at ``root``; returns the truth (``theta``, ``preds``, ``C``, ``D``, ``S``, ``steps``)."""
    rng = np.random.default_rng(seed)
    T, P = len(steps), sum(int(np.prod(s)) for _, s in PARAMS)
    theta = rng.normal(size=(T, P)).astype(np.float32)
    preds = rng.integers(0, 3, size=(T, EVAL_N)).astype(np.int16)
    kernels = rng.normal(size=(T, 4, 4))
    C = _cosine_dissimilarity(theta.astype(np.float64))
    D = (preds[:, None, :] != preds[None, :, :]).mean(axis=2)
    S = _cosine_dissimilarity(kernels.reshape(T, -1))
    writer = RunWriter(root, manifest(), resume=False)
    writer.save_run_array(EVAL_INDICES, np.arange(EVAL_N, dtype=np.int64))
    for k, step in enumerate(steps):
        writer.save_array(step, "params", theta[k])
        writer.save_arrays(step, "buffers", {"running_mean": theta[k, :2]})
        writer.save_array(step, "preds", preds[k])
        writer.save_array(step, "kernel", kernels[k])
        for name, matrix in (("C", C), ("D", D), ("S", S)):
            TriangularRows(writer.rows_path(name)).append(matrix[k, : k + 1], k)
        if ghosts and k == 1:
            for g in (0, 1):
                writer.event("ghost_spawn", ghost=g, step=step, spawn_step=step, control=g == 0, kind="l2", seed=g,
                             nominal_norm=0.0 if g == 0 else 1e-3, realized_norm=0.0 if g == 0 else 1e-3,
                             changed=0 if g == 0 else P, total=P)
        if ghosts and k >= 1:
            for g in (0, 1):
                writer.save_array(step, f"ghost_{g:03d}.preds", preds[k])
                writer.event("ghost_compare", ghost=g, step=step, C=0.0 if g == 0 else 1e-3 * k, L2=0.0, D=0.0,
                             eval_loss=1.0, eval_accuracy=0.5)
                writer.append_separation(g, np.array([step - 1, step]), np.array([1e-3 * g, 2e-3 * g]))
        writer.commit_snapshot({"step": step, "eval_loss": 1.0 / (k + 1), "eval_accuracy": 0.1 * k,
                                "train_loss": None if k == 0 else 1.5 / k, "kernel": True})
    for k in range(1, T):
        append_jsonl(barriers_path(root), {"i": steps[k], "j": steps[k - 1], "value": 0.1 * k, "B_linear": 0.05 * k,
                                           "argmax_alpha": 0.5, "alphas": 5, "metric": "loss"})
    switching_results_path(root).parent.mkdir(exist_ok=True)
    for switch in steps[:3]:
        append_jsonl(switching_results_path(root), {"switch_step": switch, "total_steps": steps[-1],
                                                    "eval_loss": 1.0 + switch, "eval_accuracy": 0.5,
                                                    "config_id": "abc", "config": {"lr": 0.1}})
    if close:
        if ghosts:
            for g in (0, 1):
                writer.event("ghost_status", ghost=g, step=steps[-1], status="finished", reason="run closed")
        writer.update_manifest(status="closed", final_step=steps[-1])
        writer.event("close", step=steps[-1], status="closed", reason=None)
    writer.close()
    return {"theta": theta, "preds": preds, "kernels": kernels, "C": C, "D": D, "S": S, "steps": np.array(steps)}
