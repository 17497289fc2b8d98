"""QuantizedExpertBank: an expert bank that stores int8, int4 or ternary-coded weights and computes
from them, a drop-in for `ExpertBank` in `MoE.experts` (same `forward(x_ND, counts)`).

The forward runs expert by expert over the expert-sorted rows: it dequantizes that expert's two
matrices to float32 (int8: q * s; int4: unpack nibbles, (q - z) * s per group; ternary: decode the
expert's dictionary codewords, then {lo, 0, hi} per row) and multiplies, so at most one expert's
float weights exist at a time. Measured on CPU, dequantize-then-GEMM beat torch's weight-only
int8 kernel (`_weight_int8pack_mm`) by about 10x, so that kernel is not used. Ternary experts can
keep their decoded int8 symbols (`cache_decoded = True`): faster, at 8 bits a weight in memory.

Storage (buffers, all saved to safetensors; the router, norms and everything else stay float32):
    int8     {m}_q int8 [E, K, N], {m}_scale float32 [E, 1, N]
    int4     {m}_q uint8 [E, K/2, N] (two nibbles), {m}_scale float16 / {m}_zero uint8 [E, K/G, N]
    ternary  {m}_codes int16 (uint16 codewords), {m}_offsets int64 [E + 1] (codeword range of each
             expert), {m}_lo / {m}_hi float16 [E, N] (row grids), code_counts int64 [9] (the
             dictionary, rebuilt on load)
for m in (w_in [E, D, H], w_out [E, F, D]); expert biases, if any, stay float32.

Shape legend: E experts, D model dim, F expert hidden dim, H = 2F (GLU) or F, K/N a matrix's
inputs/outputs, N rows (in forward), G int4 groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from moekit.compress.codec import TunstallCode, pair_symbols, unpair_symbols
from moekit.compress.intquant import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize
from moekit.compress.surgery import moe_layers_named
from moekit.compress.ternary import ternary_values
from moekit.moe.activations import apply_activation
from moekit.moe.experts import ExpertBank
from moekit.moe.grouped import GroupPlan

METHODS = ("int8", "int4", "ternary")
MATRICES = ("w_in", "w_out")
FIELDS = {
    "int8": ("q", "scale"),
    "int4": ("q", "scale", "zero"),
    "ternary": ("codes", "offsets", "lo", "hi"),
}


class QuantizedExpertBank(nn.Module):
    """E experts held quantized; computes like `ExpertBank` from the dequantized weights."""

    def __init__(
        self,
        method: str,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: str,
        is_glu: bool,
        tensors: dict[str, Tensor],
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown quantization method {method!r}: expected one of {list(METHODS)}")
        self.method, self.num_experts, self.dim, self.hidden_dim = method, num_experts, dim, hidden_dim
        self.activation, self.is_glu = activation, is_glu
        self.meta = dict(meta or {})
        names = [f"{m}_{f}" for m in MATRICES for f in FIELDS[method]]
        names += ["code_counts"] if method == "ternary" else []
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{method} expert bank: missing tensors {missing}")
        for name in names + [b for b in ("b_in_EF", "b_out_ED") if b in tensors]:
            self.register_buffer(name, tensors[name])
        self.has_bias = "b_in_EF" in tensors
        self.cache_decoded = False  # ternary: keep decoded symbols (speed over memory)
        self._decoded: dict[tuple[str, int], Tensor] = {}
        self._code: TunstallCode | None = None

    # ------------------------------------------------------------------ shapes and building
    def matrix_shape(self, matrix: str) -> tuple[int, int]:
        """(K inputs, N outputs) of one expert's matrix."""
        hidden_in = 2 * self.hidden_dim if self.is_glu else self.hidden_dim
        return (self.dim, hidden_in) if matrix == "w_in" else (self.hidden_dim, self.dim)

    @classmethod
    def from_bank(cls, bank: ExpertBank, method: str, group_size: int = 32) -> QuantizedExpertBank:
        """int8 or int4 round-to-nearest quantization of a float bank."""
        if method not in ("int8", "int4"):
            raise ValueError(f"from_bank quantizes int8 or int4, not {method!r} (ternary needs calibration)")
        tensors: dict[str, Tensor] = {}
        for m, w in (("w_in", bank.w_in_EDF), ("w_out", bank.w_out_EFD)):
            q = int8_quantize(w.detach()) if method == "int8" else int4_quantize(w.detach(), group_size)
            tensors.update({f"{m}_{k}": v for k, v in q.items()})
        meta = {"group_size": group_size} if method == "int4" else {}
        return cls._like(bank, method, tensors, meta)

    @classmethod
    def from_ternary(
        cls,
        bank: ExpertBank,
        symbols: dict[str, Tensor],
        levels: dict[str, tuple[Tensor, Tensor]],
        code_bits: int = 16,
    ) -> QuantizedExpertBank:
        """Code ternary symbols [E, N, K] (one grid (lo, hi) [E, N] per output row) of both matrices."""
        pairs = {m: [pair_symbols(symbols[m][e]) for e in range(bank.num_experts)] for m in MATRICES}
        counts = torch.bincount(torch.cat([p.long() for m in MATRICES for p in pairs[m]]), minlength=9)
        code = TunstallCode(counts.tolist(), code_bits)
        tensors: dict[str, Tensor] = {"code_counts": counts}
        for m in MATRICES:
            codes = [code.encode(p) for p in pairs[m]]
            tensors[f"{m}_codes"] = torch.cat(codes)
            tensors[f"{m}_offsets"] = torch.tensor([0] + [c.numel() for c in codes]).cumsum(0)
            tensors[f"{m}_lo"], tensors[f"{m}_hi"] = (x.half() for x in levels[m])
        return cls._like(bank, "ternary", tensors, {"code_bits": code_bits})

    @classmethod
    def _like(
        cls, bank: ExpertBank, method: str, tensors: dict[str, Tensor], meta: dict
    ) -> QuantizedExpertBank:
        if bank.b_in_EF is not None:
            tensors["b_in_EF"], tensors["b_out_ED"] = (
                bank.b_in_EF.detach().clone(),
                bank.b_out_ED.detach().clone(),
            )
        return cls(
            method, bank.num_experts, bank.dim, bank.hidden_dim, bank.activation, bank.is_glu, tensors, meta
        )

    # ------------------------------------------------------------------ dequantization
    @property
    def code(self) -> TunstallCode:
        if self._code is None:
            self._code = TunstallCode(self.code_counts.tolist(), int(self.meta.get("code_bits", 16)))
        return self._code

    def ternary_symbols(self, matrix: str, e: int) -> Tensor:
        """int8 symbols [N, K] of expert e's matrix, decoded from its codewords."""
        key = (matrix, e)
        if key in self._decoded:
            return self._decoded[key]
        k, n = self.matrix_shape(matrix)
        offsets = getattr(self, f"{matrix}_offsets")
        codes = getattr(self, f"{matrix}_codes")[int(offsets[e]) : int(offsets[e + 1])]
        pairs = self.code.decode(codes.cpu(), math.ceil(n * k / 2))
        sym = unpair_symbols(pairs, n * k).view(n, k).to(codes.device)
        if self.cache_decoded:
            self._decoded[key] = sym
        return sym

    def weight(self, matrix: str, e: int) -> Tensor:
        """Expert e's dequantized matrix [K, N] in float32."""
        if self.method == "ternary":
            sym_NK = self.ternary_symbols(matrix, e)
            lo, hi = getattr(self, f"{matrix}_lo")[e].float(), getattr(self, f"{matrix}_hi")[e].float()
            return ternary_values(sym_NK, lo, hi).t()
        fields = {f: getattr(self, f"{matrix}_{f}") for f in FIELDS[self.method]}
        return int8_dequantize(fields, e) if self.method == "int8" else int4_dequantize(fields, e)

    def dequantized(self) -> ExpertBank:
        """A float ExpertBank holding exactly the dequantized weights (the reference)."""
        bank = ExpertBank(
            self.num_experts, self.dim, self.hidden_dim, self.activation, self.has_bias, is_glu=self.is_glu
        )
        with torch.no_grad():
            for e in range(self.num_experts):
                bank.w_in_EDF[e] = self.weight("w_in", e)
                bank.w_out_EFD[e] = self.weight("w_out", e)
            if self.has_bias:
                bank.b_in_EF.copy_(self.b_in_EF)
                bank.b_out_ED.copy_(self.b_out_ED)
        return bank.eval()

    # ------------------------------------------------------------------ compute
    def forward(self, x_ND: Tensor, counts: Sequence[int]) -> Tensor:
        """Rows of x_ND sorted by expert, `counts[e]` rows for expert e -> [N, D]."""
        plan = GroupPlan.from_counts(counts)
        if plan.num_rows > x_ND.shape[0]:
            raise ValueError(
                f"QuantizedExpertBank: counts sum to {plan.num_rows} rows but x has {x_ND.shape[0]}"
            )
        y_ND = x_ND.new_zeros(x_ND.shape[0], self.dim)
        for e, start, end in plan.bounds:
            h = x_ND[start:end] @ self.weight("w_in", e).to(x_ND.dtype)  # [n, H]
            if self.has_bias:
                h = h + self.b_in_EF[e].to(h.dtype)
            a = apply_activation(self.activation, h, self.is_glu)  # [n, F]
            y = a @ self.weight("w_out", e).to(a.dtype)  # [n, D]
            if self.has_bias:
                y = y + self.b_out_ED[e].to(y.dtype)
            y_ND[start:end] = y
        return y_ND

    # ------------------------------------------------------------------ accounting
    def storage_bits(self) -> dict[str, float]:
        """Bits stored for the expert weights, and per expert weight (codewords at code_bits each)."""
        params = sum(self.num_experts * k * n for k, n in map(self.matrix_shape, MATRICES))
        bits = 0
        for name, buf in self.named_buffers():
            if name.startswith(("b_in", "b_out")):
                continue  # float biases: not expert weights
            per = int(self.meta.get("code_bits", 16)) if name.endswith("_codes") else buf.element_size() * 8
            bits += buf.numel() * per
        return {"params": params, "bits": bits, "bits_per_param": bits / params}

    def extra_repr(self) -> str:
        return f"{self.method}, experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}"


def install_quantized_banks(model: nn.Module, model_file: str | Path, quantization: dict[str, Any]) -> None:
    """Replace every MoE layer's float bank by the quantized bank stored in `model_file` (loading)."""
    from moekit.train.checkpoint import CheckpointError

    method = quantization.get("method")
    if method not in METHODS:
        raise CheckpointError(
            f"{str(model_file)!r}: config.json quantization.method={method!r} is unknown: "
            f"expected one of {list(METHODS)}"
        )
    try:
        with safe_open(str(model_file), framework="pt") as f:
            keys = list(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
            for prefix, layer in moe_layers_named(model):
                head = f"{prefix}.experts."
                tensors = {k[len(head) :]: f.get_tensor(k) for k in keys if k.startswith(head)}
                bank = layer.experts
                layer.experts = QuantizedExpertBank(
                    method,
                    bank.num_experts,
                    bank.dim,
                    bank.hidden_dim,
                    bank.activation,
                    bank.is_glu,
                    tensors,
                    quantization,
                )
    except (ValueError, OSError, RuntimeError) as exc:  # a corrupt file, or tensors of another format
        raise CheckpointError(
            f"{str(model_file)!r} does not hold {method} experts for this model: {exc}"
        ) from exc
