"""Dense transformer pieces: RMSNorm, rotary embeddings, T5 relative position bias, grouped-query
attention, KV cache, dense FFN (SwiGLU or plain), and the pre-norm `Block` whose feed-forward is MoE
or dense.

Shape legend (names carry these suffixes, torchtitan style):
    B = batch, S = query length, T = key/value length (cache or encoder), D = model dim,
    H = query heads, G = key/value heads (GQA groups), K = head dim, F = FFN hidden dim, V = vocab

Rotary uses the half-split ("rotate_half") pairing of Hugging Face Llama/Mixtral: dimension j is
rotated together with j + K/2, so HF checkpoints load without permuting q/k weights.
Rotary encodes relative position only, so left padding (which shifts every real token of a row by
the same amount) does not change attention between real tokens and needs no per-row positions.
The T5 relative position bias (Switch Transformers) is relative too; it is added to the scores
through SDPA's float mask (`with_position_bias`).

Options of the Hugging Face decoder families live in `Attention` too, each off by default: an output
bias, q/k RMSNorm over each head or over the whole projection (OLMoE), q/k/v clipping (OLMoE),
learned attention sinks (GPT-OSS, `attention_with_sinks`) and sliding windows (masks built with
`sliding_window`). Multi-head latent attention (DeepSeek) is its own module, mla.py;
`build_attention` picks the one a config asks for.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from moekit.model.config import ModelConfig
from moekit.model.rope import rope_frequencies
from moekit.moe import MoE, MoEOutput, native
from moekit.moe.experts import ffn_activation, glu_activation

# One input row (a batch-1 decode step) through a weight of at least this many bytes: the two halves
# of its output rows go to the two threads as one bmm (MKL runs a one-row product on one thread).
ROW_SPLIT_MIN_BYTES = 1 << 20


def linear(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`lin(x)`, by moekit's GEMM for many rows on CPU, and with a faster way for a single row through a
    large `nn.Linear` on CPU without autograd.

    Many rows (a training step's, a prompt's: `native.applies_linear`) go to moekit's own GEMM
    (moe/csrc/gemm.c) split over torch's threads, with its own backward (`native.linear`): MKL ran
    the default model's attention projections ([2048, 256] x [256, 256] and their gradients) at about
    half a core's rate per thread.

    A batch-1 decode step multiplies one row by weights that the experts' stream has pushed out of
    the caches, and MKL runs a one-row product on one thread. For a large weight (the LM head) the
    two halves of the output rows go to the two threads as one bmm over a view of the weight: the
    4096x256 head took 358-369 us per decode step instead of 517-568 us here (each output is still
    one dot product of a row of the weight with x; the test checks the result against float64). Smaller weights (attention projections) gained nothing
    measurable and stay `lin(x)`, as does anything else (a LoRA or quantized replacement, several
    rows, autograd, other devices). The model's forward and its decode step both come here, so the
    two agree bit for bit.
    """
    if type(lin) is not nn.Linear or x.device.type != "cpu":
        return lin(x)
    weight, bias = lin.weight, lin.bias
    if x.numel() != x.shape[-1] and x.is_contiguous():  # (a decode step's one row skips this)
        x_ND = x.reshape(-1, x.shape[-1])
        if native.applies_linear(x_ND, weight, bias):  # many rows: moekit's GEMM
            return native.linear(x_ND, weight, bias).view(*x.shape[:-1], weight.shape[0])
    if torch.is_grad_enabled():
        return lin(x)
    out_features, in_features = weight.shape
    split = out_features % 2 == 0 and weight.numel() * weight.element_size() >= ROW_SPLIT_MIN_BYTES
    if not split or x.numel() != in_features or weight.dtype != x.dtype or torch.get_num_threads() < 2:
        return F.linear(x, weight, bias)
    halves_2DO = weight.view(2, out_features // 2, in_features).transpose(1, 2)  # a view, no copy
    y_O = torch.bmm(x.reshape(1, 1, in_features).expand(2, 1, in_features), halves_2DO).view(out_features)
    if bias is not None:
        y_O = y_O + bias
    return y_O.view(*x.shape[:-1], out_features)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # (each module attribute read costs a dict lookup chain: read once)
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                return _RMSNormFunction.apply(x, weight, self.eps)
            if native.applies_rows(x, weight):  # CPU: one pass per row in C, as in training
                return native.rms_norm(x, weight, self.eps, keep_r=False)[0]
            return F.rms_norm(x, weight.shape, weight, self.eps)  # one fused op (decode steps)
        x_f = x.float()
        y = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * weight.float()).type_as(x)


class _RMSNormFunction(torch.autograd.Function):
    """The inference path's output (the same op, so training and inference agree bit for bit) with a
    hand-written backward. With xh = x r, r = 1 / rms(x), g' = g w:
    dL/dx = r (g' - xh mean(g' xh)), dL/dw = sum over rows of g xh. On CPU float32 both directions
    run in C (moe/csrc/norms.c, one pass per row): 9 norms forward+backward at [2048, 256] (the
    default model's step) 9.1 vs 22.4 ms as torch ops (whose composite backward had taken 4.4 ms per
    norm before this hand-written one, 2.8 after)."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        if native.applies_rows(x, weight):
            y, r = native.rms_norm(x, weight, eps, keep_r=True)
            ctx.save_for_backward(x, weight, r)
            return y
        sum_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()
        r = sum_sq.div_(x.shape[-1]).add_(eps).rsqrt_()  # [..., 1]
        ctx.save_for_backward(x, weight, r)
        return F.rms_norm(x, weight.shape, weight, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, r = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_y = grad_y.contiguous()
        if native.applies_rows(x, weight, r, grad_y):
            grad_x, grad_w = native.rms_norm_backward(x, weight, r, grad_y, need_x, need_w)
            return grad_x, grad_w, None
        x_hat = x * r
        grad_x = grad_w = None
        if need_w:
            grad_w = (grad_y * x_hat).reshape(-1, x.shape[-1]).sum(0)
        if need_x:
            grad_x_hat = grad_y * weight
            mean = (grad_x_hat * x_hat).mean(-1, keepdim=True)
            grad_x = grad_x_hat.sub_(x_hat.mul_(mean)).mul_(r)
        return grad_x, grad_w, None


# ---------------------------------------------------------------------- rotary
ROPE_BLOCK = 8192  # positions per float64 block when building rotary tables


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each [max_seq_len, head_dim // 2], float32.

    `scaling`: long-context rotary (linear, YaRN; see rope.py); YaRN also scales cos and sin.
    Angles are taken in float64 a block of positions at a time, so a 128k-position table (imported
    checkpoints) needs no float64 copy of the whole table."""
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, max_seq_len)  # [K/2] float64
    cos, sin = torch.empty(max_seq_len, head_dim // 2), torch.empty(max_seq_len, head_dim // 2)
    for start in range(0, max_seq_len, ROPE_BLOCK):
        positions = torch.arange(start, min(start + ROPE_BLOCK, max_seq_len), dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)  # [block, K/2]
        cos[start : start + ROPE_BLOCK] = angles.cos() * attention_factor
        sin[start : start + ROPE_BLOCK] = angles.sin() * attention_factor
    return cos, sin


def full_rope(cos_SK: torch.Tensor, sin_SK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half tables [S, K/2] -> full-width tables [S, K]: (cos | cos) and (-sin | sin).

    With them a rotation is x * cos_full + rotate_half(x) * sin_signed, where rotate_half swaps the
    halves (one `roll`): four ops instead of eight, bit for bit the same numbers (the signed
    product x2 * -sin equals -(x2 * sin), and additions commute).
    """
    return torch.cat([cos_SK, cos_SK], dim=-1), torch.cat([-sin_SK, sin_SK], dim=-1)


def apply_rope(x_BHSK: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_j, x_{j+K/2}) by the position's angle. cos/sin: the S positions' rows, either
    half tables [S, K/2] (`rope_tables`) or full-width ones [S, K] (`full_rope`, what `Rotary` gives)."""
    head_dim = x_BHSK.shape[-1]
    if cos_SK.shape[-1] != head_dim:
        cos_SK, sin_SK = full_rope(cos_SK, sin_SK)
    exact = x_BHSK.dtype == cos_SK.dtype == sin_SK.dtype == torch.float32  # nothing to convert
    if exact and native.applies_rope(x_BHSK, cos_SK, sin_SK):  # CPU: one pass in C, the same bits
        if torch.is_grad_enabled() and x_BHSK.requires_grad:
            return _RopeFunction.apply(x_BHSK, cos_SK, sin_SK)
        return native.rope(x_BHSK, cos_SK, sin_SK, backward=False)
    x = x_BHSK if exact else x_BHSK.float()
    cos, sin = (cos_SK, sin_SK) if exact else (cos_SK.float(), sin_SK.float())  # [S, K], broadcast
    out = x * cos + x.roll(head_dim // 2, dims=-1) * sin  # [B, H, S, K]
    return out if exact else out.type_as(x_BHSK)


class _RopeFunction(torch.autograd.Function):
    """apply_rope in C (moe/csrc/rope.c) both ways: the forward reads the heads' strided view
    directly, the backward is the same rotation with the sines of the other half. q and k of the
    default model's 4 layers forward+backward (batch 8 x 256): 8.1 vs 13.5 ms as torch ops."""

    @staticmethod
    def forward(ctx, x_BHSK, cos_SK, sin_SK):  # type: ignore[override]
        ctx.save_for_backward(cos_SK, sin_SK)
        return native.rope(x_BHSK, cos_SK, sin_SK, backward=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_BHSK):  # type: ignore[override]
        cos_SK, sin_SK = ctx.saved_tensors
        if grad_BHSK.stride(-1) != 1:
            grad_BHSK = grad_BHSK.contiguous()
        return native.rope(grad_BHSK, cos_SK, sin_SK, backward=True), None, None


class _AttentionFunction(torch.autograd.Function):
    """Scaled dot-product attention (causal or not, grouped-query heads) in C both ways
    (moe/csrc/attention.c): per-thread (batch, head) units, blocks of 64 query rows, the products
    by sgemm, a causal block only up to its last row, the backward recomputing the probabilities
    from the saved log-sum-exp. The default model's layer (batch 8 x 256, 8 heads, 4 kv heads, head
    dim 32) forward+backward 14.9 vs 22.6 ms with torch's flash kernel for the CPU (in turns)."""

    @staticmethod
    def forward(ctx, q_BHSK, k_BGTK, v_BGTK, causal, scale):  # type: ignore[override]
        out_BHSK, lse_BHS = native.attention(q_BHSK, k_BGTK, v_BGTK, causal, scale)
        ctx.causal, ctx.scale = causal, scale
        ctx.save_for_backward(q_BHSK, k_BGTK, v_BGTK, out_BHSK, lse_BHS)
        return out_BHSK

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_BHSK):  # type: ignore[override]
        q_BHSK, k_BGTK, v_BGTK, out_BHSK, lse_BHS = ctx.saved_tensors
        if grad_BHSK.stride(-1) != 1:
            grad_BHSK = grad_BHSK.contiguous()
        grads = native.attention_backward(
            q_BHSK, k_BGTK, v_BGTK, out_BHSK, lse_BHS, grad_BHSK, ctx.causal, ctx.scale
        )
        return *grads, None, None


class Rotary(nn.Module):
    """Precomputed rotary tables; `forward(positions)` gives the full-width cos/sin rows [S, K] for
    those positions (`full_rope`), built once per model call and shared by every layer.

    The tables are non-persistent buffers so they follow `.to(device)`; keep the model in float32
    or mind that `.to(torch.bfloat16)` rounds them too (positions beyond ~256 lose precision).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        cos, sin = rope_tables(head_dim, max_seq_len, theta, scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return full_rope(self.cos[positions_S], self.sin[positions_S])  # [S, K] each


# ---------------------------------------------------------------------- T5 relative position bias


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of every relative position (key position - query position), long, in [0, num_buckets).

    Bidirectional: half the buckets for keys after the query. Within a direction, half of the
    buckets hold the exact distances 0..n/2-1, the rest log-spaced distances up to max_distance;
    farther keys share the last bucket. Unidirectional (causal) attention maps future keys to bucket 0.
    The float arithmetic follows Mesh TensorFlow / transformers exactly, so buckets match bit for bit.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """T5 relative position bias: one learned scalar per (bucket, head), added to the attention scores.

    T5 computes it once per stack (owned by the first layer) and every layer adds the same bias;
    the encoder uses bidirectional buckets, the decoder's self-attention causal ones.
    """

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, *, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)  # [buckets, H]

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
        """[1, H, S, T] bias of S queries at positions q_offset.. against T keys at 0.."""
        device = self.embedding.weight.device
        q_pos_S1 = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
        k_pos_1T = torch.arange(k_len, device=device)[None, :]
        bucket_ST = relative_position_bucket(
            k_pos_1T - q_pos_S1, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embedding(bucket_ST).permute(2, 0, 1)[None]  # [S, T, H] -> [1, H, S, T]


# ---------------------------------------------------------------------- masks


@dataclass
class AttentionMask:
    """What `scaled_dot_product_attention` needs: a bool mask (True = attend) or the causal flag."""

    mask: torch.Tensor | None = None  # [B or 1, 1, S, T]
    is_causal: bool = False


def build_attention_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    key_mask_BT: torch.Tensor | None = None,
    q_offset: int = 0,
    self_attention: bool = True,
    device: torch.device | None = None,
    sliding_window: int | None = None,
) -> AttentionMask:
    """Mask for S = q_len queries at positions q_offset.. against T = k_len keys at positions 0..

    key_mask_BT: True = real key; padded keys are never attended. In self-attention with padding
    each query may always see itself, so a padded query (left padding) never has an empty row,
    whose softmax is NaN on some GPU kernels; a padded query's output is unused anyway.
    sliding_window: a query at position p sees only keys p - window < k <= p (transformers' rule).
    Returns no tensor at all when none is needed, so SDPA can take its fastest path.
    """
    windowed = sliding_window is not None and q_offset + q_len - 1 >= sliding_window
    if key_mask_BT is None and not windowed:
        if not causal or (q_len == 1 and q_offset == k_len - 1):
            return AttentionMask()
        if q_offset == 0 and q_len == k_len:
            return AttentionMask(is_causal=True)  # SDPA aligns is_causal top-left; exact only here
    q_pos_S1 = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]  # [S, 1]
    k_pos_1T = torch.arange(k_len, device=device)[None, :]  # [1, T]
    allowed_ST = k_pos_1T <= q_pos_S1 if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if windowed:
        allowed_ST = allowed_ST & (k_pos_1T > q_pos_S1 - sliding_window)
    mask = allowed_ST[None, None]  # [1, 1, S, T]
    if key_mask_BT is not None:
        mask = mask & key_mask_BT.bool()[:, None, None, :]  # [B, 1, S, T]
        if self_attention:
            mask = mask | (k_pos_1T == q_pos_S1)[None, None]
    return AttentionMask(mask=mask)


def with_position_bias(mask: AttentionMask, bias_1HST: torch.Tensor, dtype: torch.dtype) -> AttentionMask:
    """Fold an additive score bias [1, H, S, T] into the mask (SDPA adds a float mask to the scores).

    Disallowed keys get the dtype's most negative value rather than -inf, as transformers does.
    """
    S, T = bias_1HST.shape[-2:]
    allowed = mask.mask
    if allowed is None and mask.is_causal:  # is_causal is only used for S == T, aligned top-left
        allowed = torch.ones(S, T, dtype=torch.bool, device=bias_1HST.device).tril()[None, None]
    bias = bias_1HST.to(dtype)
    if allowed is None:
        return AttentionMask(mask=bias)
    return AttentionMask(mask=bias.masked_fill(~allowed, torch.finfo(dtype).min))  # [B or 1, H, S, T]


# ---------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    `pos` counts the positions already written. A forward with the cache writes its S new keys at
    [pos, pos + S) in every layer, then the model calls `advance(S)` once. The padding mask of the
    keys is kept too, so a left-padded prompt stays masked during decoding.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        v_head_dim: int | None = None,  # None = head_dim (MLA caches differently sized pieces)
    ) -> None:
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # [B, G, T, K]
        v_shape = shape[:-1] + (head_dim if v_head_dim is None else v_head_dim,)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.key_mask_BT = torch.ones(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.max_seq_len = max_seq_len
        self.pos = 0

    def add_mask(self, token_mask_BS: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
        """Record the new tokens' padding; returns the key mask [B, pos + S] (None if never padded)."""
        end = self.pos + seq_len
        if end > self.max_seq_len:
            raise ValueError(f"KVCache holds {self.max_seq_len} positions; {self.pos} used + {seq_len} new")
        if token_mask_BS is not None:
            self.key_mask_BT[:, self.pos : end] = token_mask_BS.bool()
            self.has_padding = True
        return self.key_mask_BT[:, :end] if self.has_padding else None

    def update(
        self, layer_id: int, k_BGSK: torch.Tensor, v_BGSK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values of one layer; returns all keys/values so far, [B, G, pos + S, K]."""
        pos, new = self.pos, k_BGSK.shape[2]
        k_BGTK, v_BGTK = self.k[layer_id], self.v[layer_id]  # (narrow: cheaper than slice indexing)
        k_BGTK.narrow(2, pos, new).copy_(k_BGSK)
        v_BGTK.narrow(2, pos, new).copy_(v_BGSK)
        return k_BGTK.narrow(2, 0, pos + new), v_BGTK.narrow(2, 0, pos + new)

    def advance(self, seq_len: int) -> None:
        self.pos += seq_len


# ---------------------------------------------------------------------- attention


def allowed_keys(mask: AttentionMask, q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    """The bool mask [B or 1, 1, S, T] (True = attend) an AttentionMask stands for; None = all keys."""
    if mask.mask is not None:
        return mask.mask
    if mask.is_causal:  # SDPA's is_causal is aligned top-left
        return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]
    return None


def attention_with_sinks(
    q_BHSK: torch.Tensor,
    k_BGTK: torch.Tensor,
    v_BGTK: torch.Tensor,
    mask: AttentionMask,
    sinks_H: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention in which a learned logit per head (the sink) joins every normalization.

    p_t = exp(s_t) / (exp(sink_h) + sum_t' exp(s_t')): the sink takes probability mass and adds no
    value, so a head may attend to nothing (GPT-OSS). Written out, since SDPA has no such term.
    """
    B, H, S, K = q_BHSK.shape
    G, T = k_BGTK.shape[1], k_BGTK.shape[2]
    k_BHTK = k_BGTK.repeat_interleave(H // G, dim=1)  # each kv head serves H/G query heads
    v_BHTK = v_BGTK.repeat_interleave(H // G, dim=1)
    scores_BHST = (q_BHSK @ k_BHTK.transpose(-1, -2)) * (K**-0.5 if scale is None else scale)
    allowed = allowed_keys(mask, S, T, q_BHSK.device)
    if allowed is not None and allowed.dtype == torch.bool:
        scores_BHST = scores_BHST.masked_fill(~allowed, float("-inf"))
    elif allowed is not None:  # a float mask is an additive bias
        scores_BHST = scores_BHST + allowed
    sink_BHS1 = sinks_H.to(scores_BHST.dtype).view(1, H, 1, 1).expand(B, H, S, 1)
    probs_BHST = torch.cat([scores_BHST, sink_BHS1], dim=-1).float().softmax(dim=-1)[..., :-1]
    probs_BHST = F.dropout(probs_BHST, dropout_p) if dropout_p > 0 else probs_BHST
    return probs_BHST.to(v_BHTK.dtype) @ v_BHTK  # [B, H, S, K]


class Attention(nn.Module):
    """Grouped-query attention through `F.scaled_dot_product_attention`.

    Self-attention (with rotary and an optional KV cache) when `context` is None; cross-attention
    (queries from x, keys/values from the encoder output, no rotary) when it is given.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int = 0) -> None:
        super().__init__()
        self.layer_id = layer_id  # which slot of a KVCache this layer writes
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.scale = cfg.attn_scale  # None = 1/sqrt(head_dim)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attn_out_bias)
        self.qk_norm_full = cfg.qk_norm_scope == "full"  # OLMoE: over the whole projection, not per head
        q_norm_dim = cfg.n_heads * cfg.head_dim if self.qk_norm_full else cfg.head_dim
        k_norm_dim = cfg.n_kv_heads * cfg.head_dim if self.qk_norm_full else cfg.head_dim
        self.q_norm = RMSNorm(q_norm_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_norm_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.clip_qkv = cfg.clip_qkv
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attention_sinks else None  # [H]
        self.sliding_window = cfg.layer_window(layer_id)  # the decoder builds this layer's mask with it

    def forward(
        self,
        x_BSD: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context_BTD: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        kv_in_BTD = x_BSD if context_BTD is None else context_BTD
        q_BSF = linear(self.wq, x_BSD)  # [B, S, heads * K]
        k_BTF, v_BTF = linear(self.wk, kv_in_BTD), linear(self.wv, kv_in_BTD)
        if self.q_norm is not None and self.qk_norm_full:
            q_BSF, k_BTF = self.q_norm(q_BSF), self.k_norm(k_BTF)
        if self.clip_qkv is not None:
            q_BSF, k_BTF, v_BTF = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q_BSF, k_BTF, v_BTF))
        q_BHSK = _split_heads(q_BSF, self.n_heads, self.head_dim)
        k_BGTK = _split_heads(k_BTF, self.n_kv_heads, self.head_dim)
        v_BGTK = _split_heads(v_BTF, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            q_BHSK, k_BGTK = self.q_norm(q_BHSK), self.k_norm(k_BGTK)
        if rope is not None:
            q_BHSK, k_BGTK = apply_rope(q_BHSK, *rope), apply_rope(k_BGTK, *rope)
        if cache is not None:
            k_BGTK, v_BGTK = cache.update(self.layer_id, k_BGTK, v_BGTK)  # T grows to pos + S
        dropout_p = self.dropout if self.training else 0.0
        if self.sinks is not None:
            out_BHSK = attention_with_sinks(q_BHSK, k_BGTK, v_BGTK, mask, self.sinks, self.scale, dropout_p)
        elif (
            mask.mask is None
            and dropout_p == 0.0
            and cache is None
            and native.applies_attention(q_BHSK, k_BGTK, v_BGTK, mask.is_causal, self._scale())
        ):
            out_BHSK = _AttentionFunction.apply(q_BHSK, k_BGTK, v_BGTK, mask.is_causal, self._scale())
        else:
            out_BHSK = F.scaled_dot_product_attention(
                q_BHSK,
                k_BGTK,
                v_BGTK,
                attn_mask=mask.mask,
                is_causal=mask.is_causal,
                dropout_p=dropout_p,
                scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads,  # each of G kv heads serves H/G query heads
            )
        # [B, H, S, K] -> [B, S, H * K]; one token's [B, H, 1, K] is laid out that way already
        out_BSF = out_BHSK if S == 1 else out_BHSK.transpose(1, 2)
        return linear(self.wo, out_BSF.reshape(B, S, self.n_heads * self.head_dim))  # [B, S, D]

    def _scale(self) -> float:
        """The scores' scale: the configured one, else 1 / sqrt(head dim) (SDPA's default)."""
        return self.head_dim**-0.5 if self.scale is None else self.scale

    def decode_ready(self) -> bool:
        """Whether `decode_one` computes what `forward` does: plain grouped-query attention (no q/k
        norm, clipping, sinks or sliding window)."""
        return (
            self.q_norm is None
            and self.clip_qkv is None
            and self.sinks is None
            and self.sliding_window is None
        )

    def decode_one(
        self, x_11D: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache
    ) -> torch.Tensor:
        """`forward` for one token of one unpadded sequence with the KV cache (a batch-1 decode
        step), without autograd: the same products in the same order, minus the module calls and the
        option branches, which cost more than the arithmetic at this size. Only where `decode_ready`."""
        H, G, K = self.n_heads, self.n_kv_heads, self.head_dim
        q_1H1K = linear(self.wq, x_11D).view(1, H, 1, K)
        k_1G1K = linear(self.wk, x_11D).view(1, G, 1, K)
        v_1G1K = linear(self.wv, x_11D).view(1, G, 1, K)
        q_1H1K, k_1G1K = apply_rope(q_1H1K, *rope), apply_rope(k_1G1K, *rope)
        k_1GTK, v_1GTK = cache.update(self.layer_id, k_1G1K, v_1G1K)
        out_1H1K = F.scaled_dot_product_attention(q_1H1K, k_1GTK, v_1GTK, scale=self.scale, enable_gqa=G != H)
        return linear(self.wo, out_1H1K.reshape(1, 1, H * K))  # [1, 1, D]

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


def _split_heads(x_BSF: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """[B, S, heads * K] -> [B, heads, S, K] (a view). One token (S = 1, a decode step) needs no
    transpose: the two layouts are the same memory."""
    B, S, _ = x_BSF.shape
    if S == 1:
        return x_BSF.view(B, n_heads, 1, head_dim)
    return x_BSF.view(B, S, n_heads, head_dim).transpose(1, 2)


def build_attention(cfg: ModelConfig, layer_id: int) -> nn.Module:
    """The self-attention a config asks for: multi-head latent attention or grouped-query attention."""
    if cfg.mla is not None:
        from moekit.model.mla import MLAttention  # mla.py builds on this module

        return MLAttention(cfg, layer_id)
    return Attention(cfg, layer_id)


# ---------------------------------------------------------------------- feed-forward


class FeedForward(nn.Module):
    """Dense FFN: GLU w2(act(w1 x) * w3 x) for swiglu/geglu, plain w2(act(w1 x)) for relu/gelu/silu (T5)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate (GLU) or up
        self.w3 = nn.Linear(dim, hidden_dim, bias=False) if activation in ("swiglu", "geglu") else None  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            h_BSF = ffn_activation(self.activation, linear(self.w1, x_BSD))
        else:
            h_BSF = glu_activation(self.activation, linear(self.w1, x_BSD), linear(self.w3, x_BSD))
        return linear(self.w2, h_BSF)  # [B, S, F] -> [B, S, D]

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        for lin in (self.w1, self.w2, self.w3):
            if lin is not None:
                nn.init.normal_(lin.weight, std=std)


# ---------------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, then an FFN that is
    an MoE layer when `cfg.is_moe_layer(layer_id)` (or the explicit `is_moe`) and a dense FFN otherwise.

    One class serves the decoder-only LM (causal), the encoder (bidirectional) and the decoder of
    the encoder-decoder (causal + cross-attention). `causal` is passed on to the MoE config, so
    routers that look across the sequence (expert choice) refuse decoder use.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_id: int,
        *,
        causal: bool,
        cross_attention: bool = False,
        is_moe: bool | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg, layer_id)
        self.cross_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cross_attention else None
        self.cross_attn = Attention(cfg, layer_id) if cross_attention else None
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id) if is_moe is None else is_moe
        if self.is_moe:
            self.ffn: nn.Module = MoE(dataclasses.replace(cfg.moe, causal=causal))
        else:
            self.ffn = FeedForward(cfg.dim, cfg.ffn_hidden_dim, cfg.ffn_activation)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BSD: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        token_mask_BS: torch.Tensor | None = None,
        cache: KVCache | None = None,
        context_BTD: torch.Tensor | None = None,
        context_mask: AttentionMask | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEOutput | None]:
        """token_mask_BS: True = real token, so padding is kept out of routing and router losses.
        task_ids [B]: the task of every sequence, for task routers (router='task')."""
        x_BSD = x_BSD + self._dropout(self.attn(self.attn_norm(x_BSD), mask, rope, cache=cache))
        if self.cross_attn is not None:
            h_BSD = self.cross_attn(self.cross_norm(x_BSD), context_mask, context_BTD=context_BTD)
            x_BSD = x_BSD + self._dropout(h_BSD)
        h_BSD = self.ffn_norm(x_BSD)
        if not self.is_moe:
            return x_BSD + self._dropout(self.ffn(h_BSD)), None
        moe_out = self.ffn(h_BSD, mask=token_mask_BS, task_ids=task_ids)
        return x_BSD + self._dropout(moe_out.output), moe_out

    def decode_ready(self) -> bool:
        """Whether `decode_one` applies (see Attention.decode_ready; no cross-attention)."""
        attn = self.attn
        return self.cross_attn is None and isinstance(attn, Attention) and attn.decode_ready()

    def decode_one(
        self, x_11D: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache
    ) -> torch.Tensor:
        """`forward` for one token of one unpadded sequence in eval mode (a batch-1 decode step), without
        its losses and statistics; an MoE layer takes `MoE.forward_one_token` when it can."""
        x_11D = x_11D + self.attn.decode_one(self.attn_norm(x_11D), rope, cache)
        h_11D = self.ffn_norm(x_11D)
        if not self.is_moe:
            return x_11D + self.ffn(h_11D)
        out_1D = self.ffn.forward_one_token(h_11D.view(1, -1))
        if out_1D is None:
            return x_11D + self.ffn(h_11D).output
        return x_11D + out_1D.view(1, 1, -1)

    def _dropout(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """The residual dropout, not even called when it is the identity (eval, or p = 0): a decode
        step is a few hundred small calls, and each one saved shows."""
        if self.training and self.resid_dropout.p > 0:
            return self.resid_dropout(x_BSD)
        return x_BSD
