"""LoRA adapters: per-expert adapters inside the grouped expert compute against a naive
per-expert (W + s A B) reference, attention/FFN adapters, and merging back into the weights."""

from __future__ import annotations

import pytest
import torch

from moekit.adapt.freeze import freeze
from moekit.adapt.lora import LoRAExpertBank, LoRALinear, apply_lora, lora_parameters, merge_lora
from moekit.model import MoETransformer
from moekit.moe.experts import ExpertBank, apply_activation
from tests.adapt_helpers import tiny_model_config


def randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero (the adapted model equals the base); give every adapter a real update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def naive_lora_bank(bank: LoRAExpertBank, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Expert by expert: rows @ (W_in + s A_in B_in) -> act -> @ (W_out + s A_out B_out)."""
    b, s = bank.base, bank.scale
    outputs, start = [], 0
    for e, c in enumerate(counts):
        rows = x_ND[start : start + c]
        w_in = b.w_in_EDF[e] + s * bank.lora_A_in_EDR[e] @ bank.lora_B_in_ERH[e]
        w_out = b.w_out_EFD[e] + s * bank.lora_A_out_EFR[e] @ bank.lora_B_out_ERD[e]
        h = rows @ w_in + (b.b_in_EF[e] if b.b_in_EF is not None else 0)
        y = apply_activation(b.activation, h, b.is_glu) @ w_out + (
            b.b_out_ED[e] if b.b_out_ED is not None else 0
        )
        outputs.append(y)
        start += c
    return torch.cat(outputs)


@pytest.mark.parametrize(("activation", "bias"), [("swiglu", False), ("relu", True), ("geglu", True)])
def test_lora_expert_bank_equals_per_expert_reference(activation, bias):
    torch.manual_seed(0)
    bank = ExpertBank(4, 8, 6, activation, bias).double()
    lora = LoRAExpertBank(bank, rank=3, alpha=6.0).double()
    randomize_adapters(lora)
    counts = [3, 0, 5, 2]  # an expert without rows too
    x_ND = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    got = lora(x_ND, counts)
    ref = naive_lora_bank(lora, x_ND, counts)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # gradients of the adapters and the input agree too; the frozen base gets none
    params = [x_ND, *lora_parameters(lora)]
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not bank.w_in_EDF.requires_grad and not bank.w_out_EFD.requires_grad
    assert lora.lora_A_in_EDR.shape == (4, 8, 3) and lora.lora_B_in_ERH.shape == (
        4,
        3,
        12 if bank.is_glu else 6,
    )


def test_merged_bank_equals_adapted_bank():
    torch.manual_seed(1)
    bank = ExpertBank(3, 8, 6, "swiglu").double()
    lora = LoRAExpertBank(bank, rank=2).double()
    randomize_adapters(lora)
    x_ND = torch.randn(9, 8, dtype=torch.float64)
    before = lora(x_ND, [4, 2, 3])
    merged = lora.merged()
    assert merged is bank
    torch.testing.assert_close(merged(x_ND, [4, 2, 3]), before, rtol=1e-12, atol=1e-12)


def test_lora_linear_equals_low_rank_update():
    torch.manual_seed(2)
    base = torch.nn.Linear(6, 5, bias=True)
    layer = LoRALinear(base, rank=2, alpha=4.0)
    randomize_adapters(layer)
    x = torch.randn(3, 6)
    w = base.weight + 2.0 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer(x), x @ w.t() + base.bias)


def test_apply_lora_to_model_then_merge_keeps_outputs():
    torch.manual_seed(3)
    cfg = tiny_model_config(moe_every=2, moe_kw={"num_shared_experts": 1})
    model = MoETransformer(cfg).eval()
    keys = set(model.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    base_logits = model(x).logits
    freeze(model, "all")  # the fine-tuning default with LoRA: only the adapters train
    wrapped = apply_lora(model, rank=4)
    # layer 0 dense: attention (4) + FFN (3); layer 1 MoE: attention (4) + experts + shared
    assert len(wrapped) == 13 and "layers.1.ffn.experts" in wrapped and "layers.1.ffn.shared.bank" in wrapped
    torch.testing.assert_close(model(x).logits, base_logits)  # B = 0: the adapted model starts equal
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any(".router." in n for n, _ in model.named_parameters() if ".lora_" in n)  # never adapted
    randomize_adapters(model)
    adapted = model(x).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    merge_lora(model)
    assert set(model.state_dict()) == keys  # a plain moekit model again
    torch.testing.assert_close(model(x).logits, adapted, rtol=1e-5, atol=1e-5)
    fresh = MoETransformer(cfg).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x).logits, adapted, rtol=1e-5, atol=1e-5)


def test_lora_targets_and_rank_are_checked():
    model = MoETransformer(tiny_model_config())
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['mlp'\].*'attention', 'experts', 'ffn'"):
        apply_lora(model, 2, targets=["mlp"])
    with pytest.raises(ValueError, match="rank=0 is invalid"):
        apply_lora(model, 0)
    with pytest.raises(ValueError, match="no modules of the targets"):
        apply_lora(MoETransformer(tiny_model_config()), 2, targets=["ffn"])  # every layer is MoE
    only_experts = apply_lora(model, 2, targets=["experts"])
    assert only_experts == ["layers.0.ffn.experts", "layers.1.ffn.experts"]
