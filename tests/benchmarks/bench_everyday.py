"""Everyday training scripts, each run twice — without the probe and with it attached as the docs say (issue 24).

Run: ``HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python tests/benchmarks/bench_everyday.py [--out everyday.json]
[--only vit,gpt,...] [--steps 40] [--compile-backend inductor|aot_eager]``

Scripts (models of ~50k–300k parameters, generated data, ``--steps`` optimizer steps, CPU):

1. ``vit``: ViT (patch-embedding conv, nn.MultiheadAttention, LayerNorm, dropout), AdamW + linear-warmup/cosine
   LambdaLR + ``clip_grad_norm_`` (declared: ``Ghosts(clip_grad_norm=1.0)``);
2. ``gpt``: GPT-style LM, tied embeddings, labels padded with -100 (token task), the loss called as
   ``criterion(logits.reshape(-1, V), y.reshape(-1))`` (a view of the output, replayed on the ghosts' outputs);
   ``gpt_2nd``: ``criterion(model(x), y)`` with a loss module that flattens inside (the second try the probe needed
   while it matched the output by identity only; it must now give the same numbers as ``gpt``);
3. ``unet``: U-Net regressor (conv + BatchNorm, default biases), per-pixel MSE, Adam;
4. ``bert``: transformers ``BertForSequenceClassification`` from a config, padded attention masks, plain loop,
   the model's own loss (``loss_from_output=True``);
5. ``compile``: ``torch.compile`` of a small CNN with dropout (backend: ``--compile-backend``, default inductor;
   ``compile_aot``: the same with backend="aot_eager"); the first bare run warms the compile caches and is not
   timed;
6. ``bf16``: MLP with dropout trained under CPU bf16 autocast;
7. ``accum``: CNN with BatchNorm, 4 micro-batches per optimizer step (loss / 4);
8. ``frozen``: CNN whose first conv is frozen, two param groups with different learning rates;
9. ``lightning``: ``dynprobe.integrations.lightning.DynprobeCallback`` (accumulate 2, gradient clipping);
10. ``hf_trainer``: ``dynprobe.integrations.huggingface.DynprobeCallback`` on a tiny BERT (accumulation 2,
    ``max_grad_norm``).

For each: first try works (no exception, probe status ``closed``, no ``probe_error``; the warnings the probed run
emitted that the bare run did not), bitwise (final parameters and buffers ``torch.equal`` to the bare run's, and
the same global RNG state after), control exact (the ε = 0 ghost's separation curve and its C/L2/D all exactly 0,
or the ``control_drift`` event and its causes), the chaos reading of the first perturbed ghost spawned at step 0:
δ = L2 / realized ‖ε‖ at the step-1 snapshot and at the last one, with every tensor (``chaos["L2"]``) and without
the inert ones (``chaos["L2_active"]``: equal to L2 when none were found; NaN in runs of older trees), the
``inert_parameters`` event's tensors, and the cost: ``estimate_cost`` (on a separate build of the same model)
→ predicted ratio = ``ghost_training_factor`` + ``seconds_total`` / bare wall time, against the measured ratio
probed wall time (attach → close) / bare wall time (the training loop), both measured in this process. The machine
is shared and loaded: the timings are indicative (``uptime`` is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import everyday_models as em  # noqa: E402

import dynprobe  # noqa: E402

STEPS = 40
BATCH = 32
EVAL_N = 256
KERNEL_N = 16
PERTURBATION = None  # the docs' default: Perturbation(1e-7, "l2")


def ghosts(**extra: Any) -> dynprobe.Ghosts:
    """Ghosts at 0 and at half the run, with the default ε = 0 control (chaos.md)."""
    return dynprobe.Ghosts(at=[0, STEPS // 2], **extra)


def kernel() -> dynprobe.KernelConfig:
    return dynprobe.KernelConfig(n=KERNEL_N)


# ------------------------------------------------------------------------------------------ plain-loop scripts
@dataclass
class Setup:
    model: nn.Module                       # what the user hands the probe (compiled wrapper included)
    optimizer: torch.optim.Optimizer
    criterion: Callable | None             # None: the model's own loss (loss_from_output)
    eval_data: Any
    loop: Callable[[Any], None]            # loop(criterion)
    module: nn.Module | None = None        # the module whose parameters are compared (default: model)
    ghosts: dict = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _batches(data_fn, n_batches: int, seed: int, batch: int = BATCH):
    x, y = data_fn(n_batches * batch, seed)
    if isinstance(x, dict):
        return [({k: v[i * batch:(i + 1) * batch] for k, v in x.items()}, y[i * batch:(i + 1) * batch])
                for i in range(n_batches)]
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(n_batches)]


def setup_vit() -> Setup:
    model = em.ViT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, em.warmup_cosine(5, STEPS))
    data = _batches(em.teacher_images, STEPS, seed=1)

    def loop(criterion):
        for x, y in data:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()

    return Setup(model, optimizer, nn.CrossEntropyLoss(), em.teacher_images(EVAL_N, seed=2), loop,
                 ghosts={"clip_grad_norm": 1.0})


def setup_gpt() -> Setup:
    model = em.GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = _batches(em.token_sequences, STEPS, seed=1)

    def loop(criterion):
        for x, y in data:
            logits = model(x)
            loss = criterion(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return Setup(model, optimizer, nn.CrossEntropyLoss(ignore_index=-100), em.token_sequences(EVAL_N, seed=2), loop)


class TokenCrossEntropy(nn.Module):
    """The second try for ``gpt``: the watched loss takes the model's output itself and flattens inside (needed while
    the probe found the model's output among the loss arguments by identity only, so ``logits.reshape(...)``
    matched nothing; views are matched now)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def setup_gpt_second_try() -> Setup:
    model = em.GPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = _batches(em.token_sequences, STEPS, seed=1)

    def loop(criterion):
        for x, y in data:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return Setup(model, optimizer, TokenCrossEntropy(), em.token_sequences(EVAL_N, seed=2), loop,
                 notes=["second try: loss module flattening inside"])


def setup_unet() -> Setup:
    model = em.UNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = _batches(em.blur_pairs, STEPS, seed=1, batch=16)

    def loop(criterion):
        for x, y in data:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return Setup(model, optimizer, nn.MSELoss(), em.blur_pairs(128, seed=2), loop)


def setup_bert() -> Setup:
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 4, STEPS)
    data = _batches(em.marker_sentences, STEPS, seed=1)

    def loop(criterion):
        for inputs, y in data:
            loss = model(**inputs, labels=y).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()

    return Setup(model, optimizer, None, em.marker_sentences(EVAL_N, seed=2), loop,
                 probe={"loss_from_output": True})


def setup_compile(backend: str) -> Callable[[], Setup]:
    def build() -> Setup:
        net = em.SmallCNN(width=16)
        model = torch.compile(net, backend=backend)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        data = _batches(em.teacher_images, STEPS, seed=1)

        def loop(criterion):
            for x, y in data:
                loss = criterion(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        return Setup(model, optimizer, nn.CrossEntropyLoss(), em.teacher_images(EVAL_N, seed=2), loop, module=net,
                     notes=[f"torch.compile(model, backend={backend!r})"])
    return build


def setup_bf16() -> Setup:
    model = em.MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    data = _batches(em.teacher_vectors, STEPS, seed=1)

    def loop(criterion):
        for x, y in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return Setup(model, optimizer, nn.CrossEntropyLoss(), em.teacher_vectors(EVAL_N, seed=2), loop)


def setup_accum() -> Setup:
    model = em.SmallCNN(width=16, batchnorm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    micro = 4
    data = _batches(em.teacher_images, STEPS * micro, seed=1, batch=BATCH // 2)

    def loop(criterion):
        optimizer.zero_grad()
        for i, (x, y) in enumerate(data):
            loss = criterion(model(x), y) / micro
            loss.backward()
            if (i + 1) % micro == 0:
                optimizer.step()
                optimizer.zero_grad()

    return Setup(model, optimizer, nn.CrossEntropyLoss(), em.teacher_images(EVAL_N, seed=2), loop)


def setup_frozen() -> Setup:
    model = em.SmallCNN(width=16)
    for p in model.features[0].parameters():
        p.requires_grad_(False)
    body = [p for p in model.features.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": body, "lr": 1e-3}, {"params": model.head.parameters(), "lr": 1e-2}])
    data = _batches(em.teacher_images, STEPS, seed=1)

    def loop(criterion):
        for x, y in data:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return Setup(model, optimizer, nn.CrossEntropyLoss(), em.teacher_images(EVAL_N, seed=2), loop)


# ------------------------------------------------------------------------------------------ the two runs
def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _warning_texts(caught) -> list[str]:
    return [f"{w.category.__name__}: {str(w.message)}" for w in caught]


def run_plain(build: Callable[[], Setup], out: Path | None) -> dict[str, Any]:
    torch.manual_seed(0)
    setup = build()
    criterion = setup.criterion
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        probe = None
        if out is not None:
            probe = dynprobe.Probe(setup.model, setup.optimizer, eval_data=setup.eval_data, out=str(out),
                                   ghosts=ghosts(**setup.ghosts), kernel=kernel(), total_steps=STEPS, **setup.probe)
            if criterion is not None:
                criterion = probe.watch(criterion)
        setup.loop(criterion)
        if probe is not None:
            probe.close()
        wall = time.perf_counter() - start
    return {"state": _state(setup.module or setup.model), "rng": torch.get_rng_state().clone(), "wall": wall,
            "warnings": _warning_texts(caught), "notes": setup.notes}


def estimate(model, optimizer, eval_data, **probe_options) -> Any:
    """``estimate_cost`` with the Probe's keyword arguments; those it refuses (its docstring says it takes the
    arguments Probe would get) are dropped and named in the estimate's ``dropped`` attribute."""
    import inspect

    accepted = inspect.signature(dynprobe.estimate_cost).parameters
    dropped = sorted(k for k in probe_options if k not in accepted)
    result = dynprobe.estimate_cost(model, optimizer, eval_data, total_steps=STEPS, console=False,
                                    **{k: v for k, v in probe_options.items() if k in accepted})
    return result, dropped


def estimate_plain(build: Callable[[], Setup]) -> Any:
    torch.manual_seed(0)
    setup = build()
    return estimate(setup.module or setup.model, setup.optimizer, setup.eval_data,
                    ghosts=ghosts(**setup.ghosts), kernel=kernel(), **setup.probe)


# ------------------------------------------------------------------------------------------ Lightning
def _lightning_parts():
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = em.MLP(hidden=128)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_accuracy", (self(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return pl, Classifier


def _callback_result(model: nn.Module, wall: float, caught: list, note: str, callbacks: list, out: Path | None,
                     root: Path) -> dict[str, Any]:
    """A framework run's result (state, RNG, wall time, warnings); its probe's run kept at ``out``, ``root`` removed."""
    result = {"state": _state(model), "rng": torch.get_rng_state().clone(), "wall": wall,
              "warnings": _warning_texts(caught), "notes": [note]}
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(callbacks[0].probe.out, out)
    shutil.rmtree(root, ignore_errors=True)
    return result


def run_lightning(out: Path | None) -> dict[str, Any]:
    pl, Classifier = _lightning_parts()
    torch.manual_seed(0)
    module = Classifier()
    x, y = em.teacher_vectors(STEPS * 2 * BATCH, seed=1)
    xv, yv = em.teacher_vectors(EVAL_N, seed=2)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                                        generator=torch.Generator().manual_seed(3))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=128)
    root = Path(tempfile.mkdtemp(prefix="everyday-pl-"))
    callbacks = []
    if out is not None:
        from dynprobe.integrations.lightning import DynprobeCallback
        callbacks.append(DynprobeCallback(ghosts=ghosts(), kernel=kernel(), total_steps=STEPS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, default_root_dir=str(root),
                             accumulate_grad_batches=2, gradient_clip_val=0.5, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, logger=False,
                             num_sanity_val_steps=0, callbacks=callbacks)
        trainer.fit(module, train, val)
        wall = time.perf_counter() - start
    return _callback_result(module, wall, caught, "accumulate_grad_batches=2, gradient_clip_val=0.5", callbacks,
                            out, root)


def estimate_lightning() -> Any:
    _, Classifier = _lightning_parts()
    torch.manual_seed(0)
    module = Classifier()
    return estimate(module, module.configure_optimizers(), em.teacher_vectors(EVAL_N, seed=2),
                    ghosts=ghosts(), kernel=kernel())


# ------------------------------------------------------------------------------------------ Hugging Face Trainer
class _Examples(torch.utils.data.Dataset):
    def __init__(self, inputs: dict, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.inputs.items()}, "labels": self.labels[i]}


def _hf_model():
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def run_hf(out: Path | None) -> dict[str, Any]:
    import transformers

    transformers.set_seed(0)
    model = _hf_model()
    train = _Examples(*em.marker_sentences(STEPS * 2 * 16, seed=1))
    root = Path(tempfile.mkdtemp(prefix="everyday-hf-"))
    args = transformers.TrainingArguments(
        output_dir=str(root), max_steps=STEPS, per_device_train_batch_size=16, gradient_accumulation_steps=2,
        learning_rate=2e-3, max_grad_norm=1.0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6,
        seed=0, disable_tqdm=True, dataloader_num_workers=0)
    callbacks = []
    if out is not None:
        from dynprobe.integrations.huggingface import DynprobeCallback
        callbacks.append(DynprobeCallback(eval_data=em.marker_sentences(EVAL_N, seed=2), ghosts=ghosts(),
                                          kernel=kernel(), total_steps=STEPS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train, callbacks=callbacks)
        trainer.train()
        wall = time.perf_counter() - start
    return _callback_result(model, wall, caught, "gradient_accumulation_steps=2, max_grad_norm=1.0", callbacks,
                            out, root)


def estimate_hf() -> Any:
    torch.manual_seed(0)
    model = _hf_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    return estimate(model, optimizer, em.marker_sentences(EVAL_N, seed=2), ghosts=ghosts(clip_grad_norm=1.0),
                    kernel=kernel(), loss_from_output=True)


# ------------------------------------------------------------------------------------------ reading the run
def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _gid(ghost: Any) -> int:
    """A ghost record's id (``ghost_id``; ``index`` in older trees this bench also runs on)."""
    return ghost.ghost_id if hasattr(ghost, "ghost_id") else ghost.index


def read_run(out: Path) -> dict[str, Any]:
    run = dynprobe.load_run(str(out))
    events = run.events
    kinds = [e.get("event") for e in events]
    reading: dict[str, Any] = {"status": run.status, "snapshots": len(run.steps),
                               "probe_errors": [e for e in events if e.get("event") == "probe_error"],
                               "event_counts": {k: kinds.count(k) for k in sorted(set(kinds))}}
    inert = [e for e in events if e.get("event") == "inert_parameters"]
    reading["inert_tensors"] = inert[0].get("tensors", []) if inert else None
    reading["control_drift"] = [{k: e.get(k) for k in ("step", "likely_causes", "tensors", "max_abs_diff")
                                 if k in e} for e in events if e.get("event") == "control_drift"]
    reading["other_events"] = {k: [{kk: vv for kk, vv in e.items() if kk not in ("time",)}
                                   for e in events if e.get("event") == k][:2]
                               for k in ("grad_edit_detected", "nondeterministic_device",
                                         "perturbation_below_precision",
                                         "model_changed", "ghost_spawn_skipped", "stateful_loss", "ghost_mode")
                               if k in kinds}
    reading["ghosts"] = [{"id": _gid(g), "spawn": g.spawn_step, "control": g.control, "realized": g.realized_norm,
                          "changed": getattr(g, "changed", None), "total": getattr(g, "total", None),
                          "status": g.status, "reason": getattr(g, "reason", None)} for g in run.ghosts]
    steps = np.asarray(run.steps)
    control = [g for g in run.ghosts if g.control]
    if control:
        g = control[0]
        _, sep = run.separation(_gid(g))
        maps = {name: _finite(np.asarray(run.chaos[name][_gid(g)])) for name in ("C", "L2", "D")}
        reading["control"] = {"separation_steps": len(sep), "separation_max": float(np.max(sep)) if len(sep) else None,
                              "maps_max": {k: (float(np.max(np.abs(v))) if len(v) else None) for k, v in maps.items()},
                              "exact": bool(len(sep) and np.all(sep == 0)
                                            and all(np.all(v == 0) for v in maps.values()))}
    perturbed = [g for g in run.ghosts if not g.control and g.spawn_step == 0]
    if perturbed:
        g = perturbed[0]
        eps = g.realized_norm
        l2 = np.asarray(run.chaos["L2"][_gid(g)], dtype=float)
        try:  # L2_active is newer than some trees this bench runs on
            active = np.asarray(run.chaos["L2_active"][_gid(g)], dtype=float)
        except (KeyError, TypeError):
            active = np.full_like(l2, np.nan)
        sep_steps, sep = run.separation(_gid(g))

        def at(values: np.ndarray, step: int) -> float:
            hit = np.nonzero(steps == step)[0]
            return float(values[hit[0]]) if len(hit) else float("nan")

        last = int(steps[np.isfinite(l2)][-1]) if np.isfinite(l2).any() else -1
        reading["chaos"] = {
            "ghost": _gid(g), "eps": eps, "changed": getattr(g, "changed", None), "total": getattr(g, "total", None),
            "status": g.status,
            "delta1": at(l2, 1) / eps if eps else float("nan"),
            "delta1_active": at(active, 1) / eps if eps else float("nan"),
            "last_step": last,
            "delta_last": at(l2, last) / eps if eps else float("nan"),
            "delta_last_active": at(active, last) / eps if eps else float("nan"),
            "active_reported": bool(np.isfinite(active).any()),
            "separation_step1_over_0": float(sep[1] / sep[0]) if len(sep) > 1 and sep[0] else float("nan"),
            "separation_last_over_0": float(sep[-1] / sep[0]) if len(sep) > 1 and sep[0] else float("nan"),
        }
    return reading


# ------------------------------------------------------------------------------------------ one script
def bench_one(name: str, kind: str, bare_fn, probed_fn, estimate_fn, warmup: bool, root: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"script": name, "kind": kind}
    out = root / name
    try:
        if warmup:
            bare_fn()  # compile caches: time the second bare run
        bare = bare_fn()
    except Exception as error:  # the user's own script failing is a bench bug, not a probe result
        row["error_bare"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        return row
    row["wall_bare"] = bare["wall"]
    row["notes"] = bare["notes"]
    try:
        probed = probed_fn(out)
        row["first_try"] = True
    except Exception as error:
        row["first_try"] = False
        row["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
        return row
    row["wall_probe"] = probed["wall"]
    bare_warnings = set(bare["warnings"])
    row["warnings"] = list(dict.fromkeys(w for w in probed["warnings"] if w not in bare_warnings))
    row["bitwise_params"] = _same(bare["state"], probed["state"])
    row["bitwise_rng"] = bool(torch.equal(bare["rng"], probed["rng"]))
    if not row["bitwise_params"]:
        row["param_diff"] = {k: float((bare["state"][k].double() - probed["state"][k].double()).abs().max())
                             for k in bare["state"] if not torch.equal(bare["state"][k], probed["state"][k])}
    try:
        row["run"] = read_run(out)
        failed = [f"ghost {g['id']}: {g['reason']}" for g in row["run"]["ghosts"]
                  if g["status"] in ("failed", "diverged")]
        row["ghost_failures"] = failed
        row["first_try"] = (row["first_try"] and row["run"]["status"] == "closed" and not row["run"]["probe_errors"]
                            and not failed)
    except Exception as error:
        row["run_error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    try:
        estimate, row["estimate_dropped_options"] = estimate_fn()
        row["estimate"] = {"ghost_training_factor": estimate.ghost_training_factor,
                           "seconds_total": estimate.seconds_total, "snapshots": estimate.snapshots,
                           "seconds_per_kernel": estimate.seconds_per_kernel, "notes": estimate.notes}
        row["ratio_predicted"] = estimate.ghost_training_factor + estimate.seconds_total / bare["wall"]
    except Exception as error:
        row["estimate_error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    row["ratio_measured"] = probed["wall"] / bare["wall"]
    return row


def scripts(backend: str):
    plain = [("vit", "ViT, AdamW + warmup/cosine LambdaLR + clip_grad_norm_ (declared)", setup_vit),
             ("gpt", "GPT LM, tied embeddings, -100 labels", setup_gpt),
             ("gpt_2nd", "GPT LM, second try: criterion(model(x), y), flattening inside the loss",
              setup_gpt_second_try),
             ("unet", "U-Net regressor (BN), MSE, Adam", setup_unet),
             ("bert", "tiny BertForSequenceClassification, padded masks, plain loop", setup_bert),
             ("compile", f"torch.compile CNN (backend={backend})", setup_compile(backend)),
             ("compile_aot", "torch.compile CNN (backend=aot_eager)", setup_compile("aot_eager")),
             ("bf16", "bf16 autocast MLP, SGD momentum", setup_bf16),
             ("accum", "grad accumulation ×4, CNN + BN, SGD nesterov", setup_accum),
             ("frozen", "frozen conv + 2 param groups, Adam", setup_frozen)]
    for name, kind, build in plain:
        yield (name, kind, (lambda b=build: run_plain(b, None)), (lambda out, b=build: run_plain(b, out)),
               (lambda b=build: estimate_plain(b)), name.startswith("compile"))
    yield ("lightning", "Lightning callback, MLP, Adam, accumulate 2 + clip", lambda: run_lightning(None),
           run_lightning, estimate_lightning, False)
    yield ("hf_trainer", "HF Trainer callback, tiny BERT, accumulate 2 + max_grad_norm", lambda: run_hf(None),
           run_hf, estimate_hf, False)


# ------------------------------------------------------------------------------------------ the table
def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| script | first try works (probe warnings) | bitwise (params / RNG) | control exact | "
             "chaos δ=L2/‖ε‖: step 1 → last, all / active; inert tensors | cost predicted / measured |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "error_bare" in row:
            lines.append(f"| {row['script']} | bench error (bare run): {_short(row['error_bare'])} | | | | |")
            continue
        if "error" in row:
            lines.append(f"| {row['script']} | **no**: {_short(row['error'], 200)} | | | | |")
            continue
        warns = "; ".join(_short(w.replace("RuntimeWarning: dynprobe: ", ""), 70)
                          for w in row.get("warnings", [])) or "none"
        first = ("yes" if row["first_try"] else "**no**") + f" ({warns})"
        if row.get("ghost_failures"):
            reasons = "; ".join(dict.fromkeys(f.split(": ", 1)[1] for f in row["ghost_failures"]))
            first += f"; ghosts failed: {_short(reasons, 80)}"
        bitwise = f"{'yes' if row['bitwise_params'] else '**no**'} / {'yes' if row['bitwise_rng'] else '**no**'}"
        run = row.get("run", {})
        control = run.get("control")
        control_ghost = [g for g in run.get("ghosts", []) if g["control"]]
        if control is None:
            ctrl = "no control ghost"
        elif control_ghost and control_ghost[0]["status"] in ("failed", "diverged"):
            ctrl = (f"**{control_ghost[0]['status']}** after {control['separation_steps'] - 1} step(s): "
                    f"{control_ghost[0]['reason']}")
        elif control["exact"]:
            ctrl = f"yes (0 over {control['separation_steps']} steps)"
        else:
            drift = run.get("control_drift") or []
            d = drift[0] if drift else {}
            causes = _short(str(d.get("likely_causes")), 160)
            ctrl = (f"**no**: max sep {_fmt(control['separation_max'])}; drift event step {d.get('step')}: "
                    f"max abs {_fmt(d.get('max_abs_diff'))}, causes: {causes}" if drift else
                    f"**no**: max sep {_fmt(control['separation_max'])}, no drift event")
        chaos = run.get("chaos")
        if chaos:
            act1 = _fmt(chaos["delta1_active"]) if chaos["active_reported"] else "= (no inert)"
            actl = _fmt(chaos["delta_last_active"]) if chaos["active_reported"] else "="
            inert = run.get("inert_tensors")
            inert_s = "event missing" if inert is None else (", ".join(inert) if inert else "none")
            ch = (f"all {_fmt(chaos['delta1'])} → {_fmt(chaos['delta_last'])} (step {chaos['last_step']}); "
                  f"active {act1} → {actl}; ‖ε‖={_fmt(chaos['eps'], 2)} on {chaos['changed']}/{chaos['total']}; "
                  f"inert: {_short(inert_s, 120)}")
        else:
            ch = "n/a"
        cost = f"{_fmt(row.get('ratio_predicted'))}× / {_fmt(row.get('ratio_measured'))}×"
        if row.get("estimate_dropped_options"):
            cost += f" (estimate_cost refused {', '.join(row['estimate_dropped_options'])})"
        if "estimate_error" in row:
            cost = f"estimate failed: {_short(row['estimate_error'], 80)} / {_fmt(row.get('ratio_measured'))}×"
        lines.append(f"| {row['script']} | {first} | {bitwise} | {ctrl} | {ch} | {cost} |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--only", default=None, help="comma-separated script names")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--compile-backend", default="inductor", help="backend of the `compile` row "
                        "(`compile_aot` always uses aot_eager)")
    parser.add_argument("--keep", default=None, help="keep the run directories under this folder")
    args = parser.parse_args()
    STEPS = args.steps
    torch.set_num_threads(1)
    uptime = open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else "?"
    print(f"# dynprobe {getattr(dynprobe, '__version__', '?')}, torch {torch.__version__}, {STEPS} steps, "
          f"1 thread, loadavg {uptime} (shared machine: timings indicative)", flush=True)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="everyday-"))
    root.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for name, kind, bare_fn, probed_fn, estimate_fn, warmup in scripts(args.compile_backend):
        if only and name not in only:
            continue
        start = time.perf_counter()
        row = bench_one(name, kind, bare_fn, probed_fn, estimate_fn, warmup, root)
        row["bench_seconds"] = time.perf_counter() - start
        rows.append(row)
        print(f"# {name}: {row['bench_seconds']:.1f} s", flush=True)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": STEPS, "loadavg": uptime, "torch": torch.__version__,
                                              "compile_backend": args.compile_backend,
                                              "rows": _jsonable(rows), "table": text}, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
