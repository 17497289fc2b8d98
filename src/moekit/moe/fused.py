"""The expert bank's whole computation, forward and backward, one row block at a time.

`ExpertBank` runs `y = act(x W_in [+ b_in]) W_out [+ b_out]` on rows sorted by expert. Done as
separate whole-tensor steps (two grouped products and an activation traced by autograd), every
step writes and rereads `[N, 2F]` or `[N, F]` tensors far larger than the caches, and autograd
keeps several of them alive. On CPU each fresh allocation above glibc's mmap threshold (32 MiB at
most) also pays a page fault per 4 KiB page on first touch, which costs as much as the copy itself.

Here the rows are cut into blocks of a few MiB of hidden activations (`GroupPlan.blocks`): a block
runs its up-projection GEMMs, its activation and its down-projection GEMMs while its hidden rows
are still in cache, in buffers reused from block to block. For autograd only the input rows and
the pre-activation hidden `h = x W_in + b_in` are saved; the backward recomputes the activation
per block (elementwise, cheap) and fuses the activation's backward between the two GEMMs. Weight
gradients accumulate over the blocks of an expert; experts without rows get exact zeros.

Shape legend: N sorted rows, D model dim, F expert hidden dim, H = 2F for GLU else F, E experts,
R rows of a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.moe.activations import activation_backward, activation_into
from moekit.moe.grouped import GroupPlan, mm_groups, weight_grad_groups, zero_untouched

# Hidden activations per block: large enough for GEMMs at full speed, small enough for the caches.
DEFAULT_BLOCK_BYTES = 8 << 20


@dataclass(frozen=True)
class ExpertSpec:
    activation: str
    is_glu: bool
    strategy: str  # grouped product strategy, see grouped.py
    block_bytes: int

    def block_rows(self, hidden: int, element_size: int) -> int:
        return max(1, self.block_bytes // max(1, hidden * element_size))


def _add_group_bias(rows: Tensor, bias_E: Tensor | None, plan: GroupPlan) -> None:
    if bias_E is not None:
        for e, s, t in plan.bounds:
            rows[s:t] += bias_E[e]


def expert_rows_forward(
    x_ND: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    b_in_EH: Tensor | None,
    b_out_ED: Tensor | None,
    plan: GroupPlan,
    spec: ExpertSpec,
    save_hidden: bool,
) -> tuple[Tensor, Tensor | None]:
    """-> (y [N, D], pre-activation hidden [N, H] when save_hidden else None), no autograd."""
    num_rows, hidden_in = x_ND.shape[0], w_in_EDH.shape[-1]
    y_ND = x_ND.new_empty(num_rows, w_out_EFD.shape[-1])
    if plan.num_rows < num_rows:  # rows past the last group (none in normal use) are zero
        y_ND[plan.num_rows :].zero_()
    blocks = plan.blocks(spec.block_rows(hidden_in, x_ND.element_size()))
    if not blocks:
        return y_ND, (x_ND.new_zeros(num_rows, hidden_in) if save_hidden else None)
    rows = max(end - start for start, end, _ in blocks)
    h_NH = x_ND.new_empty(num_rows, hidden_in) if save_hidden else None
    h_buf_RH = None if save_hidden else x_ND.new_empty(rows, hidden_in)
    a_buf_RF = x_ND.new_empty(rows, w_out_EFD.shape[1])
    for start, end, block in blocks:
        h_RH = h_NH[start:end] if h_NH is not None else h_buf_RH[: end - start]
        mm_groups(x_ND[start:end], w_in_EDH, block, h_RH, spec.strategy)
        _add_group_bias(h_RH, b_in_EH, block)
        a_RF = activation_into(spec.activation, spec.is_glu, h_RH, a_buf_RF[: end - start])
        mm_groups(a_RF, w_out_EFD, block, y_ND[start:end], spec.strategy)
        _add_group_bias(y_ND[start:end], b_out_ED, block)
    if h_NH is not None and plan.num_rows < num_rows:
        h_NH[plan.num_rows :].zero_()
    return y_ND, h_NH


def expert_tokens_forward(
    x_TD: Tensor,
    token_N: Tensor,
    weight_N: Tensor,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    b_in_EH: Tensor | None,
    b_out_ED: Tensor | None,
    plan: GroupPlan,
    spec: ExpertSpec,
) -> Tensor:
    """Inference: out_TD[t] = sum over t's rows n of weight_N[n] * expert(x_TD[t]), no autograd.

    Dispatch, experts and combine fused per row block: a block gathers its tokens' rows into a
    small buffer, runs its experts and scatter-adds the weighted results into the output, so no
    [N, D] tensor of routed rows (K copies of the input) is ever allocated.
    """
    num_tokens, dim = x_TD.shape
    out_TD = x_TD.new_zeros(num_tokens, w_out_EFD.shape[-1])
    blocks = plan.blocks(spec.block_rows(w_in_EDH.shape[-1], x_TD.element_size()))
    if not blocks:
        return out_TD
    rows = max(end - start for start, end, _ in blocks)
    x_buf_RD = x_TD.new_empty(rows, dim)
    h_buf_RH = x_TD.new_empty(rows, w_in_EDH.shape[-1])
    a_buf_RF = x_TD.new_empty(rows, w_out_EFD.shape[1])
    y_buf_RD = x_TD.new_empty(rows, w_out_EFD.shape[-1])
    weight_N = weight_N.to(x_TD.dtype)
    for start, end, block in blocks:
        r = end - start
        x_RD = torch.index_select(x_TD, 0, token_N[start:end], out=x_buf_RD[:r])
        h_RH = mm_groups(x_RD, w_in_EDH, block, h_buf_RH[:r], spec.strategy)
        _add_group_bias(h_RH, b_in_EH, block)
        a_RF = activation_into(spec.activation, spec.is_glu, h_RH, a_buf_RF[:r])
        y_RD = mm_groups(a_RF, w_out_EFD, block, y_buf_RD[:r], spec.strategy)
        _add_group_bias(y_RD, b_out_ED, block)
        out_TD.index_add_(0, token_N[start:end], y_RD.mul_(weight_N[start:end, None]))
    return out_TD


class FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, plan: GroupPlan, spec: ExpertSpec):  # type: ignore[override]
        y_ND, h_NH = expert_rows_forward(
            x_ND, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, plan, spec, save_hidden=True
        )
        ctx.plan, ctx.spec = plan, spec
        ctx.has_bias = (b_in_EH is not None, b_out_ED is not None)
        ctx.save_for_backward(x_ND, w_in_EDH, w_out_EFD, h_NH)
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_ND: Tensor):  # type: ignore[override]
        x_ND, w_in_EDH, w_out_EFD, h_NH = ctx.saved_tensors
        plan: GroupPlan = ctx.plan
        spec: ExpertSpec = ctx.spec
        need_x, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:5]
        grad_y_ND = grad_y_ND.contiguous()
        num_rows, num_experts = x_ND.shape[0], w_in_EDH.shape[0]
        hidden_in, hidden = w_in_EDH.shape[-1], w_out_EFD.shape[1]

        grad_x = x_ND.new_zeros(x_ND.shape) if need_x and plan.num_rows < num_rows else None
        if need_x and grad_x is None:
            grad_x = x_ND.new_empty(x_ND.shape)
        grad_w_in = w_in_EDH.new_empty(w_in_EDH.shape) if need_w_in else None
        grad_w_out = w_out_EFD.new_empty(w_out_EFD.shape) if need_w_out else None
        grad_b_in = h_NH.new_zeros(num_experts, hidden_in) if need_b_in else None
        grad_b_out = grad_y_ND.new_zeros(num_experts, grad_y_ND.shape[1]) if need_b_out else None
        touched_in, touched_out = [False] * num_experts, [False] * num_experts

        blocks = plan.blocks(spec.block_rows(hidden_in, x_ND.element_size()))
        rows = max((end - start for start, end, _ in blocks), default=0)
        grad_a_buf = x_ND.new_empty(rows, hidden)
        a_buf = x_ND.new_empty(rows, hidden)
        work_buf = x_ND.new_empty(rows, hidden)
        grad_h_buf = x_ND.new_empty(rows, hidden_in)
        for start, end, block in blocks:
            r = end - start
            grad_y_RD, h_RH = grad_y_ND[start:end], h_NH[start:end]
            grad_a_RF = mm_groups(grad_y_RD, w_out_EFD.transpose(1, 2), block, grad_a_buf[:r], spec.strategy)
            grad_h_RH = grad_h_buf[:r]
            activation_backward(
                spec.activation, spec.is_glu, h_RH, grad_a_RF, a_buf[:r], grad_h_RH, work_buf[:r]
            )
            if need_w_out:
                weight_grad_groups(a_buf[:r], grad_y_RD, block, grad_w_out, touched_out)
            if need_w_in:
                weight_grad_groups(x_ND[start:end], grad_h_RH, block, grad_w_in, touched_in)
            for e, s, t in block.bounds:
                if need_b_in:
                    grad_b_in[e] += grad_h_RH[s:t].sum(0)
                if need_b_out:
                    grad_b_out[e] += grad_y_RD[s:t].sum(0)
            if need_x:
                mm_groups(grad_h_RH, w_in_EDH.transpose(1, 2), block, grad_x[start:end], spec.strategy)
        if need_w_in:
            zero_untouched(grad_w_in, touched_in)
        if need_w_out:
            zero_untouched(grad_w_out, touched_out)
        return grad_x, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None
