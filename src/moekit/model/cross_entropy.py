"""The LM head and its cross-entropy in one pass over row chunks, without the `[N, V]` logits.

The plain way, `F.cross_entropy(h @ W^T, targets)`, writes the logits, their log-softmax, and in
the backward a gradient of the same size, each `[N, V]` float32: 3 x 32 MiB for 2048 tokens over
a 4096-word vocabulary, 3 x 1.2 GiB over Qwen's 151,936 words. Each is written to memory and read
back by the next step. Here the rows go through in chunks (Liger-Kernel's fused linear
cross-entropy does the same on GPUs): a chunk's logits (8 MiB for 512 rows of 4096 words) are
reused while their log-sum-exp, their loss and, when a gradient is wanted, their gradient
`p = softmax - onehot` are computed in place,
and the two products that consume `p` (dL/dh = p W and dL/dW += p^T h) run right away. The forward
therefore computes the gradients, which the backward only scales by the incoming gradient (1 for
a loss that is backpropagated directly). Only `dL/dh [N, D]` and `dL/dW [V, D]` outlive the call.

The loss is the mean over the targets that are not `ignore_index`, in float32 whatever the dtype of
h and W, as `F.cross_entropy(logits.float(), targets, ignore_index=...)`; the logits themselves are
computed in the inputs' dtype, as `nn.Linear` would.

Shape legend: N rows (tokens), D model dim, V vocabulary, C rows of a chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from moekit.model.layers import linear
from moekit.moe import native
from moekit.moe.memory import gradient_buffer

IGNORE_INDEX = -100

# Rows per chunk: at least MIN_CHUNK_ROWS, so that the products keep their speed (every chunk also
# reads and writes all of dL/dW, [V, D]), and more for small vocabularies, up to CHUNK_BYTES of
# float32 logits. Measured at 2048 x 256 (forward+backward vs the plain way): 4096 words, chunks of
# 256 / 512 / 1024 rows 105 / 94 / 95 ms (plain 148); 32,000 words, chunks of 32 / 128 / 256 / 512 /
# 1024 rows 1562 / 943 / 824 / 810 / 790 ms (plain 1080-1239).
CHUNK_BYTES = 4 << 20
MIN_CHUNK_ROWS = 512


def chunk_rows(num_rows: int, vocab: int) -> int:
    return max(1, min(num_rows, max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab))))


def _chunk_logits(h_CD: Tensor, weight_VD: Tensor, bias_V: Tensor | None) -> Tensor:
    """[C, V] float32 logits of a chunk, computed in the inputs' dtype (as nn.Linear)."""
    logits_CV = h_CD @ weight_VD.t()
    if bias_V is not None:
        logits_CV += bias_V
    return logits_CV.float()


def _forward(
    h_ND: Tensor, weight_VD: Tensor, bias_V: Tensor | None, targets_N: Tensor, ignore_index: int, grads: bool
):
    """(loss, dL/dh, dL/dW, dL/db): the gradients only with `grads`, else None."""
    num_rows, vocab = h_ND.shape[0], weight_VD.shape[0]
    valid_N = targets_N != ignore_index
    count = int(valid_N.sum())  # one host read: the mean's denominator
    grad_h = grad_w = grad_b = None
    if grads:
        grad_h = torch.empty_like(h_ND)
        if weight_VD.dtype == torch.float32:  # (memory kept from the last step's gradient, see memory.py)
            grad_w, _ = gradient_buffer(weight_VD)
        else:  # accumulated over the chunks in float32, cast once in the backward
            grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)
        grad_b = None if bias_V is None else torch.zeros(vocab, dtype=torch.float32, device=h_ND.device)
    rows = chunk_rows(num_rows, vocab)
    scale = 1.0 / count if count else float("nan")  # no target at all: nan, as F.cross_entropy
    if native.applies_cross_entropy(h_ND, weight_VD, bias_V, rows):
        # CPU float32: the same chunks, each thread on its own rows with its own dL/dW (native.py)
        out = dict(h=grad_h, w=grad_w, b=grad_b) if grads else None
        loss_sum = native.linear_cross_entropy(
            h_ND, weight_VD, bias_V, targets_N, ignore_index, scale, out, rows
        )
        return torch.tensor(loss_sum * scale, dtype=torch.float32), grad_h, grad_w, grad_b
    safe_N = torch.where(valid_N, targets_N, 0)  # gather-able targets; invalid rows are masked below
    loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    for start in range(0, num_rows, rows):
        end = min(start + rows, num_rows)
        h_CD = h_ND[start:end]
        logits_CV = _chunk_logits(h_CD, weight_VD, bias_V)
        valid_C1, safe_C1 = valid_N[start:end, None], safe_N[start:end, None]
        target_logit_C1 = logits_CV.gather(1, safe_C1)
        max_C1 = logits_CV.amax(dim=1, keepdim=True)
        p_CV = logits_CV.sub_(max_C1).exp_()  # in place: the logits are not needed any more
        sum_C1 = p_CV.sum(dim=1, keepdim=True)
        lse_C1 = sum_C1.log().add_(max_C1)
        loss_sum += (lse_C1 - target_logit_C1).masked_fill_(~valid_C1, 0.0).sum()
        if not grads:
            continue
        # dL/dlogits = (softmax - onehot) / count on valid rows, 0 on ignored ones: in place
        weight_C1 = torch.where(valid_C1, scale, 0.0)
        p_CV.mul_(weight_C1 / sum_C1)
        p_CV.scatter_add_(1, safe_C1, -weight_C1)
        p_in = p_CV.to(weight_VD.dtype)
        torch.mm(p_in, weight_VD, out=grad_h[start:end])  # [C, V] @ [V, D]
        if grad_w.dtype != weight_VD.dtype:
            grad_w += p_in.t() @ h_CD
        elif start == 0:
            torch.mm(p_in.t(), h_CD, out=grad_w)  # [V, C] @ [C, D]
        else:
            grad_w.addmm_(p_in.t(), h_CD)
        if grad_b is not None:
            grad_b += p_CV.sum(0)
    if grads and num_rows == 0:
        grad_w.zero_()
    return loss_sum * scale, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, bias_V, targets_N, ignore_index):  # type: ignore[override]
        loss, grad_h, grad_w, grad_b = _forward(h_ND, weight_VD, bias_V, targets_N, ignore_index, grads=True)
        ctx.dtypes = (h_ND.dtype, weight_VD.dtype, None if bias_V is None else bias_V.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        one = grad_loss.device.type == "cpu" and float(grad_loss) == 1.0  # the usual loss.backward()

        def scaled(grad: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
            if grad is None:
                return None
            return (grad if one else grad * grad_loss).to(dtype)

        needs = ctx.needs_input_grad
        return (
            scaled(grad_h, h_dtype) if needs[0] else None,
            scaled(grad_w, w_dtype) if needs[1] else None,
            scaled(grad_b, b_dtype) if needs[2] else None,
            None,
            None,
        )


def linear_cross_entropy(
    h_ND: Tensor, weight_VD: Tensor, bias_V: Tensor | None, targets_N: Tensor, ignore_index: int = -100
) -> Tensor:
    """Mean cross-entropy of the logits `h @ W^T + b` against `targets` (entries equal to
    `ignore_index` left out), without materializing the logits. h [N, D], W [V, D], b [V] or None,
    targets [N] int. Differentiable in h, W and b."""
    if h_ND.dim() != 2 or weight_VD.dim() != 2 or h_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: expected h [N, D] and weight [V, D], got {tuple(h_ND.shape)} and "
            f"{tuple(weight_VD.shape)}"
        )
    if targets_N.dtype.is_floating_point or targets_N.dtype.is_complex or targets_N.dtype == torch.bool:
        raise ValueError(
            f"linear_cross_entropy: targets must be integer class ids, got dtype {targets_N.dtype}"
        )
    if targets_N.shape != h_ND.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: targets of shape {tuple(targets_N.shape)} for {h_ND.shape[0]} rows"
        )
    bad = (targets_N != ignore_index) & ((targets_N < 0) | (targets_N >= weight_VD.shape[0]))
    if bool(bad.any()):
        value = int(targets_N[bad][0])
        raise ValueError(
            f"linear_cross_entropy: target {value} out of range: expected 0..{weight_VD.shape[0] - 1} "
            f"or ignore_index={ignore_index}"
        )
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h_ND, weight_VD, bias_V)
    )
    if wants_grad:
        return _LinearCrossEntropy.apply(h_ND, weight_VD, bias_V, targets_N, ignore_index)
    return _forward(h_ND, weight_VD, bias_V, targets_N, ignore_index, grads=False)[0]


def lm_loss(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    """Mean token cross-entropy in float32 of materialized logits; targets equal to -100 are ignored."""
    return F.cross_entropy(
        logits_BSV.float().reshape(-1, logits_BSV.shape[-1]),
        targets_BS.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


@dataclass
class LogitsOutput:
    """Base of the models' outputs: `[B, S, V]` logits read as `.logits`. A call with targets that
    computed its cross-entropy without them (`head_and_loss`) leaves the function computing them
    when first read."""

    logits_or_fn: Tensor | Callable[[], Tensor]

    @property
    def logits(self) -> Tensor:
        if callable(self.logits_or_fn):
            self.logits_or_fn = self.logits_or_fn()
        return self.logits_or_fn


def head_and_loss(
    head: nn.Module, h_BSD: Tensor, targets_BS: Tensor | None, fused: bool
) -> tuple[Tensor | Callable[[], Tensor], Tensor | None]:
    """(logits or the function computing them, mean cross-entropy or None) of the LM head `head` on
    the final hidden states. With targets and `fused` (a plain nn.Linear head), the loss comes from
    `linear_cross_entropy` and the logits are left to be computed when read."""
    if targets_BS is None:
        return linear(head, h_BSD), None
    if fused and type(head) is nn.Linear:
        ce_loss = linear_cross_entropy(
            h_BSD.reshape(-1, h_BSD.shape[-1]), head.weight, head.bias, targets_BS.reshape(-1), IGNORE_INDEX
        )
        return functools.partial(linear, head, h_BSD), ce_loss
    logits_BSV = linear(head, h_BSD)
    return logits_BSV, lm_loss(logits_BSV, targets_BS)
