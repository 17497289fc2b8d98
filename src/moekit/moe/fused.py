"""The experts' whole computation, forward and backward, one row block at a time.

An expert bank runs `y = act(x W_in [+ b_in]) W_out [+ b_out]` on rows sorted by expert. Done as
separate whole-tensor steps (grouped products and an activation traced by autograd), every step
writes and rereads `[N, 2F]` or `[N, F]` tensors far larger than the caches, and autograd keeps
several of them alive. On CPU each fresh allocation above glibc's mmap threshold (32 MiB at most)
also pays a page fault per 4 KiB page on first touch, which costs as much as the copy itself.

Here the rows are cut into blocks of a few MiB of hidden activations (`GroupPlan.blocks`): a block
runs its up-projection GEMMs, its activation and its down-projection GEMMs while its hidden rows
are still in cache, in buffers reused from block to block. For autograd only the pre-activation
hidden `h = x W_in + b_in` is saved; the backward recomputes the activation per block
(elementwise, cheap) and fuses the activation's backward between the GEMMs. Weight gradients
accumulate over the blocks of an expert; experts without rows get exact zeros.

Two ways in, one implementation (`FusedExperts`):
  - rows: `x` is already `[N, D]` in expert order (what `ExpertBank.forward` gets from any
    dispatcher), the output is `[N, D]`;
  - tokens: `x` is the layer input `[T, D]` plus `token_N` and `weight_N`; a block gathers its
    tokens' rows into a buffer, and its weighted outputs are scatter-added into `[T, D]`. Dispatch
    and combine are then part of the block loop: no `[N, D]` copy of the input, of the expert
    outputs or of their gradients is ever made. The combine weight's gradient comes for free:
    <dL/dout_t, y_n> = <(dL/dout_t) W_out^T, a_n> (+ bias term), both computed in the backward anyway.

Shape legend: T tokens, N sorted rows, D model dim, F expert hidden dim, H = 2F for GLU else F,
E experts, R rows of a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moekit.moe import native
from moekit.moe.activations import activation_backward, activation_into
from moekit.moe.grouped import GroupPlan, mm_groups, weight_grad_groups, zero_untouched
from moekit.moe.memory import gradient_buffer, kept_buffer, scratch

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


def _blocks(plan: GroupPlan, spec: ExpertSpec, hidden_in: int, element_size: int):
    blocks = plan.blocks(spec.block_rows(hidden_in, element_size))
    return blocks, max((end - start for start, end, _ in blocks), default=0)


def experts_forward(
    x: Tensor,
    token_N: Tensor | None,
    weight_N: Tensor | None,
    w_in_EDH: Tensor,
    w_out_EFD: Tensor,
    b_in_EH: Tensor | None,
    b_out_ED: Tensor | None,
    plan: GroupPlan,
    spec: ExpertSpec,
    save_hidden: bool,
) -> tuple[Tensor, Tensor | None]:
    """No autograd. Rows mode (token_N None): x [N, D] -> y [N, D]; tokens mode: x [T, D] -> out
    [T, D] with out[t] = sum over t's rows n of weight_N[n] * y_n. Also returns the pre-activation
    hidden [N, H] when save_hidden (else None).

    Tokens mode with strategy "auto" runs the native kernels instead where they apply (native.py):
    every expert in one call; under autograd (save_hidden) the many-row regime only."""
    hidden_in, dim_out = w_in_EDH.shape[-1], w_out_EFD.shape[-1]
    num_rows = x.shape[0] if token_N is None else token_N.shape[0]
    h_NH = None
    if save_hidden:  # memory kept from the last step's once its backward freed it (memory.py)
        h_NH, _ = kept_buffer(w_in_EDH, "hidden", (num_rows, hidden_in), x)
        if plan.num_rows < num_rows:  # rows past the last group (none normally)
            h_NH[plan.num_rows :].zero_()
    if token_N is not None:
        bank = native.Experts(w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, spec.activation, spec.is_glu)
        applies = native.applies_training if save_hidden else native.applies
        if applies(x, bank, plan.num_rows, len(plan.bounds), spec.strategy):
            return native.sorted_rows(x, token_N, weight_N, plan, bank, h_NH), h_NH
    out = x.new_zeros(x.shape[0], dim_out) if token_N is not None or plan.num_rows < num_rows else None
    out = x.new_empty(num_rows, dim_out) if out is None else out
    blocks, rows = _blocks(plan, spec, hidden_in, x.element_size())
    shapes = [(rows, w_out_EFD.shape[1])] + ([] if save_hidden else [(rows, hidden_in)])
    if token_N is not None:
        shapes += [(rows, x.shape[1]), (rows, dim_out)]
        weight_N = weight_N.to(x.dtype)
    a_buf, *more = scratch(x, *shapes)
    h_buf = None if save_hidden else more.pop(0)
    x_buf, y_buf = more if token_N is not None else (None, None)
    for start, end, block in blocks:
        r = end - start
        if token_N is None:
            x_RD = x[start:end]
        else:
            x_RD = torch.index_select(x, 0, token_N[start:end], out=x_buf[:r])
        h_RH = h_NH[start:end] if h_NH is not None else h_buf[:r]
        mm_groups(x_RD, w_in_EDH, block, h_RH, spec.strategy)
        _add_group_bias(h_RH, b_in_EH, block)
        a_RF = activation_into(spec.activation, spec.is_glu, h_RH, a_buf[:r])
        y_RD = mm_groups(
            a_RF, w_out_EFD, block, out[start:end] if token_N is None else y_buf[:r], spec.strategy
        )
        _add_group_bias(y_RD, b_out_ED, block)
        if token_N is not None:
            out.index_add_(0, token_N[start:end], y_RD.mul_(weight_N[start:end, None]))
    return out, h_NH


class FusedExperts(torch.autograd.Function):
    """Autograd for `experts_forward` (either mode); see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight_N, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, token_N, plan, spec):  # type: ignore[override]
        out, h_NH = experts_forward(
            x, token_N, weight_N, w_in_EDH, w_out_EFD, b_in_EH, b_out_ED, plan, spec, save_hidden=True
        )
        ctx.plan, ctx.spec = plan, spec
        ctx.save_for_backward(x, weight_N, w_in_EDH, w_out_EFD, b_out_ED, token_N, h_NH)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight_N, w_in_EDH, w_out_EFD, b_out_ED, token_N, h_NH = ctx.saved_tensors
        plan: GroupPlan = ctx.plan
        spec: ExpertSpec = ctx.spec
        need_x, need_weight, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
        grad_out = grad_out.contiguous()
        tokens = token_N is not None
        num_experts, hidden_in, hidden = w_in_EDH.shape[0], w_in_EDH.shape[-1], w_out_EFD.shape[1]
        dim_in, dim_out = x.shape[1], w_out_EFD.shape[-1]

        grad_x = None
        if need_x:  # rows past the last group and tokens without rows get zeros
            grad_x = x.new_zeros(x.shape) if tokens or plan.num_rows < x.shape[0] else x.new_empty(x.shape)
        grad_weight = x.new_empty(weight_N.shape) if tokens and need_weight else None
        grad_w_in, reused_in = gradient_buffer(w_in_EDH) if need_w_in else (None, False)
        grad_w_out, reused_out = gradient_buffer(w_out_EFD) if need_w_out else (None, False)
        grad_b_in = h_NH.new_zeros(num_experts, hidden_in) if need_b_in else None
        grad_b_out = grad_out.new_zeros(num_experts, dim_out) if need_b_out else None
        touched_in, touched_out = [False] * num_experts, [False] * num_experts

        bank = native.Experts(w_in_EDH, w_out_EFD, None, b_out_ED, spec.activation, spec.is_glu)
        if tokens and native.applies_training(x, bank, plan.num_rows, len(plan.bounds), spec.strategy):
            # the many-row kernel's backward: the same products, per-thread GEMMs (native.py)
            grads = dict(
                x=grad_x,
                weight=grad_weight,
                w_in=grad_w_in,
                w_out=grad_w_out,
                b_in=grad_b_in,
                b_out=grad_b_out,
            )
            native.sorted_rows_backward(x, token_N, weight_N, plan, bank, h_NH, grad_out, grads)
            for e, s, t in plan.bounds:
                touched_in[e] = touched_out[e] = touched_in[e] or t > s
        else:
            blocks, rows = _blocks(plan, spec, hidden_in, x.element_size())
            shapes = [(rows, hidden)] * 3 + [(rows, hidden_in)]
            if tokens:
                shapes += [(rows, dim_in), (rows, dim_out), (rows, dim_in)]
                weight_R1 = weight_N.to(x.dtype)[:, None]
            grad_a_buf, a_buf, work_buf, grad_h_buf, *more = scratch(x, *shapes)
            x_buf, g_buf, dx_buf = more if tokens else (None, None, None)
            for start, end, block in blocks:
                r = end - start
                h_RH, grad_a_RF, a_RF = h_NH[start:end], grad_a_buf[:r], a_buf[:r]
                if tokens:  # dL/dy_n = w_n * dL/dout_t: gather dL/dout_t now, weight it after its use below
                    tok_R = token_N[start:end]
                    g_RD = torch.index_select(grad_out, 0, tok_R, out=g_buf[:r])
                else:
                    g_RD = grad_out[start:end]
                # u = g W_out^T; in tokens mode g is dL/dout_t, not yet weighted: dL/da = w_n u, and the
                # activation's backward is linear in dL/da, so it runs on u and its result is weighted after
                mm_groups(g_RD, w_out_EFD.transpose(1, 2), block, grad_a_RF, spec.strategy)  # [R, F]
                grad_h_RH = grad_h_buf[:r]
                activation_backward(
                    spec.activation, spec.is_glu, h_RH, grad_a_RF, a_RF, grad_h_RH, work_buf[:r]
                )
                if tokens:
                    if (
                        grad_weight is not None
                    ):  # dL/dw_n = <dL/dout_t, y_n> = <u, a_n> (+ <dL/dout_t, b_out>)
                        product_RF = torch.mul(grad_a_RF, a_RF, out=work_buf[:r])
                        torch.sum(product_RF, dim=1, out=grad_weight[start:end])
                        if b_out_ED is not None:
                            for e, s, t in block.bounds:
                                grad_weight[start + s : start + t] += g_RD[s:t] @ b_out_ED[e]
                    g_RD.mul_(weight_R1[start:end])
                    grad_h_RH.mul_(weight_R1[start:end])
                if need_w_out:
                    weight_grad_groups(a_RF, g_RD, block, grad_w_out, touched_out)
                for e, s, t in block.bounds:
                    if need_b_in:
                        grad_b_in[e] += grad_h_RH[s:t].sum(0)
                    if need_b_out:
                        grad_b_out[e] += g_RD[s:t].sum(0)
                if need_w_in:
                    x_RD = torch.index_select(x, 0, tok_R, out=x_buf[:r]) if tokens else x[start:end]
                    weight_grad_groups(x_RD, grad_h_RH, block, grad_w_in, touched_in)
                if need_x:
                    if tokens:
                        dx_RD = mm_groups(
                            grad_h_RH, w_in_EDH.transpose(1, 2), block, dx_buf[:r], spec.strategy
                        )
                        grad_x.index_add_(0, tok_R, dx_RD)
                    else:
                        mm_groups(
                            grad_h_RH, w_in_EDH.transpose(1, 2), block, grad_x[start:end], spec.strategy
                        )
        if need_w_in:
            zero_untouched(grad_w_in, touched_in, reused_in)
        if need_w_out:
            zero_untouched(grad_w_out, touched_out, reused_out)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_N.dtype)
        return grad_x, grad_weight, grad_w_in, grad_w_out, grad_b_in, grad_b_out, None, None, None
