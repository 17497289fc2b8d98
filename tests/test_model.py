"""Tests for moekit.model: attention and rotary against naive references, KV-cache decoding, the
MoE-layer rule, parameter/FLOP counts, loss bookkeeping, short training runs, config handling.

Run: python -m pytest tests/test_model.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from moekit.model import (
    Attention,
    ModelConfig,
    MoEEncoderDecoder,
    MoETransformer,
    Rotary,
    apply_rope,
    build_attention_mask,
    count_params,
    dense_baseline,
    flops_per_token,
    rope_tables,
)
from moekit.model.layers import linear
from moekit.moe import MoE, MoEConfig, native

V, D = 61, 32


def moe_cfg(**kw) -> MoEConfig:
    base = dict(dim=D, hidden_dim=24, num_experts=4, top_k=2)
    return MoEConfig(**{**base, **kw})


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, dim=D, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=48, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


# ---------------------------------------------------------------------- naive references


def naive_rope(x_BHSK: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotation as complex multiplication: z_j = x_j + i x_{j+K/2}, z_j * exp(i * pos * theta^(-2j/K))."""
    K = x_BHSK.shape[-1]
    x = x_BHSK.double()
    z = torch.complex(x[..., : K // 2], x[..., K // 2 :])
    freqs = theta ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
    angle = positions.double()[:, None] * freqs[None, :]  # [S, K/2]
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def naive_attention(q_BHSK, k_BGTK, v_BGTK, allowed_BST) -> torch.Tensor:
    """Explicit loops-free float64 attention: repeat each kv head for its H/G query heads."""
    H, G = q_BHSK.shape[1], k_BGTK.shape[1]
    k = k_BGTK.double().repeat_interleave(H // G, dim=1)
    v = v_BGTK.double().repeat_interleave(H // G, dim=1)
    scores = q_BHSK.double() @ k.transpose(-1, -2) / math.sqrt(q_BHSK.shape[-1])  # [B, H, S, T]
    scores = scores.masked_fill(~allowed_BST[:, None], float("-inf"))
    return scores.softmax(-1) @ v  # [B, H, S, K]


def reference_attention(attn: Attention, x, positions, allowed_BST, theta, context=None):
    """The whole Attention module recomputed in float64 from its weights."""
    B, S, _ = x.shape
    kv = x if context is None else context
    T = kv.shape[1]
    H, G, K = attn.n_heads, attn.n_kv_heads, attn.head_dim

    def lin(layer, inp):
        out = inp.double() @ layer.weight.double().T
        return out if layer.bias is None else out + layer.bias.double()

    q = lin(attn.wq, x).view(B, S, H, K).transpose(1, 2)
    k = lin(attn.wk, kv).view(B, T, G, K).transpose(1, 2)
    v = lin(attn.wv, kv).view(B, T, G, K).transpose(1, 2)
    if attn.q_norm is not None:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + attn.q_norm.eps) * attn.q_norm.weight.double()
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + attn.k_norm.eps) * attn.k_norm.weight.double()
    if context is None:
        q, k = naive_rope(q, positions, theta), naive_rope(k, positions, theta)
    out = naive_attention(q, k, v, allowed_BST).transpose(1, 2).reshape(B, S, H * K)
    return out @ attn.wo.weight.double().T


# ---------------------------------------------------------------------- rotary and attention


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    K, S, theta = 16, 11, 500.0
    cos, sin = rope_tables(K, 40, theta)
    positions = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21, 34, 38, 39])
    x = torch.randn(2, 3, S, K)
    got = apply_rope(x, cos[positions], sin[positions])
    torch.testing.assert_close(got.double(), naive_rope(x, positions, theta), atol=1e-5, rtol=1e-5)
    # rotation keeps norms, and q.k depends only on the position difference
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    q, k = torch.randn(K), torch.randn(K)

    def dot(pq, pk):
        rq = apply_rope(q.view(1, 1, 1, K), cos[pq : pq + 1], sin[pq : pq + 1])
        rk = apply_rope(k.view(1, 1, 1, K), cos[pk : pk + 1], sin[pk : pk + 1])
        return (rq * rk).sum()

    torch.testing.assert_close(dot(7, 3), dot(30, 26), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_one_row_split_over_threads(bias, monkeypatch):
    """`linear` sends one row through a large weight as two halves (one bmm): the same numbers as
    float64 math, and exactly nn.Linear's own call whenever it does not apply."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 4096, bias=bias)  # 1 MiB of weight: the split applies
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or bmm(*a, **k))
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        got = linear(lin, x)
        expected = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
        assert calls and got.shape == (1, 1, 4096)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
        calls.clear()
        two_rows = torch.randn(2, 64)
        assert torch.equal(linear(lin, two_rows), lin(two_rows)) and not calls
    assert torch.equal(linear(lin, x), lin(x)) and not calls  # autograd: the module itself


@pytest.mark.skipif(native.library() is None, reason="needs the native kernels")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("needs_x", [False, True])
def test_linear_many_rows_by_moekit_gemm_matches_float64_both_ways(bias, needs_x, monkeypatch):
    """Many rows through `linear` take moekit's GEMM (native.applies_linear) with its own backward:
    output and the gradients of x, weight and bias equal float64 autograd of x W^T + b, with and
    without autograd, for a row count that splits unevenly over the threads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    torch.manual_seed(0)
    lin = torch.nn.Linear(70, 130, bias=bias)
    x = torch.randn(3, 31, 70, requires_grad=needs_x)
    assert native.applies_linear(x.detach().reshape(-1, 70), lin.weight, lin.bias)
    calls = []
    gemm = native.gemm
    monkeypatch.setattr(native, "gemm", lambda *a, **k: calls.append(1) or gemm(*a, **k))
    out = linear(lin, x)
    grad = torch.randn(3, 31, 130)
    out.backward(grad)
    assert len(calls) == (3 if needs_x else 2)  # the forward, and the backward's products
    x64 = x.detach().double().requires_grad_(needs_x)
    w64 = lin.weight.detach().double().requires_grad_(True)
    b64 = lin.bias.detach().double().requires_grad_(True) if bias else None
    expected = torch.nn.functional.linear(x64, w64, b64)
    expected.backward(grad.double())
    torch.testing.assert_close(out.detach().double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.weight.grad.double(), w64.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(lin.bias.grad.double(), b64.grad, atol=1e-4, rtol=1e-5)
    if needs_x:
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear(lin, x).double(), expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(3, 5, 24), (2, 400, 37)])  # the second: rows split over threads
@pytest.mark.parametrize("path", ["native", "torch"])
def test_rms_norm_training_path_matches_float64_and_inference_bit_for_bit(monkeypatch, needs, shape, path):
    """RMSNorm with autograd (hand-written backward; in C on CPU float32, moe/csrc/norms.c, or as
    torch ops): the output equals the no-grad path bit for bit, and the gradients of x and of the
    weight equal float64 autograd of x / rms(x) * w."""
    from moekit.model.layers import RMSNorm
    from moekit.moe import native

    if path == "torch":
        monkeypatch.setattr(native, "ENABLED", False)
    elif native.library() is None:
        pytest.skip("no native kernel here")
    calls = []
    real = native.rms_norm_backward
    monkeypatch.setattr(native, "rms_norm_backward", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    dim = shape[-1]
    norm = RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    norm.weight.requires_grad_(needs[1])
    x = torch.randn(*shape, requires_grad=needs[0])
    g = torch.randn(*shape)
    y = norm(x)
    with torch.no_grad():
        assert torch.equal(y, norm(x))
    y.backward(g)
    x64 = x.detach().double().requires_grad_(True)
    w64 = norm.weight.detach().double().requires_grad_(True)
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    ref.backward(g.double())
    assert torch.allclose(y.double(), ref, atol=1e-6)
    if needs[0]:
        assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)
    if needs[1]:
        assert torch.allclose(norm.weight.grad.double(), w64.grad, atol=1e-4)
    else:
        assert norm.weight.grad is None
    assert len(calls) == (1 if path == "native" else 0)


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (4, 8, 64, 32)])  # the second splits over threads
def test_rope_native_kernel_equals_torch_ops_both_ways(monkeypatch, shape):
    """apply_rope in C (CPU float32) gives the torch ops' output bit for bit, reading the heads'
    strided view ([B, S, H, K] transposed), and its backward equals float64 autograd."""
    from moekit.model.layers import apply_rope
    from moekit.moe import native

    if native.library() is None:
        pytest.skip("no native kernel here")
    B, H, S, K = shape
    rotary = Rotary(K, 80, 10000.0)
    cos, sin = rotary(torch.arange(3, 3 + S))
    base = torch.randn(B, S, H, K)
    x = base.transpose(1, 2).requires_grad_(True)  # strided, as _split_heads gives
    assert native.applies_rope(x, cos, sin)
    g = torch.randn(B, H, S, K)
    y = apply_rope(x, cos, sin)
    y.backward(g)
    monkeypatch.setattr(native, "ENABLED", False)
    x_t = base.transpose(1, 2).requires_grad_(True)
    y_t = apply_rope(x_t, cos, sin)
    y_t.backward(g)
    assert torch.equal(y, y_t)
    x64 = base.double().transpose(1, 2).requires_grad_(True)
    y64 = x64 * cos.double() + x64.roll(K // 2, dims=-1) * sin.double()
    y64.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_t.grad, rtol=1e-6, atol=1e-7)


def test_rope_full_tables_give_the_half_split_rotation_bit_for_bit():
    """Rotary's full-width tables (one roll instead of chunk/cat) must equal the textbook
    half-split formula exactly, so that switching between them changes no logits."""
    torch.manual_seed(0)
    K, theta = 16, 500.0
    rotary = Rotary(K, 40, theta)
    positions = torch.tensor([0, 3, 17, 39])
    x = torch.randn(2, 3, len(positions), K)
    cos, sin = rotary.cos[positions], rotary.sin[positions]  # half tables [S, K/2]
    x1, x2 = x[..., : K // 2], x[..., K // 2 :]
    expected = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    assert torch.equal(apply_rope(x, *rotary(positions)), expected)
    assert torch.equal(apply_rope(x, cos, sin), expected)  # half tables are still accepted


@pytest.mark.parametrize("qk_norm,qkv_bias", [(False, False), (True, True)])
@pytest.mark.parametrize("case", ["causal", "causal_padded", "bidirectional_padded"])
def test_attention_matches_naive_float64(case, qk_norm, qkv_bias):
    torch.manual_seed(1)
    cfg = model_cfg(n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=qk_norm, qkv_bias=qkv_bias)
    attn = Attention(cfg)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    B, S = 3, 9
    x = torch.randn(B, S, D)
    causal = case.startswith("causal")
    key_mask = None
    allowed = torch.ones(B, S, S, dtype=torch.bool)
    if causal:
        allowed &= torch.tril(torch.ones(S, S, dtype=torch.bool))
    if case.endswith("padded"):
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[0, 6:] = False  # right padding
        key_mask[1, :3] = False  # left padding
        allowed &= key_mask[:, None, :]
    mask = build_attention_mask(S, S, causal=causal, key_mask_BT=key_mask)
    positions = torch.arange(S)
    got = attn(x, mask, rope_tables(8, S, cfg.rope_theta)).double()
    want = reference_attention(attn, x, positions, allowed, cfg.rope_theta)
    real = torch.ones(B, S, dtype=torch.bool) if key_mask is None else key_mask
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()  # padded queries stay finite (they may always see themselves)


def test_cross_attention_matches_naive_float64():
    torch.manual_seed(2)
    attn = Attention(model_cfg(n_heads=4, n_kv_heads=1))
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    B, S, T = 2, 5, 7
    x, ctx = torch.randn(B, S, D), torch.randn(B, T, D)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, 4:] = False
    mask = build_attention_mask(S, T, causal=False, key_mask_BT=key_mask, self_attention=False)
    got = attn(x, mask, context_BTD=ctx).double()
    allowed = key_mask[:, None, :].expand(B, S, T)
    want = reference_attention(attn, x, None, allowed, 0.0, context=ctx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- MoE layer rule


@pytest.mark.parametrize(
    "n_layers,moe_every,n_dense_first,expected",
    [
        (6, 1, 0, [0, 1, 2, 3, 4, 5]),  # Mixtral
        (6, 2, 0, [1, 3, 5]),  # GShard / Switch
        (6, 3, 0, [2, 5]),
        (6, 1, 2, [2, 3, 4, 5]),  # DeepSeek: first 2 dense
        (7, 2, 1, [2, 4, 6]),  # dense prefix of 1, then every other
        (4, 1, 4, None),  # no MoE layer left: refused
    ],
)
def test_moe_layer_rule(n_layers, moe_every, n_dense_first, expected):
    kw = dict(n_layers=n_layers, moe_every=moe_every, n_dense_first=n_dense_first, moe=moe_cfg())
    if expected is None:
        with pytest.raises(ValueError, match="moe_every"):
            model_cfg(**kw)
        return
    cfg = model_cfg(**kw)
    assert cfg.moe_layer_ids() == expected
    model = MoETransformer(cfg)
    assert [i for i, b in enumerate(model.layers) if isinstance(b.ffn, MoE)] == expected
    assert all(b.ffn.config.causal for b in model.layers if isinstance(b.ffn, MoE))
    encdec = MoEEncoderDecoder(dataclasses.replace(cfg, n_encoder_layers=n_layers))
    for stack, causal in ((encdec.encoder, False), (encdec.decoder, True)):
        assert [i for i, b in enumerate(stack) if isinstance(b.ffn, MoE)] == expected
        assert all(b.ffn.config.causal == causal for b in stack if isinstance(b.ffn, MoE))


def test_dense_config_has_no_moe_layers():
    model = MoETransformer(model_cfg())
    assert model.config.moe_layer_ids() == [] and model.moe_layers == []
    out = model(torch.randint(0, V, (2, 5)), targets=torch.randint(0, V, (2, 5)))
    assert out.aux_loss.item() == 0 and out.z_loss.item() == 0 and out.router_stats == []


def test_expert_choice_refused_in_decoder_allowed_in_encoder():
    cfg = model_cfg(n_layers=2, moe=moe_cfg(router="expert_choice"), moe_every=2)
    with pytest.raises(ValueError, match="expert_choice"):
        MoETransformer(cfg)
    encdec_cfg = dataclasses.replace(cfg, n_layers=1, n_encoder_layers=2)  # decoder has no MoE layer
    out = MoEEncoderDecoder(encdec_cfg)(torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 4)))
    assert len(out.encoder_router_stats) == 1 and out.decoder_router_stats == []


# ---------------------------------------------------------------------- KV cache and generation


def decode_in_steps(model, ids, prefill, attention_mask=None):
    cache = model.new_cache(ids.shape[0])
    pm = None if attention_mask is None else attention_mask[:, :prefill]
    logits = [model(ids[:, :prefill], attention_mask=pm, cache=cache).logits]
    for t in range(prefill, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.pos == ids.shape[1]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("moe", [None, "topk", "sigmoid_bias"])
def test_kv_cache_decode_equals_full_forward(moe):
    torch.manual_seed(3)
    extra = {} if moe is None else dict(moe=moe_cfg(router=moe, num_shared_experts=1), moe_every=2)
    model = MoETransformer(model_cfg(qk_norm=True, **extra)).eval()
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        stepped = decode_in_steps(model, ids, prefill=5)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_with_left_padding_equals_full_forward():
    torch.manual_seed(4)
    model = MoETransformer(model_cfg(moe=moe_cfg(), moe_every=2)).eval()
    ids = torch.randint(0, V, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        stepped = decode_in_steps(model, ids, prefill=6, attention_mask=mask)
        # the left-padded row equals the same tokens without padding (rotary is relative)
        alone = model(ids[1:, 3:]).logits
    torch.testing.assert_close(stepped[mask], full[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[1, 3:], alone[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_raises():
    model = MoETransformer(model_cfg(n_layers=1)).eval()
    cache = model.new_cache(1, max_seq_len=4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KVCache holds 4"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


@pytest.mark.parametrize(
    "kw",
    [
        dict(moe=moe_cfg(), tie_embeddings=True),
        dict(
            moe=moe_cfg(router="switch", top_k=1, num_shared_experts=1, expert_bias=True),
            moe_every=2,
            qkv_bias=True,
        ),
        dict(
            moe=moe_cfg(
                router="sigmoid_bias", num_experts=8, n_group=2, topk_group=1, routed_scaling_factor=2.0
            )
        ),
        dict(
            moe=moe_cfg(router="topk_then_softmax", top_k=3, activation="gpt_oss", expert_bias=True),
            attn_out_bias=True,
        ),
        dict(moe=moe_cfg(capacity_factor=1.0, eval_capacity_factor=1.0)),  # MoE falls back to its forward
        dict(moe=None, n_kv_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ],
    ids=[
        "topk-tied",
        "switch-shared-dense-qkvbias",
        "sigmoid-groups",
        "topk3-gptoss-outbias",
        "capacity",
        "dense",
    ],
)
def test_decode_one_equals_forward_bit_for_bit(kw):
    """The lean batch-1 decode step must give exactly the logits and cache of `forward` with the
    cache, so generate is the same with and without it."""
    torch.manual_seed(7)
    model = MoETransformer(model_cfg(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases and router weights away from their zero / small init
            p.add_(torch.randn_like(p) * 0.05)
    assert model.decode_ready()
    prompt = torch.randint(0, V, (1, 5))
    generic, lean = model.new_cache(1, 16), model.new_cache(1, 16)
    with torch.inference_mode():
        logits = model(prompt, cache=generic).logits
        model(prompt, cache=lean)
        for _ in range(8):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, cache=generic).logits
            assert torch.equal(model.decode_one(token, lean), logits)
        assert lean.pos == generic.pos == 13
        for a, b in zip(generic.k + generic.v, lean.k + lean.v):
            assert torch.equal(a, b)


def test_decode_one_refuses_what_it_does_not_cover():
    model = MoETransformer(model_cfg(moe=moe_cfg())).eval()
    assert not model.train().decode_ready()  # training mode: forward
    model.eval()
    for cfg in (model_cfg(qk_norm=True), model_cfg(attention_sinks=True), model_cfg(sliding_window=4)):
        assert not MoETransformer(cfg).eval().decode_ready()
    cache = model.new_cache(2, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="one token of one unpadded sequence"):
        model.decode_one(torch.zeros(2, 1, dtype=torch.long), cache)


def test_generated_tokens_train_like_any_tensor():
    """generate runs under inference mode but returns a normal tensor: the tokens can be the next
    training batch (an inference tensor would raise once autograd saves it)."""
    torch.manual_seed(6)
    model = MoETransformer(model_cfg(moe=moe_cfg()))
    out = model.eval().generate(torch.randint(0, V, (2, 3)), max_new_tokens=4, temperature=0.0)
    assert not out.is_inference() and out.shape == (2, 7)
    model.train()
    model(out[:, :-1], targets=out[:, 1:]).loss.backward()
    assert model.tok_embeddings.weight.grad is not None


def test_generate_greedy_matches_uncached_argmax_and_stops_at_eos():
    torch.manual_seed(5)
    model = MoETransformer(model_cfg(moe=moe_cfg(), moe_every=2)).eval()
    prompt = torch.randint(0, V, (2, 4))
    out = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    # sampling with top_k=1 is greedy; a seeded generator makes sampling reproducible
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_k=1), ids)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    s1 = model.generate(prompt, 6, temperature=1.0, top_p=0.9, generator=g1)
    assert torch.equal(s1, model.generate(prompt, 6, temperature=1.0, top_p=0.9, generator=g2))
    # a left-padded prompt generates what the same prompt does alone (the cache keeps its padding)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt[1:, 2:]], dim=1)
    pad_mask = torch.tensor([[False, False, True, True]])
    both = model.generate(
        torch.cat([prompt[:1], padded]), 6, 0.0, attention_mask=torch.cat([pad_mask | True, pad_mask])
    )
    alone = model.generate(prompt[1:, 2:], 6, temperature=0.0)
    assert torch.equal(both[1, 4:], alone[0, 2:]) and torch.equal(both[0], ids[0])
    # eos: the row that emits it keeps emitting it; decoding stops once all rows have
    eos = int(ids[0, 5])
    stopped = model.generate(prompt, 6, temperature=0.0, eos_id=eos)
    first = (stopped[0, 4:] == eos).nonzero()[0, 0] + 4
    assert (stopped[0, first:] == eos).all()


# ---------------------------------------------------------------------- counts


def named_param_count(model: torch.nn.Module) -> tuple[int, int, int]:
    """(total, active, embedding) straight from the parameter names: routed experts (`.experts.`)
    are used top_k / E of the time, everything else always."""
    total = active = embedding = 0
    for name, p in model.named_parameters():  # tied weights appear once
        total += p.numel()
        if ".ffn.experts." in name:
            moe = model.get_submodule(name.split(".ffn.")[0] + ".ffn").config
            assert p.numel() % moe.num_experts == 0
            active += p.numel() // moe.num_experts * moe.top_k
        else:
            active += p.numel()
        if name.startswith(("tok_embeddings.", "output.")):
            embedding += p.numel()
    return total, active, embedding


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(moe=moe_cfg(), moe_every=2),
        dict(moe=moe_cfg(num_shared_experts=2, router="noisy_topk", expert_bias=True), tie_embeddings=True),
        dict(
            moe=moe_cfg(activation="gelu", top_k=1, shared_hidden_dim=8, num_shared_experts=1),
            n_dense_first=1,
        ),
    ],
)
def test_param_counts_match_named_parameters(kw):
    cfg = model_cfg(qkv_bias=True, **kw)
    model = MoETransformer(cfg)
    counted = count_params(model)
    assert (counted.total, counted.active, counted.embedding) == named_param_count(model)
    assert count_params(cfg) == counted  # the config path (meta-device build) agrees
    encdec = MoEEncoderDecoder(dataclasses.replace(cfg, n_encoder_layers=3))
    enc = count_params(encdec)
    assert (enc.total, enc.active, enc.embedding) == named_param_count(encdec)


def counted_flops_per_token(model: MoETransformer, B: int, S: int) -> float:
    """FLOPs torch counts for one forward, plus the attention scores if it does not see SDPA."""
    aten = torch.ops.aten
    # torch's counter has no formula for the two products grouped.py uses on small groups
    mv_flops = lambda mat, vec, *a, out_shape=None, **k: 2 * mat[0] * mat[1]  # noqa: E731
    grouped_flops = lambda a, b, *r, out_shape=None, **k: 2 * math.prod(out_shape) * b[-2]  # noqa: E731
    mapping = {aten.mv: mv_flops, aten._grouped_mm: grouped_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(torch.randint(0, V, (B, S)))
    flops = counter.get_total_flops()
    ops = [str(op) for op in counter.get_flop_counts().get("Global", {})]
    if not any("attention" in op for op in ops):
        cfg = model.config
        flops += cfg.n_layers * B * 2 * 2 * cfg.n_heads * cfg.head_dim * S * S
    return flops / (B * S)


@pytest.mark.parametrize("kw", [dict(), dict(moe=moe_cfg(num_shared_experts=1), moe_every=2)])
def test_flops_per_token_matches_torch_flop_counter(kw, monkeypatch):
    from moekit.moe import native

    monkeypatch.setattr(native, "ENABLED", False)  # the native kernel's products are not torch ops
    cfg = model_cfg(**kw)
    assert counted_flops_per_token(MoETransformer(cfg).eval(), B=2, S=10) == flops_per_token(cfg, 10).total


@pytest.mark.parametrize(
    "moe,kw,expected_hidden",
    [
        (moe_cfg(), {}, 2 * 24),  # GLU experts in every layer: top_k * hidden_dim
        (moe_cfg(num_shared_experts=1, shared_hidden_dim=16), {}, 2 * 24 + 16),
        (moe_cfg(top_k=1), dict(moe_every=2, ffn_hidden_dim=24), 24),  # dense layers already match
    ],
)
def test_dense_baseline_matches_moe_ffn_flops(moe, kw, expected_hidden):
    cfg = model_cfg(moe=moe, **kw)
    base = dense_baseline(cfg)
    assert base.moe is None and base.ffn_hidden_dim == expected_hidden
    moe_flops, dense_flops = flops_per_token(cfg, 16), flops_per_token(base, 16)
    assert dense_flops.ffn == moe_flops.ffn
    assert (dense_flops.attention, dense_flops.lm_head) == (moe_flops.attention, moe_flops.lm_head)
    assert dense_flops.router == 0 and dense_flops.total == moe_flops.total - moe_flops.router
    # and the dense model's active parameters outside embeddings match up to the router
    p_moe, p_dense = count_params(cfg), count_params(base)
    router = len(cfg.moe_layer_ids()) * D * moe.num_experts
    assert p_dense.active == p_moe.active - router


def test_dense_baseline_converts_non_glu_experts():
    cfg = model_cfg(moe=moe_cfg(activation="relu", hidden_dim=30))  # 2 matrices of 2*30 -> 3 of 40
    base = dense_baseline(cfg)
    assert base.ffn_hidden_dim == 40
    assert flops_per_token(base, 8).ffn == flops_per_token(cfg, 8).ffn


# ---------------------------------------------------------------------- losses


def test_loss_parts_sum_and_are_gathered_from_each_moe_layer():
    torch.manual_seed(6)
    cfg = model_cfg(moe=moe_cfg(load_balance_coef=0.1, z_loss_coef=0.01), moe_every=1, n_dense_first=1)
    model = MoETransformer(cfg)
    seen = []
    for moe in model.moe_layers:
        moe.register_forward_hook(lambda _m, _i, out: seen.append(out))
    ids, targets = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))
    targets[0, :3] = -100
    out = model(ids, targets=targets)
    assert len(seen) == 3 == len(out.router_stats)
    torch.testing.assert_close(out.aux_loss, sum(o.aux_loss for o in seen))
    torch.testing.assert_close(out.z_loss, sum(o.z_loss for o in seen))
    assert out.aux_loss > 0 and out.z_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss + out.z_loss)
    keep = targets != -100
    torch.testing.assert_close(out.ce_loss, F.cross_entropy(out.logits[keep], targets[keep]))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n)


def test_padding_is_kept_out_of_routing():
    torch.manual_seed(7)
    model = MoETransformer(model_cfg(moe=moe_cfg(), moe_every=2)).eval()
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        short = model(ids[:1, :5])
    for stats in padded.router_stats:
        assert int(stats.tokens_per_expert.sum()) == int(mask.sum()) * 2  # real tokens x top_k
    torch.testing.assert_close(padded.logits[0, :5], short.logits[0], atol=1e-5, rtol=1e-5)


def test_update_router_biases():
    cfg = model_cfg(moe=moe_cfg(router="sigmoid_bias", bias_update_rate=0.1), moe_every=2)
    model = MoETransformer(cfg)
    out = model(torch.randint(0, V, (2, 8)))
    model.update_router_biases(out.router_stats)
    assert all(m.router.expert_bias.abs().sum() > 0 for m in model.moe_layers)
    with pytest.raises(ValueError, match="one per MoE layer"):
        model.update_router_biases(out.router_stats[:1])


def test_encoder_decoder_outputs_and_padding():
    torch.manual_seed(8)
    cfg = model_cfg(moe=moe_cfg(), moe_every=2, n_encoder_layers=2, n_layers=4)
    model = MoEEncoderDecoder(cfg).eval()
    src, tgt = torch.randint(0, V, (2, 7)), torch.randint(0, V, (2, 5))
    src_mask = torch.ones(2, 7, dtype=torch.bool)
    src_mask[1, 4:] = False
    out = model(src, tgt, attention_mask=src_mask, labels=tgt)
    assert out.logits.shape == (2, 5, V)
    assert len(out.encoder_router_stats) == 1 and len(out.decoder_router_stats) == 2
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss + out.z_loss)
    torch.testing.assert_close(out.aux_loss, out.encoder_aux_loss + out.decoder_aux_loss)
    # padded source tokens change nothing: same as the unpadded source alone
    with torch.no_grad():
        alone = model(src[1:, :4], tgt[1:]).logits
    torch.testing.assert_close(out.logits[1], alone[0], atol=1e-5, rtol=1e-5)
    # the decoder is causal: changing a later target token leaves earlier logits alone
    tgt2 = tgt.clone()
    tgt2[:, 3] = (tgt2[:, 3] + 1) % V
    torch.testing.assert_close(model(src, tgt2).logits[:, :3], model(src, tgt).logits[:, :3])


# ---------------------------------------------------------------------- training


def train(model, step_fn, steps=30, lr=1e-2) -> tuple[float, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_tiny_decoder_trains():
    torch.manual_seed(9)
    model = MoETransformer(model_cfg(moe=moe_cfg(), moe_every=2))
    ids = torch.randint(0, V, (4, 16))
    first, last = train(model, lambda: model(ids[:, :-1], targets=ids[:, 1:]).loss)
    assert last < 0.5 * first, (first, last)


def test_tiny_encoder_decoder_trains():
    torch.manual_seed(10)
    model = MoEEncoderDecoder(model_cfg(moe=moe_cfg(), moe_every=2, n_layers=2, n_encoder_layers=2))
    src, tgt = torch.randint(0, V, (4, 12)), torch.randint(0, V, (4, 9))
    first, last = train(model, lambda: model(src, tgt[:, :-1], labels=tgt[:, 1:]).loss)
    assert last < 0.5 * first, (first, last)


# ---------------------------------------------------------------------- config


def test_config_defaults_and_json_round_trip():
    cfg = model_cfg(n_kv_heads=None, moe=moe_cfg(num_shared_experts=1), moe_every=2, n_dense_first=1)
    assert cfg.n_kv_heads == cfg.n_heads and cfg.head_dim == D // cfg.n_heads
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.moe, MoEConfig)
    dense = model_cfg()
    assert ModelConfig.from_dict(json.loads(json.dumps(dense.to_dict()))) == dense


def test_config_unknown_keys_raise_listing_valid_ones():
    d = model_cfg(moe=moe_cfg()).to_dict()
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['n_head'\].*'n_heads'"):
        ModelConfig.from_dict({**d, "n_head": 4})
    with pytest.raises(ValueError, match=r"unknown MoEConfig keys \['experts'\]"):
        ModelConfig.from_dict({**d, "moe": {**d["moe"], "experts": 4}})


@pytest.mark.parametrize(
    "field,value",
    [
        ("vocab_size", 0),
        ("dim", -1),
        ("n_layers", 0),
        ("n_heads", 2.0),
        ("n_kv_heads", 3),  # does not divide n_heads=4
        ("head_dim", 7),  # odd: rotary needs pairs
        ("ffn_hidden_dim", 0),
        ("max_seq_len", 0),
        ("rope_theta", 0.0),
        ("norm_eps", -1e-5),
        ("dropout", 1.0),
        ("init_std", float("nan")),
        ("qk_norm", 1),
        ("moe_every", 0),
        ("n_dense_first", 5),  # > n_layers=4
        ("n_encoder_layers", 0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=re.escape(f"ModelConfig.{field}={value!r}")):
        model_cfg(**{field: value})


def test_moe_dim_must_match_model_dim():
    with pytest.raises(ValueError, match=r"ModelConfig\.moe\.dim=16"):
        model_cfg(moe=MoEConfig(dim=16, hidden_dim=8, num_experts=2))


def test_flops_reject_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(model_cfg(), 0)
