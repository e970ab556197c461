"""The eNTK of Hugging Face models (tiny, built from configs): no vmap where the forward has data-dependent
control flow, checked against a naive per-sample, per-output autograd loop in float64."""
from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import pytest
import torch

import dynprobe
from dynprobe import KernelConfig, schedule
from dynprobe.kernels.engine import NTKEngine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread (a second one only adds synchronization to kernels this small)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bert(num_labels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2(tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config).eval()


def padded_tokens(n: int, length: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded token batches: sample i keeps its first length − (i mod 3) tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=generator)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        keep = length - (i % 3)
        mask[i, keep:] = 0
        ids[i, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits_of(output):
    return output.logits


def naive_jacobian(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """J[i, k] = ∂f_k(x_i)/∂θ by one autograd.grad per (sample, output coordinate), in float64; (n, c, P)."""
    model = copy.deepcopy(model).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    n = next(iter(inputs.values())).shape[0]
    rows = []
    for i in range(n):
        flat = model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits[0].reshape(-1)
        jac = []
        for k in range(flat.shape[0]):
            grads = torch.autograd.grad(flat[k], params, retain_graph=True, allow_unused=True)
            jac.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                  for g, p in zip(grads, params)]))
        rows.append(torch.stack(jac))
    return torch.stack(rows)


def naive_kernel(jacobian: torch.Tensor, output_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k m_i(k) m_j(k) J_k(x_i)·J_k(x_j); the mask (n, T) covers the leading output dimension of (T, V) outputs."""
    if output_mask is not None:
        n, c = jacobian.shape[:2]
        weights = output_mask.double().repeat_interleave(c // output_mask.shape[1], dim=1)
        jacobian = jacobian * weights[:, :, None]
    return torch.einsum("ikp,jkp->ij", jacobian, jacobian)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_bert_with_padded_attention_mask_needs_no_vmap_and_matches_the_naive_loop():
    model = tiny_bert()
    inputs = padded_tokens(5, 7, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no vmap fallback warning, no note about a per-sample generic path
        engine = NTKEngine(model.double(), inputs, output_fn=logits_of)
    assert engine.plan.generic_names == []  # the (1, T) position-embedding lookup is structured (broadcast)
    assert engine.plan.broadcast
    expected = naive_kernel(naive_jacobian(model, inputs))
    assert relative(engine(), expected) < 1e-10
    model.float()
    assert relative(NTKEngine(model, inputs, output_fn=logits_of)(), expected) < 1e-4


def test_bert_per_layer_kernels_sum_to_the_total_and_match_each_layer_alone():
    model = tiny_bert().double()
    inputs = padded_tokens(4, 6, 40, seed=1)
    engine = NTKEngine(model, inputs, output_fn=logits_of)
    layers = engine.per_layer()
    total = engine()
    assert relative(sum(layers.values()), total) < 1e-12
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for layer in ("bert.embeddings.position_embeddings", "bert.encoder.layer.1.attention.self.query", "classifier"):
        alone = dynprobe.empirical_ntk(model, inputs, output_fn=logits_of,
                                       wrt=[n for n in names if n.rpartition(".")[0] == layer])
        assert relative(layers[layer], alone) < 1e-10


@pytest.mark.filterwarnings("ignore:dynprobe eNTK:UserWarning")  # the per-sample note, checked once below
@pytest.mark.parametrize("tied", [False, True])
def test_gpt2_token_logits_with_padding_mask_match_the_naive_loop(tied):
    model = tiny_gpt2(tied).double()
    inputs = padded_tokens(3, 5, 20, seed=2)
    mask = inputs["attention_mask"].bool()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = NTKEngine(model, inputs, output_fn=logits_of, output_mask=mask)
    generic = engine.plan.generic_names
    if tied:  # the tied embedding/LM-head matrix has no structured rule; vmap cannot run GPT-2's mask checks
        assert generic == ["transformer.wte.weight"] and engine.plan.generic_strategy != "vmap"
        assert any("one probe sample at a time" in str(w.message) for w in caught)
    else:
        assert generic == [] and engine.plan.broadcast  # Conv1D projections, wpe on (1, T) positions
    jacobian = naive_jacobian(model, inputs)
    expected = naive_kernel(jacobian, mask)
    assert relative(engine(), expected) < 1e-10
    unmasked = naive_kernel(jacobian)
    assert relative(NTKEngine(model, inputs, output_fn=logits_of)(), unmasked) < 1e-10
    assert relative(unmasked, expected) > 1e-3  # the mask matters


def test_probe_with_tokenizer_style_dict_inputs_records_kernels(tmp_path):
    model = tiny_bert()
    initial = copy.deepcopy(model)
    eval_inputs = padded_tokens(24, 6, 40, seed=3)
    labels = torch.arange(24) % 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = dynprobe.Probe(model, optimizer, eval_data=(eval_inputs, labels), out=tmp_path / "run",
                           schedule=schedule.at([0, 2]), kernel=KernelConfig(n=6, per_layer=True), errors="raise")
    model.train()
    for step in range(2):
        batch = padded_tokens(8, 6, 40, seed=10 + step)
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels[:8])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    probe.close()
    run = dynprobe.load_run(tmp_path / "run")
    assert list(run.kernel_steps) == [0, 2]
    chosen = torch.as_tensor(run.eval_indices[np.load(run.path / "kernel_probe_indices.npy")])
    probe_inputs = {k: v[chosen] for k, v in eval_inputs.items()}
    expected = naive_kernel(naive_jacobian(initial, probe_inputs)).numpy()
    np.testing.assert_allclose(run.kernel(step=0), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    layers = run.kernel_layers(step=2)
    assert layers.shape == (len(run.layers), 6, 6)
    np.testing.assert_allclose(layers.sum(axis=0), run.kernel(step=2), rtol=1e-12, atol=1e-12)


def test_probe_on_a_language_model_leaves_out_unscored_token_positions(tmp_path):
    model = tiny_gpt2(tied=False)
    initial = copy.deepcopy(model)
    eval_inputs = padded_tokens(12, 5, 20, seed=4)
    labels = eval_inputs["input_ids"].masked_fill(eval_inputs["attention_mask"] == 0, -100)  # (N, T), pads ignored
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = dynprobe.Probe(model, optimizer, eval_data=(eval_inputs, labels), out=tmp_path / "lm",
                           schedule=schedule.at([0]), kernel=KernelConfig(n=4, mode="trace"), errors="raise")
    probe.close()
    run = dynprobe.load_run(tmp_path / "lm")
    chosen = torch.as_tensor(run.eval_indices[np.load(run.path / "kernel_probe_indices.npy")])
    probe_inputs = {k: v[chosen] for k, v in eval_inputs.items()}
    scored = labels[chosen] != -100  # aligned labels: the logits at t are scored at t
    expected = naive_kernel(naive_jacobian(initial, probe_inputs), scored).numpy()
    np.testing.assert_allclose(run.kernel(step=0), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert "tokens" in run.conventions["kernel"]
