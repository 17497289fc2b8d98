"""linear_cross_entropy (the LM head and its loss over row chunks) against float64 math, and the
decoder's use of it against its plain logits + F.cross_entropy path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moekit.model.cross_entropy as ce
from moekit.model import ModelConfig, MoEEncoderDecoder, MoETransformer
from moekit.model.cross_entropy import linear_cross_entropy
from moekit.moe import MoEConfig, native


@pytest.fixture(autouse=True, params=["native", "torch"])
def path(request, monkeypatch):
    """Every test on both paths: the native kernel (CPU float32, csrc/cross_entropy.c) and the torch
    chunk loop."""
    if request.param == "native" and (native.library() is None or native.blas_sgemm() is None):
        pytest.skip("no native kernel or no usable BLAS sgemm here")
    if request.param == "torch":
        monkeypatch.setattr(native, "ENABLED", False)
    return request.param


def reference(h, w, b, targets, ignore_index=-100):
    """Loss and gradients in float64, written out: mean over valid rows of logsumexp - target logit."""
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    logits = h64 @ w64.t() + (0 if b64 is None else b64)
    valid = targets != ignore_index
    rows = torch.arange(len(targets))[valid]
    per_row = torch.logsumexp(logits[rows], dim=1) - logits[rows, targets[valid]]
    loss = per_row.sum() / valid.sum()
    loss.backward()
    return loss.detach(), h64.grad, w64.grad, None if b64 is None else b64.grad


def inputs(n=37, d=16, v=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(v, d, generator=g)).requires_grad_(True)
    b = (0.1 * torch.randn(v, generator=g)).requires_grad_(True) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    return h, w, b, t


@pytest.mark.parametrize("chunk_bytes", [1, 8 * 50 * 4, 1 << 30])  # 1 row (at the minimum), several, one
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_gradients_match_float64(monkeypatch, chunk_bytes, bias):
    monkeypatch.setattr(ce, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(ce, "MIN_CHUNK_ROWS", 1)
    h, w, b, t = inputs(bias=bias)
    loss = linear_cross_entropy(h, w, b, t)
    loss.backward()
    ref_loss, ref_h, ref_w, ref_b = reference(h, w, b, t)
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-6)
    assert torch.allclose(h.grad.double(), ref_h, atol=1e-7)
    assert torch.allclose(w.grad.double(), ref_w, atol=1e-7)
    if bias:
        assert torch.allclose(b.grad.double(), ref_b, atol=1e-7)
    assert h.grad[::5].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [2, 37])
def test_native_kernel_runs_and_matches_float64_on_any_thread_count(monkeypatch, path, threads, rows):
    # 2 rows on 3 threads: a thread without rows (its dL/dW accumulator unused; thread 0's is
    # dL/dW itself, zeroed); 37 rows: uneven ranges, chunks of 8 rows with a partial last one
    if path != "native":
        pytest.skip("native kernel only")
    monkeypatch.setattr(ce, "CHUNK_BYTES", 8 * 50 * 4)
    monkeypatch.setattr(ce, "MIN_CHUNK_ROWS", 1)
    calls = []
    real = native.linear_cross_entropy
    monkeypatch.setattr(native, "linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    h, w, b, t = inputs(n=rows)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss = linear_cross_entropy(h, w, b, t)
        loss.backward()
    finally:
        torch.set_num_threads(old)
    assert calls == [1]
    ref_loss, ref_h, ref_w, ref_b = reference(h, w, b, t)
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-6)
    assert torch.allclose(h.grad.double(), ref_h, atol=1e-7)
    assert torch.allclose(w.grad.double(), ref_w, atol=1e-7)
    assert torch.allclose(b.grad.double(), ref_b, atol=1e-7)


def test_chunking_actually_splits(monkeypatch):
    """37 rows over chunks of 8: five chunks, the last one partial."""
    monkeypatch.setattr(ce, "CHUNK_BYTES", 8 * 50 * 4)
    monkeypatch.setattr(ce, "MIN_CHUNK_ROWS", 1)
    assert ce.chunk_rows(37, 50) == 8
    monkeypatch.setattr(ce, "MIN_CHUNK_ROWS", 32)
    assert ce.chunk_rows(37, 50) == 32 and ce.chunk_rows(10, 50) == 10


def test_scaled_and_repeated_backward():
    """An upstream gradient other than 1 scales every gradient; a retained graph gives the same
    gradients again (the saved ones are not modified in place)."""
    h, w, b, t = inputs()
    loss = linear_cross_entropy(h, w, b, t)
    (3.0 * loss).backward(retain_graph=True)
    _, ref_h, ref_w, ref_b = reference(h, w, b, t)
    assert torch.allclose(h.grad.double(), 3 * ref_h, atol=1e-6)
    loss.backward()
    assert torch.allclose(h.grad.double(), 4 * ref_h, atol=1e-6)
    assert torch.allclose(w.grad.double(), 4 * ref_w, atol=1e-6)
    assert torch.allclose(b.grad.double(), 4 * ref_b, atol=1e-6)


def test_no_grad_and_matches_f_cross_entropy():
    h, w, b, t = inputs(n=64, v=300)
    with torch.no_grad():
        fused = linear_cross_entropy(h, w, b, t)
        plain = F.cross_entropy(F.linear(h, w, b), t, ignore_index=-100)
    assert fused.grad_fn is None
    assert torch.allclose(fused, plain, rtol=1e-6)


def test_all_targets_ignored_gives_nan_and_zero_gradients_like_f_cross_entropy():
    h, w, b, t = inputs(n=6)
    t[:] = -100
    loss = linear_cross_entropy(h, w, b, t)
    loss.backward()
    assert torch.isnan(loss)
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_bfloat16_inputs_give_a_float32_loss_close_to_the_reference():
    h, w, _, t = inputs(n=40, d=32, v=64, bias=False)
    hb, wb = h.detach().bfloat16().requires_grad_(True), w.detach().bfloat16().requires_grad_(True)
    loss = linear_cross_entropy(hb, wb, None, t)
    loss.backward()
    ref_loss, ref_h, ref_w, _ = reference(hb, wb, None, t)
    assert loss.dtype == torch.float32 and hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    assert abs(float(loss) - float(ref_loss)) < 2e-2
    assert torch.allclose(hb.grad.double(), ref_h, atol=1e-2)
    assert torch.allclose(wb.grad.double(), ref_w, atol=1e-2)


def test_bad_input_is_named():
    h, w, b, t = inputs()
    with pytest.raises(ValueError, match="target 50 out of range"):
        linear_cross_entropy(h, w, b, torch.where(t == -100, 50, t))
    with pytest.raises(ValueError, match="targets of shape"):
        linear_cross_entropy(h, w, b, t[:-1])
    with pytest.raises(ValueError, match="integer class ids, got dtype torch.float32"):
        linear_cross_entropy(h, w, b, t.float())
    with pytest.raises(ValueError, match=r"expected h \[N, D\]"):
        linear_cross_entropy(h, w[:, :-1], b, t)


def tiny_model(tie: bool) -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(dim=32, hidden_dim=48, num_experts=4, top_k=2, causal=True)
    cfg = ModelConfig(
        vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=48, max_seq_len=64,
        tie_embeddings=tie, moe=moe,
    )  # fmt: skip
    return MoETransformer(cfg)


def tiny_encdec() -> MoEEncoderDecoder:
    """Switch-like: tied head rescaled by dim**-0.5, MoE every other layer in both stacks."""
    torch.manual_seed(0)
    moe = MoEConfig(dim=32, hidden_dim=48, num_experts=4, top_k=1, router="switch")
    cfg = ModelConfig(
        vocab_size=97, dim=32, n_layers=2, n_heads=4, ffn_hidden_dim=48, max_seq_len=64, moe=moe,
        moe_every=2, tie_embeddings=True, output_scale=32**-0.5,
    )  # fmt: skip
    return MoEEncoderDecoder(cfg)


@pytest.mark.parametrize("kind", ["untied", "tied", "encdec"])
def test_model_loss_gradients_and_logits_equal_the_plain_path(monkeypatch, kind):
    """fused_loss on and off: the same loss, the same gradients for every parameter (the tied
    embedding gets both of its contributions), the same logits when read; over several chunks.
    The encoder-decoder's head sees the rescaled decoder states."""
    monkeypatch.setattr(ce, "CHUNK_BYTES", 16 * 97 * 4)
    monkeypatch.setattr(ce, "MIN_CHUNK_ROWS", 1)
    model = tiny_encdec() if kind == "encdec" else tiny_model(kind == "tied")
    x = torch.randint(0, 97, (3, 20))
    y = torch.randint(0, 97, (3, 20))
    y[:, :4] = -100
    results = []
    for fused in (False, True):
        model.fused_loss = fused
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same router jitter / dropout draws in both calls
        out = model(x, x.roll(1, dims=1), labels=y) if kind == "encdec" else model(x, targets=y)
        out.loss.backward()
        results.append((out.loss.detach(), out.ce_loss.detach(), out.logits.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters()
        }))  # fmt: skip
    (loss0, ce0, logits0, grads0), (loss1, ce1, logits1, grads1) = results
    assert torch.allclose(loss0, loss1, rtol=1e-6) and torch.allclose(ce0, ce1, rtol=1e-6)
    assert torch.equal(logits0, logits1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], atol=1e-6, rtol=1e-4), name


def test_model_trains_twice_with_reused_gradient_memory():
    """Two optimizer steps through the fused loss equal two through the plain one (the LM head's
    gradient memory is kept between steps, see moe/memory.py)."""
    losses = {}
    for fused in (False, True):
        model = tiny_model(tie=False)
        model.fused_loss = fused
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
        seq = []
        for _ in range(3):
            loss = model(x, targets=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seq.append(float(loss))
        losses[fused] = seq
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][2] < losses[True][0]


def test_under_autocast_matches_the_plain_loss_under_autocast():
    """Mixed precision as the trainer runs it (bf16 autocast): the head's product in bf16, the loss
    and the gradients in float32, as F.cross_entropy(F.linear(h, w).float()) under the same autocast."""
    h, w, _, t = inputs(n=48, d=32, v=80, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, None, t)
    fused.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)
    plain.backward()
    assert fused.dtype == torch.float32 and grads[0].dtype == grads[1].dtype == torch.float32
    assert torch.allclose(fused, plain, rtol=1e-3)
    assert torch.allclose(grads[0], h.grad, atol=2e-3) and torch.allclose(grads[1], w.grad, atol=2e-3)
