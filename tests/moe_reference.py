"""A deliberately naive reference MoE: per-token Python loops written from the papers' formulas.

It reads the weights of a moekit `MoE` but shares none of its code: routing, capacity and the
expert math are re-derived token by token, so agreement means the fast path is right. It is built
with differentiable torch ops, so its autograd gives reference gradients too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Every token-choice router configuration the layer tests run (expert choice has its own tests).
ROUTER_CASES = [
    dict(router="topk", top_k=2),
    dict(router="topk", top_k=3, norm_topk_prob=False),
    dict(router="topk", top_k=1),
    dict(router="topk_then_softmax", top_k=2, router_bias=True),
    dict(router="switch", top_k=1),
    dict(router="gshard", top_k=2),
    dict(router="noisy_topk", top_k=2),
    dict(router="sigmoid_bias", top_k=2),
    dict(router="sigmoid_bias", top_k=2, n_group=3, topk_group=2, routed_scaling_factor=2.5),
]


def _softmax(v):
    m = max(float(t) for t in v)
    exps = [torch.exp(t - m) for t in v]
    s = sum(exps)
    return [e / s for e in exps]


def _argsort_desc(values, among=None):
    idx = list(range(len(values))) if among is None else list(among)
    return sorted(idx, key=lambda i: (-float(values[i]), i))


def expert_forward(moe, e, x_D, bank=None, hidden_scale=None):
    """One expert (of `bank`, default the routed experts) on one token, written out from the formulas.

    `hidden_scale` [F] multiplies the activated hidden (a dropout mask over 1 - p, given by the test).
    In a hierarchical MoE the expert is itself an MoE layer: the token is routed again, on its own
    (the same as in a batch while the inner layer is dropless).
    """
    if bank is None and moe.config.inner is not None:
        return reference_moe(moe.experts.layers[e], x_D[None])[0][0]
    bank = moe.experts if bank is None else bank
    w_in = bank.w_in_EDF[e]  # [D, F] or [D, 2F]
    w_out = bank.w_out_EFD[e]  # [F, D]
    h = x_D @ w_in
    if bank.b_in_EF is not None:
        h = h + bank.b_in_EF[e]
    hidden = bank.hidden_dim
    act = bank.activation
    if act in ("swiglu", "geglu", "gpt_oss"):
        gate, up = h[:hidden], h[hidden:]
        if act == "swiglu":
            a = gate * torch.sigmoid(gate) * up
        elif act == "geglu":
            a = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))) * up
        else:
            g = torch.clamp(gate, max=7.0)
            u = torch.clamp(up, -7.0, 7.0)
            a = (u + 1) * g * torch.sigmoid(1.702 * g)
    elif act == "relu":
        a = torch.clamp(h, min=0)
    elif act == "gelu":
        a = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    else:  # silu
        a = h * torch.sigmoid(h)
    if hidden_scale is not None:
        a = a * hidden_scale
    y = a @ w_out
    if bank.b_out_ED is not None:
        y = y + bank.b_out_ED[e]
    return y


def route_token(moe, x_D, *, jitter=None, noise=None, uniform=None):
    """-> (logits list, probs list, [(expert, weight), ...] in rank order, [kept flags]) for one token."""
    cfg = moe.config
    r = moe.router
    dtype = torch.float64 if x_D.dtype == torch.float64 else torch.float32
    x = x_D.to(dtype)
    if jitter is not None:
        x = x * jitter
    W = r.gate.weight.to(dtype)
    logits = [
        W[e] @ x + (r.gate.bias[e].to(dtype) if r.gate.bias is not None else 0.0)
        for e in range(cfg.num_experts)
    ]
    k, E = cfg.top_k, cfg.num_experts
    kept = [True] * k
    if cfg.router in ("topk", "switch", "gshard"):
        probs = _softmax(logits)
        chosen = _argsort_desc(probs)[:k]
        w = [probs[e] for e in chosen]
        if cfg.router == "gshard":
            s = w[0] + w[1]
            w = [w[0] / s, w[1] / s]
            if uniform is not None:
                kept[1] = float(uniform) < min(1.0, 2 * float(w[1]))
        elif cfg.router == "topk" and cfg.norm_topk_prob:
            s = sum(w)
            w = [v / s for v in w]
    elif cfg.router == "topk_then_softmax":
        probs = _softmax(logits)
        chosen = _argsort_desc(logits)[:k]
        w = _softmax([logits[e] for e in chosen])
    elif cfg.router == "noisy_topk":
        probs = _softmax(logits)
        h = list(logits)
        if noise is not None:
            Wn = r.noise.weight.to(dtype)
            h = [logits[e] + noise[e] * (F.softplus(Wn[e] @ x) + cfg.noise_eps) for e in range(E)]
        chosen = _argsort_desc(h)[:k]
        w = _softmax([h[e] for e in chosen])
    elif cfg.router == "sigmoid_bias":
        scores = [torch.sigmoid(v) for v in logits]
        total = sum(scores)
        probs = [s / total for s in scores]
        choice = [float(scores[e]) + float(r.expert_bias[e]) for e in range(E)]
        per_group = E // cfg.n_group
        groups = []
        for g in range(cfg.n_group):
            members = sorted((choice[e] for e in range(g * per_group, (g + 1) * per_group)), reverse=True)
            groups.append(sum(members[: min(2, per_group)]))
        best_groups = _argsort_desc(groups)[: cfg.topk_group]
        candidates = [e for g in best_groups for e in range(g * per_group, (g + 1) * per_group)]
        chosen = _argsort_desc(choice, among=candidates)[:k]
        w = [scores[e] for e in chosen]
        if cfg.norm_topk_prob:
            s = sum(w) + 1e-20
            w = [v / s for v in w]
        w = [v * cfg.routed_scaling_factor for v in w]
    else:
        raise AssertionError(cfg.router)
    return logits, probs, list(zip(chosen, w)), kept


def naive_switch_loss(probs, chosen, mask):
    """E * sum_e f_e P_e over the real tokens: f_e share of the selections, P_e mean probability."""
    T, E = len(probs), len(probs[0])
    real = [t for t in range(T) if mask[t]]
    f = [0.0] * E
    n = 0
    for t in real:
        for e in chosen[t]:
            f[e] += 1
            n += 1
    P = [sum(float(probs[t][e]) for t in real) / len(real) for e in range(E)]
    return E * sum(f[e] / n * P[e] for e in range(E))


def naive_cv_squared(values):
    """var / mean^2 with the population variance (and the same 1e-10 guard as moekit)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return var / (mean * mean + 1e-10)


def reference_losses(cfg, per_token, mask, num_sequences):
    """Every unweighted loss of one call from the per-token routing, in float64 Python arithmetic.

    Selections count all k chosen experts of every real token (before random routing or capacity);
    importance sums their combine weights; load counts them (Shazeer's smooth load of noisy gating
    while training is checked on its own in test_losses); sequences are equal consecutive slices.
    """
    T, E = len(per_token), cfg.num_experts
    real = [t for t in range(T) if mask[t]]
    probs = [[float(p) for p in per_token[t][1]] for t in range(T)]
    chosen = [[e for e, _ in per_token[t][2]] for t in range(T)]
    z = 0.0
    for t in real:
        row = [float(v) for v in per_token[t][0]]
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        z += lse * lse
    importance, load = [0.0] * E, [0.0] * E
    for t in real:
        for e, w in per_token[t][2]:
            importance[e] += float(w)
            load[e] += 1
    S = T // num_sequences
    per_seq = [
        naive_switch_loss(probs[b * S : (b + 1) * S], chosen[b * S : (b + 1) * S], mask[b * S : (b + 1) * S])
        for b in range(num_sequences)
        if any(mask[b * S : (b + 1) * S])
    ]
    return {
        "load_balance": naive_switch_loss(probs, chosen, mask),
        "z": z / len(real),
        "importance": naive_cv_squared(importance),
        "load": naive_cv_squared(load),
        "seq_balance": sum(per_seq) / len(per_seq),
    }


def reference_moe(moe, x, mask=None, *, jitter=None, noise=None, uniform=None):
    """Naive forward of `moe` on x [..., D] -> (output, info: per-token routing, kept assignments
    (token, expert, weight, rank), mask, and the call's unweighted losses when it has real tokens)."""
    cfg = moe.config
    D, E = cfg.dim, cfg.num_experts
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    m = [True] * T if mask is None else [bool(v) for v in mask.reshape(-1)]
    real_tokens = [t for t in range(T) if m[t]]

    per_token = []
    for t in range(T):
        per_token.append(
            route_token(
                moe,
                x_TD[t],
                jitter=None if jitter is None else jitter[t],
                noise=None if noise is None else noise[t],
                uniform=None if uniform is None else uniform[t],
            )
        )

    # Assignments (token, expert, weight, rank) of real tokens that the router kept.
    if cfg.router == "expert_choice":
        raise AssertionError("use reference_expert_choice")
    assignments = [
        (t, e, w, rank)
        for t in real_tokens
        for rank, ((e, w), keep) in enumerate(zip(per_token[t][2], per_token[t][3]))
        if keep
    ]
    # Capacity: rank-major priority; within a rank by position or by descending weight.
    cf = cfg.capacity_factor if moe.training or cfg.eval_capacity_factor is None else cfg.eval_capacity_factor
    if cf is not None:
        C = max(1, cfg.min_capacity, math.ceil(cf * len(real_tokens) * cfg.top_k / E))
        ordered = []
        for rank in range(cfg.top_k):
            at_rank = [a for a in assignments if a[3] == rank]
            if cfg.drop_policy == "probability":
                at_rank.sort(key=lambda a: -float(a[2]))
            ordered.extend(at_rank)
        used = [0] * E
        kept = []
        for a in ordered:
            if used[a[1]] < C:
                used[a[1]] += 1
                kept.append(a)
        assignments = kept

    out = [x_TD.new_zeros(D) for _ in range(T)]
    for t, e, w, _ in assignments:
        out[t] = out[t] + w.to(x_TD.dtype) * expert_forward(moe, e, x_TD[t])
    if moe.shared is not None:
        for t in range(T):
            out[t] = out[t] + shared_forward(moe, x_TD[t])
    info = {"assignments": assignments, "per_token": per_token, "mask": m}
    if real_tokens:
        num_sequences = math.prod(x.shape[:-2]) if x.ndim >= 3 else 1
        info["losses"] = reference_losses(cfg, per_token, m, num_sequences)
    return torch.stack(out).view(x.shape), info


def shared_forward(moe, x_D):
    """The shared expert (a bank of one) on one token, with its optional sigmoid gate."""
    y = expert_forward(moe, 0, x_D, moe.shared.bank)
    if moe.shared.gate is not None:
        y = y * torch.sigmoid(moe.shared.gate.weight[0] @ x_D)
    return y


def reference_expert_choice(moe, x, mask=None):
    cfg = moe.config
    D, E = cfg.dim, cfg.num_experts
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    m = [True] * T if mask is None else [bool(v) for v in mask.reshape(-1)]
    W = moe.router.gate.weight.float()
    probs = [_softmax([W[e] @ x_TD[t].float() for e in range(E)]) for t in range(T)]
    cf = cfg.capacity_factor if moe.training or cfg.eval_capacity_factor is None else cfg.eval_capacity_factor
    cf = cfg.top_k if cf is None else cf
    C = min(T, max(1, math.ceil(cf * T / E)))
    out = [x_TD.new_zeros(D) for _ in range(T)]
    for e in range(E):
        ranked = sorted(range(T), key=lambda t: (0 if m[t] else 1, -float(probs[t][e]) if m[t] else 0, t))[:C]
        for t in ranked:
            if m[t]:
                out[t] = out[t] + probs[t][e] * expert_forward(moe, e, x_TD[t])
    return torch.stack(out).view(x.shape), {"probs": probs, "capacity": C}
