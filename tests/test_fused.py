"""The fused row-block expert function against the same math composed from autograd pieces."""

from __future__ import annotations

import pytest
import torch

from moekit.moe import ExpertBank, native

ACTIVATIONS = ["swiglu", "geglu", "gpt_oss", "relu", "gelu", "silu"]


@pytest.fixture(autouse=True, params=["native", "torch"])
def path(request, monkeypatch):
    """Every test with the native kernels where they apply (CPU float32, tokens mode, strategy
    "auto") and with the torch row-block loop everywhere."""
    if request.param == "torch":
        monkeypatch.setattr(native, "ENABLED", False)
    return request.param


def _bank(activation, bias, dtype=torch.float32, num_experts=4, dim=8, hidden=6, seed=0):
    torch.manual_seed(seed)
    bank = ExpertBank(num_experts, dim, hidden, activation, bias=bias).to(dtype)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.5)  # biases non-zero too
    return bank


def _run(bank, x, counts, fused, probe):
    x = x.detach().clone().requires_grad_(True)
    y = bank(x, counts) if fused else bank._forward_composed(x, counts)
    (y * probe).sum().backward()
    grads = {"x": x.grad} | {n: p.grad.clone() for n, p in bank.named_parameters()}
    bank.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_rows", [1, 3, 1000])  # one row per block, blocks splitting groups, one block
@pytest.mark.parametrize("strategy", ["auto", "loop", "grouped_mm"])
def test_fused_matches_composed(activation, bias, block_rows, strategy):
    bank = _bank(activation, bias)
    bank.strategy = strategy
    hidden_in = bank.w_in_EDF.shape[-1]
    bank.block_bytes = block_rows * hidden_in * 4
    counts = [5, 0, 7, 2]  # an expert without rows must get exact zero gradients
    x = torch.randn(sum(counts), 8)
    probe = torch.randn(sum(counts), 8)
    y, grads = _run(bank, x, counts, True, probe)
    y_ref, ref = _run(bank, x, counts, False, probe)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(grads["w_in_EDF"][1], torch.zeros_like(grads["w_in_EDF"][1]))
    assert torch.equal(grads["w_out_EFD"][1], torch.zeros_like(grads["w_out_EFD"][1]))
    with torch.no_grad():  # the no-grad path (no saved hidden) gives the same output
        torch.testing.assert_close(bank(x, counts), y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fused_gradcheck_float64_small_blocks(activation):
    bank = _bank(activation, True, torch.float64, num_experts=3, dim=4, hidden=3)
    bank.block_bytes = 2 * bank.w_in_EDF.shape[-1] * 8  # 2-row blocks: weight gradients accumulate
    counts = [3, 0, 2]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in bank.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in bank.named_parameters())

    def f(x, *ps):
        return torch.func.functional_call(bank, dict(zip(names, ps)), (x, counts))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_backward_twice_with_retained_graph():
    """The backward only reads what it saved: a retained graph differentiates again identically."""
    bank = _bank("swiglu", False)
    bank.block_bytes = 2 * bank.w_in_EDF.shape[-1] * 4
    x = torch.randn(9, 8, requires_grad=True)
    y = bank(x, [4, 3, 0, 2])
    first = torch.autograd.grad(y.sum(), (x, bank.w_in_EDF), retain_graph=True)
    second = torch.autograd.grad(y.sum(), (x, bank.w_in_EDF))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_frozen_weights_and_input_without_grad():
    """Only the gradients asked for are computed (LoRA-style frozen experts, frozen input)."""
    bank = _bank("swiglu", False)
    bank.w_in_EDF.requires_grad_(False)
    x = torch.randn(6, 8, requires_grad=True)
    bank(x, [2, 2, 1, 1]).sum().backward()
    assert bank.w_in_EDF.grad is None and bank.w_out_EFD.grad is not None and x.grad is not None
    bank.w_in_EDF.requires_grad_(True)
    x = torch.randn(6, 8)
    bank(x, [2, 2, 1, 1]).sum().backward()
    assert bank.w_in_EDF.grad is not None


def test_dropout_in_training_uses_composed_path():
    torch.manual_seed(0)
    bank = ExpertBank(2, 8, 6, "swiglu", dropout=0.5).train()
    x = torch.randn(10, 8, requires_grad=True)
    torch.manual_seed(1)
    a = bank(x, [6, 4])
    torch.manual_seed(1)
    b = bank._forward_composed(x, [6, 4])
    assert torch.equal(a, b)
    bank.eval()  # evaluation: dropout is off, the fused path runs and agrees with the composed one
    torch.testing.assert_close(bank(x, [6, 4]), bank._forward_composed(x, [6, 4]))


TOKEN_N = [0, 2, 3, 5, 0, 1, 2, 4, 5, 1, 3]  # 11 rows for 6 tokens, each token once per expert
TOKEN_COUNTS = [4, 0, 5, 2]


def _tokens_reference(bank, x_TD, token_N, weight_N, counts):
    y_ND = bank._forward_composed(x_TD[token_N], counts)
    return torch.zeros_like(x_TD).index_add(0, token_N, y_ND * weight_N[:, None])


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "gpt_oss"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_rows", [2, 1000])
def test_forward_tokens_matches_gather_bank_scatter(activation, bias, block_rows):
    """Tokens mode (gather -> experts -> weighted scatter-add fused) against the composed pieces:
    output and gradients of the input, the combine weights and every parameter."""
    bank = _bank(activation, bias)
    bank.block_bytes = block_rows * bank.w_in_EDF.shape[-1] * 4
    token_N = torch.tensor(TOKEN_N)
    x_TD = torch.randn(7, 8, requires_grad=True)  # token 6 has no rows: zero output and gradient
    weight_N = torch.rand(11, requires_grad=True)
    probe = torch.randn(7, 8)
    got = bank.forward_tokens(x_TD, token_N, weight_N, TOKEN_COUNTS)
    want = _tokens_reference(bank, x_TD, token_N, weight_N, TOKEN_COUNTS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    inputs = (x_TD, weight_N, *bank.parameters())
    g_got = torch.autograd.grad((got * probe).sum(), inputs)
    g_want = torch.autograd.grad((want * probe).sum(), inputs)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert torch.equal(g_got[0][6], torch.zeros(8))
    with torch.no_grad():
        torch.testing.assert_close(bank.forward_tokens(x_TD, token_N, weight_N, TOKEN_COUNTS), want)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_tokens_gradcheck_float64(bias):
    bank = _bank("swiglu", bias, torch.float64)
    bank.block_bytes = 3 * bank.w_in_EDF.shape[-1] * 8
    token_N = torch.tensor(TOKEN_N)
    names = [n for n, _ in bank.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in bank.named_parameters())
    x_TD = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weight_N = torch.rand(11, dtype=torch.float64, requires_grad=True)

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bank = bank

        def forward(self, x, w):
            return self.bank.forward_tokens(x, token_N, w, TOKEN_COUNTS)

    tokens = Tokens()

    def f_tokens(x, w, *ps):
        return torch.func.functional_call(tokens, {f"bank.{n}": p for n, p in zip(names, ps)}, (x, w))

    assert torch.autograd.gradcheck(f_tokens, (x_TD, weight_N, *params), eps=1e-6, atol=1e-6)
