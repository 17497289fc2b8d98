"""Quantize a model's experts: int8 / int4 round-to-nearest, or QMoE-style ternary with GPTQ.

`quantize_model(model, spec, batches)` returns a copy whose MoE layers hold `QuantizedExpertBank`s;
the router, norms, attention and embeddings stay float32. Ternary quantization is sequential over
the MoE layers, as GPTQ is: layer i is calibrated on the outputs of layers 0..i-1 *already
quantized* (each forward stops right after layer i's router), so later layers correct for the
errors of earlier ones. Within a layer, each expert's w_in is fitted on the tokens routed to it
(H = X^T X), then its w_out on the activations those tokens produce through the quantized w_in.

`save_quantized` writes an ordinary checkpoint folder plus a "quantization" entry in config.json,
from which `load_model` rebuilds the quantized banks.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.compress.calibrate import Batch, record_routing
from moekit.compress.codec import entropy_bits
from moekit.compress.derived import save_derived_checkpoint
from moekit.compress.qexperts import METHODS, QuantizedExpertBank
from moekit.compress.surgery import moe_layers_named
from moekit.compress.ternary import gptq_ternary, round_ternary, ternary_values
from moekit.moe.activations import apply_activation
from moekit.moe.experts import ExpertBank


@dataclass
class QuantSpec:
    method: str
    group_size: int = 32  # int4: inputs per scale/zero-point group
    gptq: bool = True  # ternary: GPTQ error feedback (False = plain rounding, no calibration needed)
    damp: float = 0.01  # ternary: GPTQ dampening, a fraction of the mean Hessian diagonal
    dead_zone: float = 0.5  # ternary: round to 0 below dead_zone * level (0.5 = nearest)
    code_bits: int = 16  # ternary: dictionary codeword width

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method={self.method!r} is unknown: expected one of {list(METHODS)}")
        if not 0 < self.dead_zone < 1:
            raise ValueError(f"--dead-zone={self.dead_zone} is invalid: expected a number in (0, 1)")
        if not self.damp > 0:
            raise ValueError(f"--damp={self.damp} is invalid: expected a number > 0")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "ternary" and self.gptq


def quantize_model(
    model: nn.Module, spec: QuantSpec, batches: list[Batch] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """(quantized copy of `model`, report with bits per expert weight and symbol statistics)."""
    layers = moe_layers_named(model)
    if not layers:
        raise ValueError("the model has no MoE layers: nothing to quantize")
    for prefix, layer in layers:
        if not isinstance(layer.experts, ExpertBank):
            raise ValueError(f"{prefix}: the experts are already quantized; quantize the float checkpoint")
    if spec.needs_calibration and not batches:
        raise ValueError("ternary quantization with GPTQ needs calibration data (or gptq=False)")
    qmodel = copy.deepcopy(model).eval()
    qlayers = [layer for _, layer in moe_layers_named(qmodel)]
    if spec.method == "ternary":
        banks = []
        for i, layer in enumerate(qlayers):
            record = record_routing(qmodel, batches, stop_after=i)[i] if spec.gptq else None
            banks.append(_ternary_bank(layer.experts, record, spec))
    else:
        banks = [
            QuantizedExpertBank.from_bank(layer.experts, spec.method, spec.group_size) for layer in qlayers
        ]
    for layer, bank in zip(qlayers, banks):
        layer.experts = bank
    return qmodel, quantization_report(qmodel)


@torch.no_grad()
def _ternary_bank(bank: ExpertBank, record, spec: QuantSpec) -> QuantizedExpertBank:
    """Fit every expert of `bank` (in place, to its dequantized ternary weights) and code them."""
    symbols = {"w_in": [], "w_out": []}
    levels = {"w_in": ([], []), "w_out": ([], [])}
    for e in range(bank.num_experts):
        x_ND = record.expert_inputs(e).double() if record is not None else None
        w_in_HD = bank.w_in_EDF[e].t()
        sym_in, lo, hi = _fit(w_in_HD, x_ND, spec)
        deq_in_HD = ternary_values(sym_in, lo, hi)
        a_NF = None
        if x_ND is not None:
            h = x_ND @ deq_in_HD.double().t()
            if bank.b_in_EF is not None:
                h = h + bank.b_in_EF[e].double()
            a_NF = apply_activation(bank.activation, h, bank.is_glu)
        w_out_DF = bank.w_out_EFD[e].t()
        sym_out, lo_out, hi_out = _fit(w_out_DF, a_NF, spec)
        bank.w_in_EDF[e] = deq_in_HD.t().to(bank.w_in_EDF.dtype)  # later layers calibrate on these
        bank.w_out_EFD[e] = ternary_values(sym_out, lo_out, hi_out).t().to(bank.w_out_EFD.dtype)
        for m, s, l_, h_ in (("w_in", sym_in, lo, hi), ("w_out", sym_out, lo_out, hi_out)):
            symbols[m].append(s)
            levels[m][0].append(l_)
            levels[m][1].append(h_)
    stacked_levels = {m: (torch.stack(lo_), torch.stack(hi_)) for m, (lo_, hi_) in levels.items()}
    stacked = {m: torch.stack(s) for m, s in symbols.items()}
    return QuantizedExpertBank.from_ternary(bank, stacked, stacked_levels, spec.code_bits)


def _fit(w_RC: torch.Tensor, x_NC: torch.Tensor | None, spec: QuantSpec):
    if x_NC is None or not spec.gptq:
        return round_ternary(w_RC, spec.dead_zone)
    return gptq_ternary(w_RC, x_NC.t() @ x_NC, spec.damp, spec.dead_zone)


def quantization_report(qmodel: nn.Module) -> dict[str, Any]:
    """Bits per expert weight (all layers), and for ternary the share of zeros and the pair entropy."""
    banks = [layer.experts for _, layer in moe_layers_named(qmodel)]
    params = sum(b.storage_bits()["params"] for b in banks)
    bits = sum(b.storage_bits()["bits"] for b in banks)
    report: dict[str, Any] = {
        "method": banks[0].method,
        "expert_params": params,
        "bits_per_expert_param": bits / params,
    }
    if banks[0].method == "ternary":
        counts = sum(b.code_counts for b in banks)
        zeros = nonzero = 0
        for b in banks:
            for m in ("w_in", "w_out"):
                for e in range(b.num_experts):
                    s = b.ternary_symbols(m, e)
                    zeros += int((s == 0).sum())
                    nonzero += int((s != 0).sum())
        report["zero_fraction"] = zeros / (zeros + nonzero)
        report["entropy_bits_per_param"] = entropy_bits(counts.tolist()) / 2
        code_bits = sum(b.w_in_codes.numel() + b.w_out_codes.numel() for b in banks)
        report["code_bits_per_param"] = code_bits * int(banks[0].meta.get("code_bits", 16)) / params
    return report


def save_quantized(
    qmodel: nn.Module, source_config: dict[str, Any], out: str | Path, spec: QuantSpec
) -> Path:
    """Write the quantized model as a checkpoint that `load_model` reads back quantized."""
    meta = {k: v for k, v in asdict(spec).items() if k != "gptq" or spec.method == "ternary"}
    return save_derived_checkpoint(qmodel, source_config, out, {"op": "quantize", **meta}, quantization=meta)


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model with quantized experts, its config.json) from a `moekit quantize` folder.

    `load_model` does the work (it detects the "quantization" entry); this refuses float folders."""
    from moekit.train.checkpoint import CheckpointError, load_model

    model, config = load_model(path, device)
    if not config.get("quantization"):
        raise CheckpointError(
            f"{config['folder']!r} is not a quantized checkpoint (no 'quantization' in config.json)"
        )
    return model, config
