"""Small everyday models and generated data for ``bench_everyday.py`` (no downloads).

Every model here is what a user would write (biases left at PyTorch's defaults, fused or separate attention
projections as the usual code bases have them); data come from seeded generators, so two builds are identical.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- data
def teacher_images(n: int, seed: int, channels: int = 3, size: int = 16, classes: int = 10):
    """Gaussian images labelled by a fixed random linear teacher (argmax of W·x)."""
    g = generator(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    w = torch.randn(classes, channels * size * size, generator=generator(12345))
    return x, (x.flatten(1) @ w.T).argmax(1)


def teacher_vectors(n: int, seed: int, features: int = 64, classes: int = 10):
    g = generator(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(classes, features, generator=generator(54321))
    return x, (torch.tanh(x @ w.T) + 0.1 * x[:, :classes]).argmax(1)


def blur_pairs(n: int, seed: int, size: int = 16):
    """Per-pixel regression: noisy image → its 3×3 box blur."""
    g = generator(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x, y


def token_sequences(n: int, seed: int, vocab: int = 64, length: int = 16):
    """Arithmetic sequences mod vocab (a per-sequence stride), variable length: inputs padded with token 0,
    labels = the next token, -100 at the padded positions."""
    g = generator(seed)
    start = torch.randint(1, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    seq = 1 + (start + stride * torch.arange(length + 1)) % (vocab - 1)
    x, y = seq[:, :-1].clone(), seq[:, 1:].clone()
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    pad = torch.arange(length)[None, :] >= lengths[:, None]
    x[pad] = 0
    y[pad] = -100
    return x, y


def marker_sentences(n: int, seed: int, vocab: int = 64, length: int = 16, classes: int = 3):
    """BERT inputs with padded attention masks: label = the most frequent marker token (1..classes)."""
    g = generator(seed)
    ids = torch.randint(4, vocab, (n, length), generator=g)
    ids[:, :6] = torch.randint(1, classes + 1, (n, 6), generator=g)
    ids = torch.stack([row[torch.randperm(length, generator=g)] for row in ids])
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad token 0
    counts = torch.stack([(ids == k).sum(1) for k in range(1, classes + 1)], dim=1)
    return {"input_ids": ids, "attention_mask": mask}, counts.argmax(1)


# ---------------------------------------------------------------------------------------------------- models
class ViT(nn.Module):
    """Patch-embedding conv, [CLS] token, learned positions, pre-LN blocks with nn.MultiheadAttention."""

    def __init__(self, size: int = 16, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4,
                 classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.ModuleList(_ViTBlock(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only LM: separate q/k/v projections, causal SDPA, tied token embedding / LM head."""

    def __init__(self, vocab: int = 64, length: int = 16, dim: int = 64, depth: int = 2, heads: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_GPTBlock(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class _GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class UNet(nn.Module):
    """Two-level U-Net (conv + BatchNorm, biases at their default) for per-pixel regression."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.enc1 = _conv_block(1, width)
        self.enc2 = _conv_block(width, 2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _conv_block(2 * width, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        return self.out(self.dec1(torch.cat([self.up(e2), e1], 1)))


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10, width: int = 32, batchnorm: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), norm(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), norm(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x).flatten(1)))


class MLP(nn.Module):
    def __init__(self, features: int = 64, hidden: int = 256, classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def warmup_cosine(warmup: int, total: int):
    """The usual LambdaLR factor: linear warmup, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
