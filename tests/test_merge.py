"""Expert pruning and merging against naive references; the assignment solver against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moekit.cli import main as cli_main
from moekit.compress.align import linear_sum_assignment, match_units, permute_units, unit_features
from moekit.compress.calibrate import calibration_batches, record_routing
from moekit.compress.merge import LayerPlan, apply_plans, merge_model, merge_plan, prune_model
from moekit.train.checkpoint import load_model
from tests.compress_helpers import small_model, tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("merge"))


def test_linear_sum_assignment_is_optimal():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 7))
        cost = rng.integers(0, 4, (n, n)).astype(float) if trial % 2 else rng.normal(size=(n, n))
        col = linear_sum_assignment(cost)
        assert sorted(col.tolist()) == list(range(n))
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert cost[np.arange(n), col].sum() == pytest.approx(best)


def test_alignment_recovers_a_permutation_and_keeps_the_function():
    torch.manual_seed(0)
    D, F = 8, 12
    w_in, w_out = torch.randn(D, 2 * F), torch.randn(F, D)
    perm = torch.randperm(F)
    p_in, p_out, _ = permute_units(w_in, w_out, None, perm)
    x = torch.randn(5, D)

    def expert(wi, wo):
        h = x @ wi
        return (torch.nn.functional.silu(h[:, :F]) * h[:, F:]) @ wo

    torch.testing.assert_close(expert(p_in, p_out), expert(w_in, w_out))
    back = match_units(unit_features(w_in, w_out), unit_features(p_in, p_out))
    assert torch.equal(p_out[back], w_out) and torch.equal(permute_units(p_in, p_out, None, back)[0], w_in)


def _never_use(model, expert):
    for layer in model.moe_layers:
        with torch.no_grad():
            layer.router.gate.weight[expert] = 0.0
            layer.router.gate.bias[expert] = -1e4


@pytest.mark.parametrize(
    "router, exact", [("topk", False), ("sigmoid_bias", True), ("topk_then_softmax", True)]
)
def test_pruning_an_unused_expert_keeps_outputs(router, exact):
    model = small_model(router=router, router_bias=True)
    _never_use(model, 3)
    x = torch.randint(0, 64, (4, 16))
    records = record_routing(model, [(x, None)])
    assert all(float(r.usage_E[3]) == 0 for r in records)
    pruned, plans = prune_model(model, records, keep=5)
    assert pruned.config.moe.num_experts == 5 and [g[0] for g in plans[0].groups] == [0, 1, 2, 4, 5]
    # Same routing and weights; only rounding may differ: the BLAS may sum the router's product over
    # 5 experts in another order than over 6 (bit-equal on one CPU, 7e-8 apart on another). Without
    # the exact flag the softmax over one expert fewer renormalizes the top-k weights too.
    tol = 1e-6 if exact else 1e-5
    torch.testing.assert_close(pruned(x).logits, model(x).logits, rtol=tol, atol=tol)


def test_record_routing_usage_matches_the_layer_stats():
    model = small_model()
    x = torch.randint(0, 64, (3, 16))
    records = record_routing(model, [(x[:2], None), (x[2:], None)])
    stats = [model(x[:2]).router_stats, model(x[2:]).router_stats]
    for i, r in enumerate(records):
        assert torch.equal(r.usage_E, stats[0][i].routed_per_expert + stats[1][i].routed_per_expert)
        assert r.x_TD.shape == (48, 32) and r.logits_TE.shape == (48, 6)


def test_merge_matches_naive_reference():
    model = small_model(n_layers=1, expert_bias=True)
    layer = model.moe_layers[0]
    plan = LayerPlan([[1, 4], [0, 2, 5], [3]], [[0.25, 0.75], [0.5, 0.3, 0.2], [1.0]])
    merged = apply_plans(model, [plan], router_rows="dominant", align=False)
    new_layer = merged.moe_layers[0]
    bank, gate = layer.experts, layer.router.gate.weight.detach()
    x = torch.randn(7, 32)
    out = new_layer(x).output
    F = bank.hidden_dim
    for t in range(7):
        logits = torch.stack([x[t] @ gate[g[0]] for g in plan.groups])  # dominant rows
        probs = torch.softmax(logits, 0)
        top = probs.topk(2).indices.tolist()
        expected = torch.zeros(32)
        for j in top:
            w_in = sum(c * bank.w_in_EDF[m] for m, c in zip(plan.groups[j], plan.weights[j]))
            b_in = sum(c * bank.b_in_EF[m] for m, c in zip(plan.groups[j], plan.weights[j]))
            w_out = sum(c * bank.w_out_EFD[m] for m, c in zip(plan.groups[j], plan.weights[j]))
            b_out = sum(c * bank.b_out_ED[m] for m, c in zip(plan.groups[j], plan.weights[j]))
            h = x[t] @ w_in + b_in
            y = (torch.nn.functional.silu(h[:F]) * h[F:]) @ w_out + b_out
            expected = expected + probs[j] / probs[top].sum() * y
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-4)


def test_merge_plan_groups_by_similarity_and_weights_by_usage():
    usage = torch.tensor([10.0, 1.0, 8.0, 3.0, 0.0])
    similarity = torch.eye(5)
    similarity[1, 2] = similarity[3, 0] = similarity[4, 2] = 0.9
    plan = merge_plan(usage, 2, similarity)
    assert plan.groups == [[0, 3], [2, 1, 4]]
    assert plan.weights[0] == pytest.approx([10 / 13, 3 / 13]) and plan.weights[1] == pytest.approx(
        [8 / 9, 1 / 9, 0]
    )


def test_merging_an_expert_with_its_permuted_copy_gives_it_back():
    model = small_model(n_layers=1)
    bank = model.moe_layers[0].experts
    with torch.no_grad():  # expert 5 = expert 2 with its hidden units shuffled
        perm = torch.randperm(bank.hidden_dim)
        w_in, w_out, _ = permute_units(bank.w_in_EDF[2], bank.w_out_EFD[2], None, perm)
        bank.w_in_EDF[5], bank.w_out_EFD[5] = w_in, w_out
    merged = apply_plans(
        model, [LayerPlan([[0], [1], [2, 5], [3], [4]], [[1.0]] * 2 + [[0.5, 0.5]] + [[1.0]] * 2)]
    )
    torch.testing.assert_close(merged.moe_layers[0].experts.w_in_EDF[2], bank.w_in_EDF[2], rtol=0, atol=1e-7)
    torch.testing.assert_close(
        merged.moe_layers[0].experts.w_out_EFD[2], bank.w_out_EFD[2], rtol=0, atol=1e-7
    )


@pytest.mark.parametrize("grouping", ["router", "output", "weight"])
def test_merge_model_runs_for_every_grouping(grouping):
    model = small_model()
    x = torch.randint(0, 64, (4, 16))
    merged, plans = merge_model(model, record_routing(model, [(x, None)]), 3, grouping)
    assert merged.config.moe.num_experts == 3 and sorted(sum(plans[0].groups, [])) == list(range(6))
    assert torch.isfinite(merged(x).logits).all()


def test_bad_keep_values_are_refused():
    model = small_model()
    with pytest.raises(ValueError, match="--keep=7 is invalid"):
        prune_model(model, [None, None], 7)
    with pytest.raises(ValueError, match="--keep=1 is below top_k=2"):
        merge_model(model, [None, None], 1)


def test_calibration_from_the_run_data_and_missing_data(ckpt, tmp_path):
    _, config = load_model(ckpt)
    batches = calibration_batches(config, num_sequences=6, batch_size=4)
    assert [b[0].shape for b in batches] == [(4, 32), (2, 32)]
    with pytest.raises(ValueError, match="nowhere.txt"):
        calibration_batches(config, paths=[str(tmp_path / "nowhere.txt")])
    broken = {
        **config,
        "run": {**config["run"], "data": {**config["run"]["data"], "paths": ["/no/such/*.txt"]}},
    }
    with pytest.raises(ValueError, match="run.data.paths"):
        calibration_batches(broken)


def test_cli_prune_and_merge(ckpt, tmp_path, capsys):
    common = ["--calib-sequences", "4", "--eval-batches", "1"]
    assert cli_main(["prune", "--ckpt", str(ckpt), "--keep", "2", "--out", str(tmp_path / "p"), *common]) == 0
    assert cli_main(["merge", "--ckpt", str(ckpt), "--keep", "3", "--out", str(tmp_path / "m"), *common]) == 0
    out = capsys.readouterr().out
    assert "pruned to 2 experts" in out and "merged to 3 experts" in out and "validation loss" in out
    for name, experts in (("p", 2), ("m", 3)):
        model, config = load_model(tmp_path / name)
        assert model.config.moe.num_experts == experts and config["run"]["moe"]["num_experts"] == experts
    assert cli_main(["prune", "--ckpt", str(ckpt), "--keep", "9", "--out", str(tmp_path / "x")]) == 2
    assert "--keep=9 is invalid" in capsys.readouterr().err
    assert cli_main(["merge", "--ckpt", str(ckpt), "--keep", "2", "--out", str(ckpt)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "prune",
                "--ckpt",
                str(ckpt),
                "--keep",
                "2",
                "--out",
                str(tmp_path / "y"),
                "--calib",
                "/no/x.txt",
            ]
        )
        == 2
    )
    assert "/no/x.txt" in capsys.readouterr().err
