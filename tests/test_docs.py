"""The documentation's promises: every Python snippet runs as written, the README's first section has two commands,
the option table matches ``ProbeOptions``, and the site builds with ``mkdocs build --strict``.

Each ```python block of the README and of ``docs/`` is claimed by exactly one test below (by a string only it
contains; a snippet shown on two pages must be the same text on both) and executed as written in a namespace holding
the names it assumes (``model``, ``optimizer``, ``x_test``, …). A line that is just ``...`` stands for the user's
training loop: the test puts a loop over ``STEPS`` steps and ``probe.close()`` there. A new snippet without a test
fails :func:`test_every_python_snippet_is_executed_by_a_test`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dynprobe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
README_MAX_LINES = 150

# The string that identifies each snippet, and the test that executes it.
CLAIMS = {
    'out="runs/my-run"': "test_quickstart_snippet_runs_as_written",
    'out="runs/cone"': "test_cone_snippet_runs_as_written",
    'out="runs/chaos"': "test_chaos_snippet_runs_as_written",
    "switching_experiment(": "test_switching_snippet_runs_as_written",
    'out="runs/ddp"': "test_ddp_snippet_runs_as_written_in_a_one_process_group",
    'out="runs/fsdp"': "test_fsdp_snippet_runs_as_written_in_a_one_process_group",
    "PLDynprobeCallback for": "test_integrations_snippet_runs_as_written",
    "ModelParallelStrategy(": "test_fsdp_lightning_and_hugging_face_snippets_run_as_written_on_two_ranks",
    'fsdp_config={"version": 2,': "test_fsdp_lightning_and_hugging_face_snippets_run_as_written_on_two_ranks",
}

TRAINING_LOOP = """
for step in range(STEPS):
    x, y = batch(step)
    loss = criterion(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
probe.close()
"""


def _snippets() -> list[str]:
    """Every distinct ```python block of the README and the documentation pages."""
    found = [s for page in PAGES for s in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]
    return list(dict.fromkeys(found))


def _snippet(claim: str) -> str:
    found = [s for s in _snippets() if claim in s]
    assert len(found) == 1, f"{len(found)} different snippets contain {claim!r} (a repeated snippet must be identical)"
    return found[0]


def _with_training_loop(code: str) -> str:
    lines = code.splitlines()
    assert lines.count("...") == 1, "the snippet must have one '...' line standing for the training loop"
    return code.replace("\n...\n", "\n" + TRAINING_LOOP + "\n", 1)


def _data(n: int = 600, features: int = 12, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=generator)
    return x, (x[:, :classes].argmax(1) + (x[:, classes] > 1).long()) % classes


class Net(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _namespace(steps: int) -> dict:
    """What the snippets assume: a model, its optimizer and loss, a loader, an eval set, and a batch stream."""
    torch.manual_seed(0)
    x, y = _data()
    model = Net()
    stream = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 384, 32)]
    return {
        "dynprobe": dynprobe, "torch": torch, "Net": Net, "STEPS": steps,
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "criterion": nn.CrossEntropyLoss(),
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:200], y[:200]), batch_size=20),
        "x_test": x[400:], "y_test": y[400:],
        "stream": [stream[s % len(stream)] for s in range(steps)],
        "batch": lambda step: stream[step % len(stream)],
    }


def _run(code: str, namespace: dict, name: str) -> dict:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nominal norm survived float rounding.*")
        exec(compile(code, f"documentation {name} snippet", "exec"), namespace)
    return namespace


def test_every_python_snippet_is_executed_by_a_test():
    tests = {name for name in globals() if name.startswith("test_")}
    for snippet in _snippets():
        claims = [claim for claim in CLAIMS if claim in snippet]
        assert len(claims) == 1, f"documentation snippet not claimed by exactly one test:\n{snippet}"
        assert CLAIMS[claims[0]] in tests


def test_quickstart_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _run(_snippet('out="runs/my-run"'), _namespace(0), "quickstart")
    run = dynprobe.load_run(tmp_path / "runs" / "my-run")
    assert run.steps[0] == 0 and run.steps[-1] == 10 and run.status == "closed"
    assert namespace["run"].C.shape == (len(run.steps), len(run.steps))


def test_cone_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _run(_with_training_loop(_snippet('out="runs/cone"')), _namespace(2000), "cone")
    run = namespace["run"]
    t, v = namespace["t"], namespace["v"]
    assert t.size and np.all(np.isfinite(v)) and np.all(np.isin(t + 500, run.kernel_steps))
    assert namespace["H"].shape == (128, 128)
    np.testing.assert_allclose(namespace["H_l"].sum(0), namespace["H"], rtol=1e-10, atol=1e-12)
    assert run.S_layers.shape == (2, len(run.steps), len(run.steps))


def test_chaos_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _run(_with_training_loop(_snippet('out="runs/chaos"')), _namespace(1100), "chaos")
    run = namespace["run"]
    assert [g.spawn_step for g in run.ghosts if not g.control] == [0, 100, 1000]
    steps, l2 = namespace["steps"], namespace["l2"]
    assert steps[0] == 0 and steps[-1] == 1100 and np.all(l2[1:] > 0)
    assert run.chaos["D"].shape == (len(run.ghosts), len(run.steps))


def test_switching_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _namespace(2000)
    recording = "probe = dynprobe.Probe(model, optimizer, eval_data=(x_test, y_test), out='runs/mine', " \
                "schedule=[0, 100, 500, 2000], progress=False)\n" + TRAINING_LOOP
    _run(recording, namespace, "the run the switching snippet reads")
    namespace = _run(_snippet("switching_experiment("), namespace, "switching")
    result = namespace["result"]
    assert list(result["switch_step"]) == [0, 100, 500, 2000]
    assert np.all(np.isfinite(result["eval_loss"]))
    assert list(dynprobe.load_run("runs/mine").switching["switch_step"]) == [0, 100, 500, 2000]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no false gradient-edit warning under DDP
def test_ddp_snippet_runs_as_written_in_a_one_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.chdir(tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        namespace = _namespace(120)
        net = namespace.pop("model")
        namespace.update(DDP=DistributedDataParallel, net=net, device=torch.device("cpu"))
        code = _snippet('out="runs/ddp"')
        namespace = _run(code + TRAINING_LOOP, namespace, "DDP")
    finally:
        dist.destroy_process_group()
    run = dynprobe.load_run(tmp_path / "runs" / "ddp")
    assert run.status == "closed" and run.steps[-1] == 120
    control = [i for i, g in enumerate(run.ghosts) if g.control]
    assert np.all(run.chaos["C"][control[0]][np.isfinite(run.chaos["C"][control[0]])] == 0.0)


def test_fsdp_snippet_runs_as_written_in_a_one_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    monkeypatch.chdir(tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        namespace = _namespace(20)
        net = namespace["model"]  # sharded in place: the loop calls the same object
        namespace.update(fully_shard=fully_shard, net=net)
        namespace = _run(_snippet('out="runs/fsdp"') + TRAINING_LOOP, namespace, "FSDP")
    finally:
        dist.destroy_process_group()
    run = dynprobe.load_run(tmp_path / "runs" / "fsdp")
    assert run.status == "closed" and run.steps[-1] == 20
    assert run.manifest["distributed"]["attached_to"] == "fully_shard"
    assert run.params(snapshot_index=-1).shape == (run.num_parameters,)


def test_fsdp_lightning_and_hugging_face_snippets_run_as_written_on_two_ranks(tmp_path):
    """Each snippet runs in a scenario of its integration's FSDP tests (2 gloo CPU processes; see there)."""
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    from tests import spawned

    (tmp_path / "lightning").mkdir()
    (tmp_path / "hf").mkdir()
    spawned.run_spawned("tests.integrations.test_lightning_fsdp", "docs_snippet", tmp_path / "lightning", world=2,
                        deadline_s=300)
    run = dynprobe.load_run(tmp_path / "lightning" / "runs" / "fsdp-lightning")
    assert run.status == "closed" and run.steps[-1] == 20
    assert run.manifest["distributed"]["attached_to"] == "fully_shard"
    results = spawned.run_spawned("tests.integrations.test_huggingface_fsdp", "docs_snippet", tmp_path / "hf",
                                  world=2, deadline_s=300)
    assert all(result["sharded"] for result in results)
    run = dynprobe.load_run(tmp_path / "hf" / "runs" / "fsdp-hf" / "dynprobe")
    assert run.status == "closed" and run.steps[-1] == 6
    assert run.manifest["distributed"]["attached_to"] == "fully_shard"


def test_integrations_snippet_runs_as_written(tmp_path, monkeypatch):
    lightning = pytest.importorskip("lightning")
    transformers = pytest.importorskip("transformers")
    from tests.integrations.test_huggingface import _eval_batch, _examples, _model
    from tests.integrations.test_lightning import TinyClassifier
    from tests.integrations.test_lightning import _data as lightning_data

    class DataModule(lightning.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(lightning_data(0), batch_size=16, shuffle=True)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(lightning_data(1, 96), batch_size=32)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    eval_batch = _eval_batch()
    namespace = {
        "dynprobe": dynprobe, "module": TinyClassifier(), "datamodule": DataModule(), "model": _model(),
        "args": transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, use_cpu=True,
                                               per_device_train_batch_size=8, report_to=[], save_strategy="no",
                                               logging_strategy="no", disable_tqdm=True),
        "train": _examples(64, seed=0),
        "inputs": {"input_ids": eval_batch["input_ids"]}, "labels": eval_batch["labels"],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace = _run(_snippet("PLDynprobeCallback for"), namespace, "integrations")
    lightning_run = dynprobe.load_run(Path(namespace["trainer"].log_dir) / "dynprobe")
    assert lightning_run.status == "closed" and [g.spawn_step for g in lightning_run.ghosts] == [0, 0, 100]
    hf_run = dynprobe.load_run(tmp_path / "hf" / "dynprobe")
    assert hf_run.status == "closed" and hf_run.steps[-1] == 6


def test_first_section_gives_exactly_two_commands_demo_and_tests():
    text = README.read_text()
    first = re.search(r"## On a fresh machine\n\n```bash\n(.*?)```", text, re.S)
    assert first, "README must open with the fresh-machine commands"
    commands = [line for line in first.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].endswith("dynprobe demo")
    assert "pytest" in commands[1]


def _probe_table() -> list[tuple[list[str], str]]:
    """The rows of the reference's ``Probe(...)`` argument table: (argument names, default cell)."""
    text = (DOCS / "reference" / "probe.md").read_text()
    section = text[text.index("# `Probe(model, optimizer, *, eval_data, out, ...)`"):]
    section = section[: section.index("\n\n", section.index("|---"))]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) < 3 or cells[0] in ("argument", "---|---|---") or set(cells[0]) <= {"-", "|"}:
            continue
        rows.append((re.findall(r"`(\w+)`", cells[0]), cells[1]))
    return rows


def test_the_probe_table_lists_every_option_of_probe_options_with_its_default():
    from dynprobe.probe.options import ProbeOptions, option_names

    rows = _probe_table()
    documented = [name for names, _ in rows for name in names]
    assert sorted(documented) == sorted(("eval_data", "out", *option_names())), "reference table vs ProbeOptions"
    defaults = {f.name: f.default for f in dataclasses.fields(ProbeOptions)}
    for names, cell in rows:
        literals = [c.strip().strip("`") for c in cell.split(",")] if len(names) > 1 else [cell.strip("`")]
        for name, literal in zip(names, literals):
            if name in ("eval_data", "out"):
                assert literal == "required"
                continue
            try:  # a literal default (2000, `False`, `"warn"`, `None`) must be the field's default
                value = eval(literal, {})  # noqa: S307 - the documentation's own table
            except (NameError, SyntaxError):  # prose ("from the targets"): the default is None, chosen at attach
                value = None
            if name == "barriers":
                assert literal == "Barriers()" and defaults[name] is None  # None means Barriers()
                continue
            assert value == defaults[name], f"documented {name}: {literal!r}; ProbeOptions: {defaults[name]!r}"


def test_the_readme_is_a_first_page_and_links_only_to_pages_that_exist():
    text = README.read_text()
    assert text.count("\n") <= README_MAX_LINES, "the README is the first page: move reference text into docs/"
    links = re.findall(r"\]\(((?!https?:)[^)#]+)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert (ROOT / link).exists(), f"the README links to {link}, which does not exist"


def test_every_page_is_in_the_site_navigation():
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md")}
    assert nav == pages


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "api" / "index.html").exists()
