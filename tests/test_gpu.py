"""The GPU path on CUDA: bf16 experts with a float32 router, each grouped-product strategy, bf16
autocast over float32 weights, and the model's training step, training job and greedy generation,
each against a float64 (or float32) reference computed on the CPU.

Skipped without CUDA: CI has no GPU. `MOEKIT_TEST_DEVICE=cpu` runs the same checks on the CPU
(how they are checked on a machine without a GPU), `MOEKIT_TEST_DEVICE=cuda:1` picks another GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.model import ModelConfig, MoETransformer
from moekit.moe import experts as experts_module
from moekit.moe import grouped
from moekit.train import Trainer, load_config
from tests.adapt_helpers import stdlib_corpus, tiny_run_overrides
from tests.moe_reference import reference_moe

DEVICE = torch.device(os.environ.get("MOEKIT_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)

# D, F, E, k: rows of 64 / 96 bf16 values are 16-byte aligned, as torch._grouped_mm requires
D, F, E, K, T = 64, 96, 8, 2, 96


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in float32 products on the GPU: float32 results are then comparable to the CPU's."""
    if DEVICE.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _forward_backward(moe, x, probe):
    """Output and the gradients of (output * probe).sum() w.r.t. x and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    out = moe(x)
    (out.output.float() * probe.to(out.output.device)).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in moe.named_parameters() if p.grad is not None})
    return out.output, grads


def _reference_forward_backward(reference, x, probe):
    """The naive float64 loop's output and the gradients of (output * probe).sum() w.r.t. x and
    every parameter of `reference` (a float64 CPU layer)."""
    x = x.double().requires_grad_(True)
    ref, _ = reference_moe(reference, x)
    (ref * probe.double()).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in reference.named_parameters() if p.grad is not None})
    return ref, grads


def _layer_pair(seed: int, **kw):
    """A float32 CPU layer and its bf16-expert, float32-router copy on DEVICE, and the float64 CPU
    reference layer holding the bf16-rounded weights the device copy computes with."""
    torch.manual_seed(seed)
    cpu = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, **kw))
    device = copy.deepcopy(cpu).to(DEVICE, torch.bfloat16)
    device.router.float()  # selective precision: the router's weight and math stay float32
    reference = copy.deepcopy(device).cpu().double()
    return device, reference


@pytest.mark.parametrize("strategy", ["auto", "loop", "grouped_mm"])
def test_bf16_layer_matches_float64_reference(strategy, monkeypatch):
    """Outputs and all gradients of the bf16 layer within bf16's error of the naive float64 loop.
    On CUDA "auto" and "grouped_mm" take the device path (experts_on_device: torch._grouped_mm
    over device-side group ends), "loop" the host-planned row blocks; no silent fallback."""
    device, reference = _layer_pair(0)
    device.experts.strategy = strategy
    calls, device_path = [], []
    real, real_path = torch._grouped_mm, experts_module.experts_on_device

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    def counted_path(*args, **kwargs):
        out = real_path(*args, **kwargs)
        device_path.append(out is not None)
        return out

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    monkeypatch.setattr(experts_module, "experts_on_device", counted_path)
    monkeypatch.setattr(grouped, "_GROUPED_MM_UNSUPPORTED", set())
    x = torch.randn(T, D).to(torch.bfloat16)
    probe = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    out, grads = _forward_backward(device, x.to(DEVICE), probe)
    assert out.dtype == torch.bfloat16 and out.device.type == DEVICE.type
    ref, ref_grads = _reference_forward_backward(reference, x, probe)
    assert _relative_error(out, ref) < 1e-2
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # bf16 rounding of activations and gradients: about 2^-8 relative each
        assert _relative_error(grads[name], ref_grads[name]) < 2e-2, name
    if strategy == "grouped_mm":
        assert calls, "the grouped_mm strategy never called torch._grouped_mm"
    if DEVICE.type == "cuda":
        assert device_path == ([] if strategy == "loop" else [True])
    assert not grouped._GROUPED_MM_UNSUPPORTED


def test_bf16_layer_decode_step_matches_float64_reference():
    """One token (the decode step's path, no native kernel on the GPU) and a few tokens."""
    device, reference = _layer_pair(1)
    for tokens in (1, 3):
        x = torch.randn(tokens, D).to(torch.bfloat16)
        with torch.no_grad():
            out = device(x.to(DEVICE)).output
            ref, _ = reference_moe(reference, x.double())
        assert _relative_error(out, ref) < 1e-2


def test_autocast_layer_over_float32_weights_matches_float64_reference():
    """Training's mixed precision: float32 weights, bf16 autocast. The router stays float32 and
    every gradient reaches the float32 weights within bf16's error of the float64 reference."""
    torch.manual_seed(2)
    layer = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K)).to(DEVICE)
    reference = copy.deepcopy(layer).cpu().double()
    x = torch.randn(T, D)
    probe = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16):
        routing = layer.router(x.to(DEVICE))
        out, grads = _forward_backward(layer, x.to(DEVICE), probe)
    assert routing.logits_TE.dtype == torch.float32
    ref, ref_grads = _reference_forward_backward(reference, x, probe)
    assert _relative_error(out, ref) < 2e-2
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        assert _relative_error(g, ref_grads[name]) < 4e-2, name


def _tiny_model(seed: int) -> MoETransformer:
    torch.manual_seed(seed)
    moe = MoEConfig(dim=64, hidden_dim=96, num_experts=8, top_k=2, causal=True)
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                      max_seq_len=64, moe=moe)  # fmt: skip
    return MoETransformer(cfg)


def test_model_float32_training_step_matches_the_cpu():
    """The same float32 model on DEVICE and on the CPU: loss and every gradient agree."""
    cpu = _tiny_model(4)
    device = copy.deepcopy(cpu).to(DEVICE)
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(5))
    results = []
    for model in (cpu, device):
        dev = next(model.parameters()).device
        out = model(ids[:, :-1].to(dev), targets=ids[:, 1:].to(dev))
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_cpu, grads_cpu), (loss_dev, grads_dev) = results
    torch.testing.assert_close(loss_dev.cpu(), loss_cpu, atol=1e-5, rtol=1e-5)
    assert grads_dev.keys() == grads_cpu.keys()
    for name in grads_cpu:
        assert _relative_error(grads_dev[name], grads_cpu[name]) < 1e-4, name


def test_model_greedy_generation_matches_the_cpu():
    """Greedy decoding through the KV cache on DEVICE gives the CPU's tokens (float32)."""
    cpu = _tiny_model(6).eval()
    device = copy.deepcopy(cpu).to(DEVICE)
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = cpu.generate(prompt, max_new_tokens=12, temperature=0.0)
        got = device.generate(prompt.to(DEVICE), max_new_tokens=12, temperature=0.0)
    assert torch.equal(got.cpu(), want)


def test_training_job_on_the_device_with_bf16_autocast(tmp_path):
    """`moekit train`'s job on DEVICE (train.dtype=auto: bf16 autocast on a GPU): loss falls."""
    corpus = stdlib_corpus(tmp_path / "corpus", 45, 2000, 10**9, val_every=9)
    cfg = load_config(None, tiny_run_overrides(corpus, tmp_path, **{"train.device": f'"{DEVICE}"'}))
    trainer = Trainer(cfg)
    assert trainer.device.type == DEVICE.type
    result = trainer.fit()
    losses = result.train_losses
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
