"""The README's promises: the quickstart snippet runs as written, and the first section has two commands."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import dynprobe

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    marker = text.index("<!-- quickstart")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert block, "the quickstart code block is missing"
    return block.group(1)


def test_quickstart_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x, y = torch.randn(300, 12), torch.randint(0, 3, (300,))
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    namespace = {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "criterion": nn.CrossEntropyLoss(),
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:200], y[:200]), batch_size=20),
        "x_test": x[200:],
        "y_test": y[200:],
    }
    exec(compile(_quickstart(), "README quickstart", "exec"), namespace)
    run = dynprobe.load_run(tmp_path / "runs" / "my-run")
    assert run.steps[0] == 0 and run.steps[-1] == 10 and run.status == "closed"


def test_first_section_gives_exactly_two_commands_demo_and_tests():
    text = README.read_text()
    first = re.search(r"## On a fresh machine\n\n```bash\n(.*?)```", text, re.S)
    assert first, "README must open with the fresh-machine commands"
    commands = [line for line in first.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].endswith("dynprobe demo")
    assert "pytest" in commands[1]
