"""Bad input to the layer: a ValueError naming the parameter, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(top_k=0), r"top_k=0 .*\[1, num_experts=4\]"),
        (dict(top_k=5), r"top_k=5 .*\[1, num_experts=4\]"),
        (dict(capacity_factor=0.0), r"capacity_factor=0.0 .*> 0"),
        (dict(capacity_factor=-1.25), r"capacity_factor=-1.25"),
        (dict(eval_capacity_factor=float("nan")), r"eval_capacity_factor=nan"),
        (dict(router="top3"), r"router='top3' .*one of \['topk'"),
        (dict(activation="swish"), r"activation='swish' .*one of"),
        (dict(drop_policy="random"), r"drop_policy='random'"),
        (dict(router="switch", top_k=2), r"top_k=2 .*router='switch'"),
        (dict(router="gshard", top_k=1), r"top_k=1 .*router='gshard'"),
        (dict(router="sigmoid_bias", n_group=3), r"n_group=3 .*divisor of num_experts=4"),
        (dict(router="sigmoid_bias", n_group=2, topk_group=3), r"topk_group=3"),
        (dict(expert_dropout=1.0), r"expert_dropout=1.0"),
        (dict(load_balance_coef=-1.0), r"load_balance_coef=-1.0"),
        (dict(dim=0), r"dim=0 .*positive integer"),
        (dict(min_capacity=-2), r"min_capacity=-2"),
        # bools are ints to Python; a count or a factor given as True/False is a typo, not a value
        (dict(top_k=True), r"top_k=True .*integer"),
        (dict(capacity_factor=True), r"capacity_factor=True .*finite number > 0"),
        (dict(min_capacity=True), r"min_capacity=True .*integer >= 0"),
        (dict(num_shared_experts=1.5), r"num_shared_experts=1.5 .*integer >= 0"),
        (dict(shared_hidden_dim=2.5), r"shared_hidden_dim=2.5 .*positive integer"),
        (dict(router="sigmoid_bias", n_group=2.0), r"n_group=2.0 .*divisor of num_experts=4"),
        # a string from a config file must fail with the field's name, not a TypeError from `<`
        (dict(expert_dropout="0.1"), r"expert_dropout='0.1' .*\[0, 1\)"),
        (dict(jitter_eps=None), r"jitter_eps=None .*\[0, 1\)"),
        (dict(router_init_scale="x"), r"router_init_scale='x' .*> 0"),
        (dict(routed_scaling_factor=0.0), r"routed_scaling_factor=0.0 .*> 0"),
        (dict(noise_eps=-1.0), r"noise_eps=-1.0 .*>= 0"),
        (dict(bias_update_rate=-0.1), r"bias_update_rate=-0.1 .*>= 0"),
    ],
)
def test_bad_config_raises_at_construction(kwargs, pattern):
    base = dict(dim=8, hidden_dim=16, num_experts=4, top_k=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        MoE(**base)


def test_dim_mismatch_and_non_float_input():
    moe = MoE(8, 16, 4, 2)
    with pytest.raises(ValueError, match=r"shape \(3, 7\): expected \[\.\.\., dim=8\]"):
        moe(torch.randn(3, 7))
    with pytest.raises(ValueError, match="floating-point tensor, got torch.int64"):
        moe(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="mask has shape"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))


def test_nan_or_inf_router_logits_rejected():
    moe = MoE(8, 16, 4, 2)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        moe(x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        moe(x)


def test_config_round_trip_and_unknown_keys():
    cfg = MoEConfig(
        dim=8,
        hidden_dim=16,
        num_experts=4,
        top_k=1,
        router="switch",
        inner=MoEConfig(dim=8, hidden_dim=4, num_experts=2, top_k=1),
    )
    again = MoEConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match=r"unknown MoEConfig keys \['topk'\]"):
        MoEConfig.from_dict({**cfg.to_dict(), "topk": 3})


def test_config_counts_field_assignments_and_compares_by_fields_alone():
    """Every field assignment is counted (prepared native calls compare the count); the count is
    no field: equality, to_dict, copies and pickles see the fields alone."""
    import copy
    import pickle

    cfg = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2)
    start = cfg.assignments
    assert start >= 4  # construction assigns every field
    cfg.top_k = 1
    cfg.top_k = 2  # back to the same value: still two assignments
    assert cfg.assignments == start + 2
    twin = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2)
    assert twin == cfg and twin.assignments != cfg.assignments
    assert "_assignments" not in cfg.to_dict() and MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert copy.deepcopy(cfg) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg


def test_capacity_rule():
    cfg = MoEConfig(dim=8, hidden_dim=8, num_experts=8, top_k=2, capacity_factor=1.25, min_capacity=4)
    assert cfg.capacity(2 * 100, training=True) == 32  # ceil(1.25 * 200 / 8) = 31.25 -> 32
    assert cfg.capacity(2 * 4, training=True) == 4  # floor min_capacity
    assert MoEConfig(dim=8, hidden_dim=8, num_experts=8).capacity(100, True) is None
