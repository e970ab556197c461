"""Hugging Face Trainer + dynprobe: a tiny randomly initialized BERT classifier, no hub download.

The model is built from a ``BertConfig`` (2 layers, hidden size 32) and trained with ``transformers.Trainer`` on a
synthetic token task (the label is the most frequent of three marker tokens in the sequence). The only addition is
``DynprobeCallback(eval_data=..., ...)``: the model computes its own loss from dict inputs with ``labels``, the
callback captures the Trainer's micro-batches (gradient accumulation, ``max_grad_norm`` clipping) for ghost
replicas and writes the run under ``args.output_dir/dynprobe``.

Run: ``HF_HUB_OFFLINE=1 python examples/hf_tiny_classifier.py [--steps 200] [--output runs/hf-tiny]``, then
``dynprobe report runs/hf-tiny/dynprobe``. Needs ``pip install 'dynprobe[huggingface]'``.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import dynprobe  # noqa: E402
from dynprobe.integrations.huggingface import DynprobeCallback  # noqa: E402

VOCAB, SEQ, CLASSES = 64, 16, 3


def synthetic(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token sequences; label = which of the marker tokens 1, 2, 3 occurs most often (ties: the lowest)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, SEQ), generator=generator)
    markers = torch.randint(1, 4, (n, 6), generator=generator)
    ids[:, :6] = markers
    ids = torch.stack([row[torch.randperm(SEQ, generator=generator)] for row in ids])
    counts = torch.stack([(ids == k).sum(1) for k in (1, 2, 3)], dim=1)
    return {"input_ids": ids, "labels": counts.argmax(1)}


class Examples(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: value[i] for name, value in self.batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output", default="runs/hf-tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    transformers.set_seed(args.seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=CLASSES)
    model = transformers.BertForSequenceClassification(config)
    training_args = transformers.TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=32, gradient_accumulation_steps=2,
        learning_rate=2e-3, max_grad_norm=1.0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=50,
        seed=args.seed,
    )
    callback = DynprobeCallback(
        eval_data=synthetic(512, seed=1),                 # a batch dict with labels: split into (inputs, labels)
        kernel=dynprobe.KernelConfig(n=32),
        ghosts=dynprobe.Ghosts(at=[0, args.steps // 10, args.steps // 4],
                               perturbation=dynprobe.Perturbation(1e-4, "l2"), kernel_every_snapshots=4),
        barriers=dynprobe.Barriers(every_snapshots=4),
    )
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=Examples(synthetic(4096, seed=0)),
                                   callbacks=[callback])
    trainer.train()

    run = dynprobe.load_run(callback.probe.out)
    print(f"run: {callback.probe.out}  ({len(run.steps)} snapshots, final eval accuracy "
          f"{run.eval_accuracy[-1]:.3f}, C(final, init) = {run.C[-1, 0]:.3g})")
    print(f"report: dynprobe report {callback.probe.out}")


if __name__ == "__main__":
    main()
