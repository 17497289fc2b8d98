"""Expert quantization: int8/int4 error bounds by hand, quantized compute against the dequantized
float reference, the ternary grid and GPTQ against a naive loop, the codec's bit-exact round trip,
and checkpoints that load back quantized."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.cli import main as cli_main
from moekit.compress.codec import TunstallCode, entropy_bits, pair_symbols, unpair_symbols
from moekit.compress.intquant import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize
from moekit.compress.qexperts import QuantizedExpertBank
from moekit.compress.quantize import QuantSpec, load_quantized, quantize_model
from moekit.compress.ternary import (
    damped_hessian,
    gptq_ternary,
    round_ternary,
    ternary_levels,
    ternary_round,
    ternary_values,
)
from moekit.moe import ExpertBank
from moekit.train.checkpoint import load_model
from tests.compress_helpers import small_model, tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("quant"))


def _weights(E=3, K=64, N=24, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(E, K, N) * 0.05
    w[0, :, 0] = 0.0  # a zero column
    w[1, :32, 1] = torch.rand(32) + 0.1  # an all-positive int4 group
    w[2, :, 2] = -torch.rand(K)  # an all-negative column
    return w


def test_int8_error_bound_by_hand():
    w = _weights()
    t = int8_quantize(w)
    for e in range(w.shape[0]):
        deq = int8_dequantize(t, e)
        for n in range(w.shape[2]):
            col = w[e, :, n]
            s = max(abs(float(v)) for v in col) / 127 or 1.0  # the scale, from its definition
            assert float((col - deq[:, n]).abs().max()) <= s / 2 * (1 + 1e-6)
    assert t["q"].dtype == torch.int8 and int(t["q"].abs().max()) <= 127


def test_int4_error_bound_by_hand():
    w, G = _weights(), 16
    t = int4_quantize(w, G)
    for e in range(w.shape[0]):
        deq = int4_dequantize(t, e)
        for g in range(w.shape[1] // G):
            for n in range(w.shape[2]):
                vals = [float(v) for v in w[e, g * G : (g + 1) * G, n]]
                s = (max(max(vals), 0.0) - min(min(vals), 0.0)) / 15 or 1.0
                err = float((w[e, g * G : (g + 1) * G, n] - deq[g * G : (g + 1) * G, n]).abs().max())
                assert err <= s / 2 * (1 + 2**-10) + 1e-12  # the scale is rounded up to float16
    assert t["q"].shape == (3, 32, 24) and t["q"].dtype == torch.uint8 and int(t["zero"].max()) <= 15


def test_int4_is_exact_on_its_own_grid():
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (2, 32, 8)).float()
    codes[:, :, :] = codes.clone()
    codes[:, 0], codes[:, 1] = 0.0, 15.0  # every group spans the full range
    w = (codes - 3.0) * 0.125  # scale 1/8 and zero point 3 are exact in float16
    t = int4_quantize(w, 32)
    assert torch.equal(torch.stack([int4_dequantize(t, e) for e in range(2)]), w)


@pytest.mark.parametrize("bad", [3, 5, 48])
def test_int4_group_size_must_divide(bad):
    with pytest.raises(ValueError, match=f"--group-size={bad}"):
        int4_quantize(torch.randn(1, 32, 4), bad)


def _bank(bias=False, activation="swiglu"):
    torch.manual_seed(0)
    bank = ExpertBank(5, 32, 16, activation, bias=bias).eval()
    if bias:
        with torch.no_grad():
            bank.b_in_EF.normal_()
            bank.b_out_ED.normal_()
    return bank


def _ternary_bank(bank):
    symbols, levels = {}, {}
    for m, w in (("w_in", bank.w_in_EDF), ("w_out", bank.w_out_EFD)):
        parts = [round_ternary(w[e].t().detach()) for e in range(bank.num_experts)]
        symbols[m] = torch.stack([p[0] for p in parts])
        levels[m] = (torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts]))
    return QuantizedExpertBank.from_ternary(bank, symbols, levels, code_bits=12), symbols, levels


@pytest.mark.parametrize("method", ["int8", "int4", "ternary"])
@pytest.mark.parametrize("bias, activation", [(False, "swiglu"), (True, "gelu")])
def test_quantized_compute_matches_dequantized_reference(method, bias, activation):
    bank = _bank(bias, activation)
    q = _ternary_bank(bank)[0] if method == "ternary" else QuantizedExpertBank.from_bank(bank, method, 16)
    ref = q.dequantized()
    x = torch.randn(23, 32)
    counts = [6, 0, 9, 1, 7]  # an expert without rows
    out = q(x, counts)
    torch.testing.assert_close(out, ref(x, counts), rtol=1e-5, atol=1e-6)
    # and against a per-row loop over the dequantized matrices
    row = 0
    for e, c in enumerate(counts):
        w_in, w_out = q.weight("w_in", e), q.weight("w_out", e)
        for r in range(row, row + c):
            h = x[r] @ w_in + (q.b_in_EF[e] if bias else 0)
            a = (
                torch.nn.functional.silu(h[:16]) * h[16:]
                if activation == "swiglu"
                else torch.nn.functional.gelu(h)
            )
            y = a @ w_out + (q.b_out_ED[e] if bias else 0)
            torch.testing.assert_close(out[r], y, rtol=1e-5, atol=1e-5)
        row += c


def test_ternary_bank_decodes_exactly_the_symbols():
    bank = _bank()
    q, symbols, levels = _ternary_bank(bank)
    for m in ("w_in", "w_out"):
        for e in range(bank.num_experts):
            assert torch.equal(q.ternary_symbols(m, e), symbols[m][e])
            lo, hi = levels[m][0][e].half().float(), levels[m][1][e].half().float()
            assert torch.equal(q.weight(m, e), ternary_values(symbols[m][e], lo, hi).t())


def test_ternary_grid_is_row_min_zero_max():
    w = torch.tensor(
        [[-0.4, 0.1, 0.3, -0.19, -0.21], [0.5, 0.2, 0.26, 0.24, 0.0], [-1.0, -0.2, -0.6, -0.5, -0.4]]
    )
    lo, hi = ternary_levels(w)
    assert lo.tolist() == [torch.tensor(-0.4).half().item(), 0.0, -1.0]
    assert hi.tolist() == [torch.tensor(0.3).half().item(), 0.5, 0.0]
    sym = torch.stack([ternary_round(w[r], lo[r], hi[r]) for r in range(3)])
    assert sym.tolist() == [[-1, 0, 1, 0, -1], [1, 0, 1, 0, 0], [-1, 0, -1, 0, 0]]
    wide = torch.stack([ternary_round(w[r], lo[r], hi[r], dead_zone=0.9) for r in range(3)])
    assert wide.tolist() == [[-1, 0, 1, 0, 0], [1, 0, 0, 0, 0], [-1, 0, 0, 0, 0]]  # the extremes stay


def _naive_gptq(w, h, lo, hi, damp):
    """The OBS update, column by column, with a fresh inverse of the remaining columns' Hessian."""
    hd = damped_hessian(h, damp)
    w = w.clone()
    sym = torch.zeros(w.shape, dtype=torch.int8)
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(hd[i:, i:])
        sym[:, i] = ternary_round(w[:, i], lo.double(), hi.double())
        err = (w[:, i] - ternary_values(sym[:, i], lo.double(), hi.double())) / hinv[0, 0]
        w[:, i:] -= err[:, None] * hinv[0][None, :]
    return sym


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_matches_the_naive_loop_and_beats_rounding(seed):
    torch.manual_seed(seed)
    w = torch.randn(7, 12, dtype=torch.float64)
    # correlated inputs, as real activations are: that is what error feedback exploits
    x = torch.randn(50, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    x[:, 5] = 0.0  # an input no calibration row uses
    h = x.t() @ x
    sym, lo, hi = gptq_ternary(w, h, damp=0.01, block=5)  # blocks cut through the columns
    assert torch.equal(sym, _naive_gptq(w, h, lo, hi, 0.01))
    rtn = round_ternary(w)[0]

    def out_err(s):
        return float(((x @ w.t() - x @ ternary_values(s, lo.double(), hi.double()).t()) ** 2).sum())

    assert out_err(sym) < out_err(rtn)
    assert torch.equal(gptq_ternary(w, torch.zeros(12, 12))[0], rtn)  # no data: plain rounding


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 3000),
    p_zero=st.floats(0.0, 1.0),
    code_bits=st.integers(4, 16),
    seed=st.integers(0, 2**31 - 1),
)
def test_codec_round_trip_is_bit_exact(n, p_zero, code_bits, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]) + 1e-9
    t = (
        (torch.multinomial(probs, n, replacement=True, generator=g) - 1).to(torch.int8)
        if n
        else torch.zeros(0, dtype=torch.int8)
    )
    pairs = pair_symbols(t)
    counts = torch.bincount(pairs.long(), minlength=9).tolist()
    code = TunstallCode(counts, code_bits)
    assert code.num_words <= 2**code_bits
    codes = code.encode(pairs)
    assert torch.equal(unpair_symbols(code.decode(codes, pairs.numel()), n), t)
    other = TunstallCode([5, 1, 0, 0, 100, 0, 3, 2, 1], code_bits)  # any dictionary is lossless
    assert torch.equal(other.decode(other.encode(pairs), pairs.numel()), pairs)


def test_codec_rate_approaches_the_entropy():
    g = torch.Generator().manual_seed(0)
    t = (torch.multinomial(torch.tensor([0.06, 0.88, 0.06]), 200_000, replacement=True, generator=g) - 1).to(
        torch.int8
    )
    pairs = pair_symbols(t)
    counts = torch.bincount(pairs.long(), minlength=9).tolist()
    code = TunstallCode(counts, 16)
    bits_per_weight = code.encode(pairs).numel() * 16 / t.numel()
    entropy = entropy_bits(counts) / 2
    assert entropy <= bits_per_weight <= 1.1 * entropy < 1.0
    assert bits_per_weight == pytest.approx(code.expected_bits_per_symbol() / 2, rel=0.01)


def test_quantize_model_report_and_errors():
    model = small_model(hidden_dim=32)
    x = torch.randint(0, 64, (4, 32))
    qmodel, report = quantize_model(model, QuantSpec("ternary"), [(x, None)])
    levels = 2 * 16 * (2 * 32 + 32) * 6  # float16 lo and hi of every row (w_in: 2F rows, w_out: D rows)
    tables = 2 * 7 * 64 + 9 * 64  # int64 codeword offsets of both matrices, the 9 symbol counts
    extra = 2 * (levels + tables) / report["expert_params"]  # two MoE layers
    assert report["bits_per_expert_param"] == pytest.approx(report["code_bits_per_param"] + extra)
    assert isinstance(model.moe_layers[0].experts, ExpertBank)  # the input model is left alone
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(qmodel, QuantSpec("int8"))
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(model, QuantSpec("ternary"))
    with pytest.raises(ValueError, match="--method='int2' is unknown"):
        QuantSpec("int2")


@pytest.mark.parametrize("method", ["int8", "int4", "ternary"])
def test_cli_quantize_saves_and_loads_quantized(ckpt, tmp_path, capsys, method):
    out = tmp_path / method
    argv = ["quantize", "--ckpt", str(ckpt), "--method", method, "--out", str(out), "--group-size", "16"]
    assert cli_main([*argv, "--calib-sequences", "4", "--eval-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "bits per expert weight" in printed and "validation loss" in printed
    model, config = load_quantized(out)
    assert config["quantization"]["method"] == method
    assert all(isinstance(layer.experts, QuantizedExpertBank) for layer in model.moe_layers)
    bits = model.moe_layers[0].experts.storage_bits()["bits_per_param"]
    assert bits < {"int8": 9.1, "int4": 6.1, "ternary": 4.0}[method]
    x = torch.randint(0, 300, (2, 16))
    reference, _ = load_model(ckpt)  # the float model with the dequantized experts: the same numbers
    for ref_layer, layer in zip(reference.moe_layers, model.moe_layers):
        ref_layer.experts = layer.experts.dequantized()
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)
    assert cli_main(["prune", "--ckpt", str(out), "--keep", "2", "--out", str(tmp_path / "p")]) == 2
    assert "quantized" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        load_quantized(ckpt)


def test_incompatible_quantized_checkpoints_are_refused(ckpt, tmp_path):
    out = tmp_path / "q"
    assert cli_main(["quantize", "--ckpt", str(ckpt), "--method", "int8", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization": {"method": "int5"}}))
    with pytest.raises(ValueError, match="quantization.method='int5' is unknown"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({**config, "quantization": {"method": "int4"}}))
    with pytest.raises(ValueError, match="does not hold int4 experts"):
        load_model(out)


def test_cli_quantize_bad_input(ckpt, tmp_path, capsys):
    base = ["quantize", "--ckpt", str(ckpt)]
    assert cli_main([*base, "--method", "int3", "--out", str(tmp_path / "a")]) == 2
    assert "--method='int3' is unknown" in capsys.readouterr().err
    assert cli_main([*base, "--method", "int8", "--out", str(ckpt.parent)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert (
        cli_main([*base, "--method", "ternary", "--out", str(tmp_path / "b"), "--calib", "/no/data/*.txt"])
        == 2
    )
    assert "/no/data/*.txt" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert math.isfinite(load_model(ckpt)[0](torch.zeros(1, 4, dtype=torch.long)).logits.sum().item())
