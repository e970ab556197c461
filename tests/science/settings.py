"""Constant-learning-rate training settings for the lock-step chaos → stable ground truth.

Plain PyTorch (no dynprobe import). Each :class:`Setting` fixes the data (MNIST-1D generated offline by the
``mnist1d`` package), the model, the optimizer (constant lr, no scheduler) and the batch order, so that two
programs — ``make_ground_truth.py`` here and a dynprobe test with a ``Probe`` on the same loop — replay the
identical training run::

    data = load_data(s)
    model = build_model(s)                 # seeds torch's global RNG with s.seed, then builds the model
    optimizer = build_optimizer(s, model)
    for step in range(total_steps):
        x, y = batch(s, data, step)        # random access: batch_indices(s, step) depends only on (s, step)
        train_step(model, optimizer, x, y)

No setting uses dropout or any other randomness inside the step, so a ghost needs no RNG replay.
Batch order: epoch e is ``torch.randperm(n_train, generator=Generator().manual_seed(s.seed * 1_000_003 + e))``,
cut into ``n_train // batch_size`` full batches (the remainder of each epoch is dropped).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from torch import nn

__all__ = ["SETTINGS", "Setting", "Data", "load_data", "build_model", "build_optimizer", "batch_indices",
           "batch", "train_step", "loss_fn", "get", "configure_torch"]


@dataclass(frozen=True)
class Setting:
    name: str
    arch: str                      # "mlp" | "mlp_ln" | "mlp_bn" | "cnn_bn" | "cnn_ln"
    width: int
    depth: int                     # hidden layers (mlp*) ; ignored by the CNNs (3 conv blocks)
    optimizer: str                 # "sgd" | "adam"
    lr: float
    momentum: float = 0.0          # SGD only
    weight_decay: float = 0.0
    adam_eps: float = 1e-8         # Adam only
    batch_size: int = 128
    num_samples: int = 4000        # MNIST-1D samples generated (train 80 %, test 20 %)
    data_seed: int = 42            # mnist1d generation seed (42 = the package's canonical data set)
    seed: int = 0                  # init (torch.manual_seed) and batch order
    act: str = "relu"              # "relu" | "gelu" | "tanh" (hidden activations of the MLPs and CNNs)
    init_scale: float = 1.0        # multiplies every weight (not bias / norm parameters) after default init
    horizon: int = 500             # H: the ghosts are compared at H and 2H
    spawns: tuple[int, ...] = (0, 25, 50, 100, 200, 400)
    directions: int = 3            # ghosts per spawn step
    eps: float = 1e-7              # ‖ε‖₂ over all parameters
    eval_n: int = 1000             # first eval_n test examples: disagreement D and the barrier
    label: str = ""                # free text: what the setting is meant to show

    @property
    def total_steps(self) -> int:
        return 2 * self.horizon

    def with_seed(self, seed: int) -> "Setting":
        return replace(self, seed=seed, name=f"{self.name}@seed{seed}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def configure_torch(threads: int = 1) -> None:
    """Deterministic CPU execution with a fixed thread count (call before building anything)."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


@lru_cache(maxsize=8)
def _mnist1d(num_samples: int, data_seed: int) -> Data:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = int(num_samples), int(data_seed), 0.8
    state = np.random.get_state()  # make_dataset seeds numpy's global RNG; leave the caller's stream alone
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(state)

    def f(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32).unsqueeze(1)

    def i(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.int64)

    return Data(f(raw["x"]), i(raw["y"]), f(raw["x_test"]), i(raw["y_test"]))


def load_data(s: Setting) -> Data:
    """MNIST-1D inputs ``(N, 1, 40)`` float32 (the MLPs flatten them), labels ``(N,)`` int64."""
    return _mnist1d(s.num_samples, s.data_seed)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """``depth`` hidden layers Linear → [norm] → ReLU and a linear head; with a norm the hidden Linears have no
    bias (a bias before a normalization layer has ~zero gradient, which Adam would turn into noise)."""

    def __init__(self, width: int, depth: int, norm: str = "", act: str = "relu", d_in: int = 40,
                 classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers.append(nn.Linear(d, width, bias=not norm))
            if norm == "ln":
                layers.append(nn.LayerNorm(width))
            elif norm == "bn":
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTIVATIONS[act]())
            d = width
        layers.append(nn.Linear(d, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class Conv1dNet(nn.Module):
    """Three conv + norm + ReLU blocks and a linear head; with ``norm="bn"`` the same module tree, parameter
    order and init as ``dynprobe.recipes.mnist1d.Conv1dNet`` (the demo's CNN)."""

    def __init__(self, width: int = 32, norm: str = "bn", act: str = "relu", classes: int = 10,
                 length: int = 40) -> None:
        super().__init__()

        def make_norm() -> nn.Module:
            return nn.BatchNorm1d(width) if norm == "bn" else nn.GroupNorm(1, width)  # GroupNorm(1) = LayerNorm

        def block(c_in: int, stride: int, kernel: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(c_in, width, kernel, stride=stride, padding=kernel // 2, bias=False),
                                 make_norm(), ACTIVATIONS[act]())

        self.features = nn.Sequential(block(1, 1, 5), block(width, 2, 3), block(width, 2, 3))
        self.head = nn.Linear(width * ((length + 3) // 4), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def build_model(s: Setting) -> nn.Module:
    """Seeds torch's global RNG with ``s.seed`` and builds the model (float32, train mode)."""
    torch.manual_seed(s.seed)
    if s.arch in ("mlp", "mlp_ln", "mlp_bn"):
        model = MLP(s.width, s.depth, norm=s.arch[4:], act=s.act)
    elif s.arch in ("cnn_bn", "cnn_ln"):
        model = Conv1dNet(s.width, norm=s.arch[-2:], act=s.act)
    else:
        raise ValueError(f"unknown arch {s.arch!r}")
    if s.init_scale != 1.0:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d)):
                    module.weight.mul_(s.init_scale)
    return model.train()


def build_optimizer(s: Setting, model: nn.Module) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=s.lr, eps=s.adam_eps, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}")


@lru_cache(maxsize=64)
def _epoch(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(s: Setting, step: int, n_train: int | None = None) -> torch.Tensor:
    """Indices into the training split of the batch used at ``step`` (0-based); depends only on (s, step)."""
    n = n_train if n_train is not None else load_data(s).x_train.shape[0]
    per_epoch = n // s.batch_size
    epoch, k = divmod(step, per_epoch)
    return _epoch(s.seed, epoch, n)[k * s.batch_size:(k + 1) * s.batch_size]


def batch(s: Setting, data: Data, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = batch_indices(s, step, data.x_train.shape[0])
    return data.x_train[index], data.y_train[index]


loss_fn = nn.CrossEntropyLoss()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    # 1a. MLP without normalisation, SGD + momentum. Chaotic until ~600 (seed 0), then every later ghost
    #     plateaus ~100× lower in L2 after amplifying ε ~1e5×.
    Setting(name="mlp_sgdm", arch="mlp", width=128, depth=2, optimizer="sgd", lr=0.1, momentum=0.9,
            batch_size=128, num_samples=4000, horizon=2000, spawns=(0, 25, 50, 100, 200, 400, 600, 800, 1000),
            label="MLP 40-128-128-10 ReLU, no normalisation, SGD momentum 0.9, constant lr 0.1"),
    # 1b. 1-D CNN with BatchNorm (the demo's Conv1dNet at width 16), SGD + momentum, 1,600 training examples.
    Setting(name="cnn_bn_sgdm", arch="cnn_bn", width=16, depth=3, optimizer="sgd", lr=0.1, momentum=0.9,
            batch_size=100, num_samples=2000, horizon=1200, spawns=(0, 25, 50, 100, 200, 400, 600),
            label="Conv1dNet(width=16) with BatchNorm, SGD momentum 0.9, constant lr 0.1, 1600 train examples"),
    # 1c. MLP without normalisation, Adam. Chaos lasts longer (to ~700 on seed 1, ~1100 on seed 0).
    Setting(name="mlp_adam", arch="mlp", width=128, depth=2, optimizer="adam", lr=1e-2, batch_size=128,
            num_samples=4000, horizon=2500, spawns=(0, 25, 50, 100, 200, 400, 600, 800, 1000, 1200),
            label="MLP 40-128-128-10 ReLU, no normalisation, Adam, constant lr 1e-2"),
    # 1d. The demo's original CNN (width 32) and optimizer at a constant lr 0.1 (no lr drops), 1,500 steps: it too
    #     has a transition (seed 0: between 400 and 600). The 600 spawn lies past H/2.
    Setting(name="cnn_bn_w32", arch="cnn_bn", width=32, depth=3, optimizer="sgd", lr=0.1, momentum=0.9,
            batch_size=128, num_samples=5000, horizon=750, spawns=(0, 50, 100, 200, 400, 600),
            label="demo's Conv1dNet(width=32), SGD momentum 0.9, constant lr 0.1, batch 128, 5000 samples, 1500 steps"),
    # 2. Stays chaotic: Conv1dNet(width=16) with BatchNorm, plain SGD at a large constant lr 1.0 on 3,200 training
    #    examples: every spawn up to 500 ends on the same level (L2 ~10) at H and 2H — no transition to locate.
    Setting(name="cnn_bn_chaotic", arch="cnn_bn", width=16, depth=3, optimizer="sgd", lr=1.0, momentum=0.0,
            batch_size=128, num_samples=4000, horizon=1000, spawns=(0, 25, 50, 100, 200, 400, 500),
            label="Conv1dNet(width=16) with BatchNorm, plain SGD, constant lr 1.0, batch 128, 3200 train examples"),
]}


def get(name: str) -> Setting:
    """A registered setting by name; ``NAME@seedK`` gives the same setting with seed K."""
    base, _, seed = name.partition("@seed")
    s = SETTINGS[base]
    return s.with_seed(int(seed)) if seed else s
