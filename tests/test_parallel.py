"""Expert parallelism against one process: spawned gloo ranks on CPU, compared to the same weights
and data run by the single-process layer on each EP group's concatenated batch.

Every spawned scenario runs all its cases in one process group (spawning costs seconds per rank on
2 cores) and returns per-rank maximum errors; the asserts run in the parent. A worker that hangs is
killed at the deadline and the test fails instead of blocking; gloo collectives time out too.

What is checked: outputs, input gradients and every parameter gradient after `sync_gradients`
(router and shared experts averaged over the world, experts summed over the expert-data-parallel
group / world), dropless and with capacity (position and probability priority, padding), extreme
routing (all tokens to experts of one rank: the other rank's experts get nothing anywhere), a rank
without any real token, the balance, z, importance, load and sequence-wise losses (values on every
rank and gradients equal one process on the batch of all ranks), bytes sent against the
communication model, checkpoints across EP sizes, a whole decoder model, and bad layouts failing
on every rank with the values named. World 2 with EP 2 and 1, world 4 with EP 4 and 2.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from moekit.moe import MoE, MoEConfig
from moekit.parallel import (
    ParallelLayout,
    clip_grad_norm,
    config_digest,
    data_parallel,
    expected_traffic,
    expert_parameter_names,
    gather_full_state_dict,
    gather_optimizer_state,
    init_parallel,
    load_sharded,
    load_sharded_optimizer_state,
    reduce_stats,
    shard_model,
    sync_gradients,
)

TOL = 1e-5
D, F, E, B, S = 16, 24, 4, 2, 8  # dim, expert hidden, experts, sequences per rank, sequence length


# ---------------------------------------------------------------------- process harness


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: str, args: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        result = SCENARIOS[scenario](**args)
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(scenario: str, world: int, timeout: float = 180.0, **args) -> list[dict]:
    """Run SCENARIOS[scenario](**args) on `world` spawned gloo ranks; per-rank results."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world, port, scenario, args, out_dir), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        end = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            pytest.fail(f"{scenario}: ranks {hung} did not finish within {timeout}s (hang?)")
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                pytest.fail(f"{scenario}: rank {r} exited with code {procs[r].exitcode} and no result")
            results.append(torch.load(path, weights_only=False))
    for r, res in enumerate(results):
        if "error" in res:
            pytest.fail(f"{scenario}: rank {r} raised:\n{res['error']}")
    return results


# ---------------------------------------------------------------------- worker-side helpers


def _cfg(**kw) -> MoEConfig:
    """Large loss coefficients: the losses' share of every gradient is far above the tolerance."""
    base = dict(dim=D, hidden_dim=F, num_experts=E, top_k=2, load_balance_coef=1.0, z_loss_coef=0.1)
    return MoEConfig(**{**base, **kw})


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / max(1, |b|) for scalars."""
    return abs(float(a.detach()) - float(b.detach())) / max(1.0, abs(float(b.detach())))


def _force_routing(moe: MoE, first: int, second: int) -> None:
    """Every token picks expert `first`, then `second` (a bias far above the tiny logits)."""
    with torch.no_grad():
        moe.router.gate.weight.mul_(1e-3)
        moe.router.gate.bias.zero_()
        moe.router.gate.bias[first] = 8.0
        moe.router.gate.bias[second] = 4.0


def _parity_case(
    layout: ParallelLayout,
    cfg: MoEConfig,
    seed: int,
    masked: bool | str,
    setup=None,
    per_rank: bool = False,
) -> dict:
    """EP layer vs one process per EP group on the concatenated batch: max errors by quantity.

    Every rank backpropagates <output, g> + aux_loss + z_loss. The losses (values and gradients) are
    those of one process on the batch of all W ranks, whatever the EP groups: the reference adds
    W * (aux + z) of that batch, as the step's objective is the mean over ranks.
    masked: True, False, or "empty_last_rank" (the last rank has no real token at all).
    per_rank: the reference runs every rank's batch alone (expert choice picks tokens per rank);
    its routing differs from the concatenated batch's, so the losses are not compared.
    """
    world, ep, rank = layout.world_size, layout.ep, layout.rank
    torch.manual_seed(seed)
    ref = MoE(cfg)
    if setup is not None:
        setup(ref)
    model = shard_model(copy.deepcopy(ref), layout)
    gen = torch.Generator().manual_seed(seed + 1)
    x_all = torch.randn(world, B, S, D, generator=gen)
    g_all = torch.randn(world, B, S, D, generator=gen)
    mask_all = torch.rand(world, B, S, generator=gen) > 0.25 if masked else None
    if masked == "empty_last_rank":
        mask_all[-1] = False
    with_losses = not per_rank

    x = x_all[rank].clone().requires_grad_()
    with _WireBytes(layout.ep_group) if ep > 1 else contextlib.nullcontext() as wire:
        out = model(x, None if mask_all is None else mask_all[rank])
        objective = (out.output * g_all[rank]).sum()
        if with_losses:
            objective = objective + out.aux_loss + out.z_loss
        objective.backward()
    sync_gradients(model, layout)

    # Reference: EP group j is one process on ranks j*ep .. j*ep+ep-1 concatenated (rank-major).
    x_ref = x_all.clone().requires_grad_()
    out_ref = torch.empty_like(x_all)
    kept_ref, routed_ref = torch.zeros(E), torch.zeros(E)
    size = 1 if per_rank else ep
    for j in range(world // size):
        rs = slice(j * size, (j + 1) * size)
        mask = None if mask_all is None else mask_all[rs].reshape(size * B, S)
        o = ref(x_ref[rs].reshape(size * B, S, D), mask)
        (o.output * g_all[rs].reshape(size * B, S, D)).sum().backward()
        out_ref[rs] = o.output.detach().view(size, B, S, D)
        kept_ref += o.stats.tokens_per_expert
        routed_ref += o.stats.routed_per_expert
    errs = {}
    if with_losses:  # the losses of the batch of all ranks (they do not depend on capacity drops)
        o = ref(x_ref.reshape(world * B, S, D), None if mask_all is None else mask_all.reshape(world * B, S))
        (world * (o.aux_loss + o.z_loss)).backward()
        got = {**out.losses, "aux": out.aux_loss, "z_loss": out.z_loss}
        want = {**o.losses, "aux": o.aux_loss, "z_loss": o.z_loss}
        # relative above 1: the forced routing's unweighted z-loss is about 64 (float32 ulp 8e-6)
        errs.update({f"loss/{k}": _rel_err(got[k], v) for k, v in want.items()})

    errs["output"] = _max_err(out.output, out_ref[rank])
    errs["input_grad"] = _max_err(x.grad, x_ref.grad[rank])
    ref_params = dict(ref.named_parameters())
    experts = layout.local_experts(E)
    expert_names = expert_parameter_names(model)
    finite = bool(torch.isfinite(x.grad).all())
    for name, param in model.named_parameters():
        want = ref_params[name].grad / world
        if name in expert_names:
            want = want[experts.start : experts.stop]
        errs[f"grad/{name}"] = _max_err(param.grad, want)
        finite &= bool(torch.isfinite(param.grad).all())
    want_norm = torch.stack([(p.grad / world).double().square().sum() for p in ref.parameters()]).sum().sqrt()
    errs["grad_norm"] = abs(float(clip_grad_norm(model, 0.0, layout)) - float(want_norm))
    stats = reduce_stats(out.stats, layout)
    errs["stats/kept"] = _max_err(stats.tokens_per_expert, kept_ref)
    errs["stats/routed"] = _max_err(stats.routed_per_expert, routed_ref)

    # Bytes actually sent vs what the kept counts imply (D float32 per row).
    traffic = model.dispatcher.traffic if ep > 1 else None
    if traffic is not None:
        kept_E = out.stats.tokens_per_expert
        local_E = torch.zeros(E, dtype=torch.bool)
        local_E[experts.start : experts.stop] = True
        group_kept_E = kept_E.clone()
        dist.all_reduce(group_kept_E, group=layout.ep_group)
        row = D * 4
        errs["bytes/dispatch"] = abs(traffic.dispatch_bytes - int(kept_E[~local_E].sum()) * row)
        errs["bytes/combine"] = abs(traffic.combine_bytes - int((group_kept_E - kept_E)[local_E].sum()) * row)
        errs["bytes/backward"] = abs(traffic.backward_bytes - traffic.dispatch_bytes - traffic.combine_bytes)
        errs["bytes/wire_tokens"] = abs(wire.rows - traffic.token_bytes)  # the counters are what was sent
        errs["bytes/wire_metadata"] = abs(wire.metadata - traffic.metadata_bytes)
    return {"errs": errs, "finite": finite, "dropped": float(stats.dropped_fraction)}


def _balanced_traffic_case(layout: ParallelLayout, capacity_factor: float | None) -> dict:
    """Token t picks experts t mod E then t+1 mod E: perfectly balanced, so the model is exact."""
    cfg = _cfg(capacity_factor=capacity_factor)
    torch.manual_seed(0)
    model = MoE(cfg)
    with torch.no_grad():
        model.router.gate.weight.zero_()
        model.router.gate.weight[:, :E] = torch.eye(E)
    model = shard_model(model, layout)
    t = torch.arange(B * S)
    x = torch.zeros(B * S, D)
    x[t, t % E] = 10.0
    x[t, (t + 1) % E] = 5.0
    x.requires_grad_()
    with _WireBytes(layout.ep_group) as wire:
        model(x).output.sum().backward()
    measured = model.dispatcher.traffic
    expected = expected_traffic(B * S, D, cfg.top_k, layout.ep, E, 4, capacity_factor)
    return {
        "measured": vars(measured).copy(),
        "expected": vars(expected).copy(),
        "wire": {"token_bytes": wire.rows, "metadata_bytes": wire.metadata},
        "wire_expected": {"token_bytes": expected.token_bytes, "metadata_bytes": expected.metadata_bytes},
    }


class _WireBytes:
    """Counts the bytes this rank hands to `group`'s collectives for the other ranks, independently
    of the dispatcher's own `traffic`: torch.distributed's all_to_all_single, all_gather and
    all_reduce are wrapped. all-to-all: the chunks for other ranks (input_split_sizes rows, or equal
    chunks); all-gather and all-reduce: the input once per other rank. Floating-point all-to-alls
    with split sizes are token rows, everything else metadata. Other groups (the world-wide loss
    all-reduce of GlobalLosses) are not counted, as in the model."""

    def __init__(self, group):
        self.group, self.rows, self.metadata = group, 0, 0
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def __enter__(self):
        self._saved = {
            name: getattr(dist, name) for name in ("all_to_all_single", "all_gather", "all_reduce")
        }
        saved = self._saved

        def all_to_all_single(
            output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw
        ):
            if group is self.group:
                nbytes = input.numel() * input.element_size()
                if input_split_sizes is None:
                    self.metadata += nbytes * (self.size - 1) // self.size
                else:
                    row = nbytes // max(sum(input_split_sizes), 1)
                    self.rows += row * (sum(input_split_sizes) - input_split_sizes[self.rank])
            return saved["all_to_all_single"](
                output, input, output_split_sizes, input_split_sizes, group, **kw
            )

        def all_gather(tensor_list, tensor, group=None, **kw):
            if group is self.group:
                self.metadata += tensor.numel() * tensor.element_size() * (self.size - 1)
            return saved["all_gather"](tensor_list, tensor, group=group, **kw)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, **kw):
            if group is self.group:
                self.metadata += tensor.numel() * tensor.element_size() * (self.size - 1)
            return saved["all_reduce"](tensor, op=op, group=group, **kw)

        dist.all_to_all_single, dist.all_gather, dist.all_reduce = all_to_all_single, all_gather, all_reduce
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _reshard_to_one(layout: ParallelLayout, ckpt_dir: str) -> dict:
    """EP layer -> full checkpoint (rank 0 writes it) -> the parent loads it into one process."""
    torch.manual_seed(7)
    model = shard_model(MoE(_cfg(capacity_factor=1.0)), layout)
    with torch.no_grad():  # make the shards differ from a fresh init
        for p in model.parameters():
            p.add_(0.01 * layout.rank)
    x = torch.randn(layout.world_size, B, S, D, generator=torch.Generator().manual_seed(3))
    out = model(x[layout.rank]).output.detach()
    full = gather_full_state_dict(model, layout)
    if layout.rank == 0:
        torch.save(full, os.path.join(ckpt_dir, "full.pt"))
    dist.barrier()
    return {"output": out, "x": x[layout.rank]}


def _load_from_one(layout: ParallelLayout, path: str) -> dict:
    """A single-process checkpoint loaded under EP: outputs of the group batch match one process."""
    state = torch.load(path, weights_only=True)
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model = shard_model(MoE(_cfg(capacity_factor=1.0)), layout)
    load_sharded(model, state, layout)
    x = torch.randn(layout.world_size, B, S, D, generator=torch.Generator().manual_seed(5))
    out = model(x[layout.rank]).output.detach()
    round_trip = gather_full_state_dict(model, layout)
    same = all(torch.equal(round_trip[k], state[k]) for k in state) and set(round_trip) == set(state)
    return {"output": out, "x": x[layout.rank], "round_trip_equal": same}


def _optimizer_case(layout: ParallelLayout) -> dict:
    """AdamW state gathered to the single-process layout equals one process's; loading it back
    into freshly sharded ranks and stepping again still matches (resume under another EP size)."""
    world, rank = layout.world_size, layout.rank
    torch.manual_seed(21)
    ref = MoE(_cfg(capacity_factor=1.0))
    model = shard_model(copy.deepcopy(ref), layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x_all = torch.randn(world, B, S, D, generator=torch.Generator().manual_seed(4))

    def step(m, o, x, sync):
        o.zero_grad()
        m(x).output.square().mean().backward()
        if sync:
            sync_gradients(m, layout)
        o.step()

    step(model, opt, x_all[rank], True)
    step(ref, ref_opt, x_all.reshape(world * B, S, D), False)  # mean over all = mean of rank means
    full = gather_optimizer_state(opt, model, layout)
    want = ref_opt.state_dict()["state"]
    errs = {
        f"adam/{i}/{k}": _max_err(v.float(), want[i][k].float())
        for i, st in full["state"].items()
        for k, v in st.items()
    }
    ref_params = gather_full_state_dict(model, layout)
    errs.update({f"param/{k}": _max_err(v, ref.state_dict()[k]) for k, v in ref_params.items()})

    torch.manual_seed(99)  # resume into new shards from the single-process model and optimizer
    resumed = shard_model(MoE(_cfg(capacity_factor=1.0)), layout)
    load_sharded(resumed, ref.state_dict(), layout)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    # a copy, as from a file: torch's load_state_dict keeps the given tensors (no aliasing with ref_opt)
    load_sharded_optimizer_state(resumed_opt, copy.deepcopy(ref_opt.state_dict()), resumed, layout)
    x2 = x_all.flip(0)
    step(resumed, resumed_opt, x2[rank], True)
    step(ref, ref_opt, x2.reshape(world * B, S, D), False)
    for k, v in gather_full_state_dict(resumed, layout).items():
        errs[f"resumed/{k}"] = _max_err(v, ref.state_dict()[k])
    return {"errs": errs}


def _model_case(layout: ParallelLayout, ddp: bool = False) -> dict:
    """A whole decoder: loss (cross-entropy, balance and z losses) and every gradient vs one process
    on the concatenated batch. The balance loss of every rank is the one of the whole batch.

    ddp: the forward runs through `data_parallel` (DistributedDataParallel averages the replicated
    parameters' gradients in the backward) and `sync_gradients(dense=False)` does the experts."""
    from moekit.model import ModelConfig, MoETransformer

    # Capacity is decided per EP group: the whole batch's decision only when EP spans the world.
    capacity_factor = 1.0 if layout.ep == layout.world_size else None
    moe = _cfg(load_balance_coef=0.1, z_loss_coef=0.01, capacity_factor=capacity_factor)
    cfg = ModelConfig(vocab_size=29, dim=D, n_layers=2, n_heads=2, ffn_hidden_dim=32, max_seq_len=S, moe=moe)
    world = layout.world_size
    torch.manual_seed(11)
    ref = MoETransformer(cfg)
    model = shard_model(copy.deepcopy(ref), layout)
    runner = data_parallel(model, layout) if ddp else model
    assert isinstance(runner, DistributedDataParallel) == ddp
    ids = torch.randint(0, 29, (world, B, S + 1), generator=torch.Generator().manual_seed(2))
    out = runner(ids[layout.rank, :, :-1], targets=ids[layout.rank, :, 1:])
    out.loss.backward()
    sync_gradients(model, layout, dense=not ddp)
    norm = clip_grad_norm(model, 0.05, layout)  # clipping actually scales: the norm is larger
    ref_out = ref(ids[:, :, :-1].reshape(world * B, S), targets=ids[:, :, 1:].reshape(world * B, S))
    ref_out.loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    errs = {
        "loss": abs(float(loss / world - ref_out.loss.detach())),
        "aux_loss": abs(float(out.aux_loss.detach() - ref_out.aux_loss)),  # every rank, not only the mean
        "z_loss": abs(float(out.z_loss.detach() - ref_out.z_loss)),
        "grad_norm": abs(float(norm - ref_norm)),
    }
    ref_params = dict(ref.named_parameters())
    expert_names = expert_parameter_names(model)
    experts = layout.local_experts(E)
    for name, param in model.named_parameters():
        want = ref_params[name].grad
        if name in expert_names:
            want = want[experts.start : experts.stop]
        errs[f"grad/{name}"] = _max_err(param.grad, want)
    return {"errs": errs}


# ---------------------------------------------------------------------- scenarios (run on every rank)


def scenario_parity(ep: int, cases: list[str], ckpt_dir: str = "") -> dict:
    layout = init_parallel(ep, _cfg())
    results = {}
    extreme = dict(router_bias=True)
    all_cases = {
        "dropless": lambda: _parity_case(layout, _cfg(), seed=1, masked=True),
        "capacity_position": lambda: _parity_case(layout, _cfg(capacity_factor=0.75), seed=2, masked=True),
        "capacity_probability": lambda: _parity_case(
            layout, _cfg(capacity_factor=0.5, drop_policy="probability", min_capacity=2), seed=3, masked=False
        ),
        "extreme_dropless": lambda: _parity_case(
            layout, _cfg(**extreme), seed=4, masked=False, setup=lambda m: _force_routing(m, 0, 1)
        ),
        "extreme_capacity": lambda: _parity_case(
            layout,
            _cfg(capacity_factor=1.0, **extreme),
            seed=5,
            masked=True,
            setup=lambda m: _force_routing(m, 1, 0),
        ),
        "all_losses": lambda: _parity_case(
            layout,
            _cfg(importance_coef=0.5, load_coef=0.5, seq_balance_coef=0.5, capacity_factor=1.0),
            seed=9,
            masked=True,
        ),
        "empty_rank": lambda: _parity_case(
            layout, _cfg(capacity_factor=1.0, seq_balance_coef=0.5), seed=10, masked="empty_last_rank"
        ),
        "shared_top1": lambda: _parity_case(
            layout,
            _cfg(top_k=1, num_shared_experts=1, shared_gate=True, expert_bias=True),
            seed=6,
            masked=False,
        ),
        "expert_choice": lambda: _parity_case(
            layout, _cfg(router="expert_choice"), seed=8, masked=True, per_rank=True
        ),
        "traffic_dropless": lambda: _balanced_traffic_case(layout, None),
        "traffic_capacity": lambda: _balanced_traffic_case(layout, 1.0),
        "model": lambda: _model_case(layout),
        "model_ddp": lambda: _model_case(layout, ddp=True),
        "optimizer": lambda: _optimizer_case(layout),
        "reshard_to_one": lambda: _reshard_to_one(layout, ckpt_dir),
        "load_from_one": lambda: _load_from_one(layout, os.path.join(ckpt_dir, "single.pt")),
    }
    for name in cases:
        results[name] = all_cases[name]()
    return results


def scenario_bad_layouts() -> dict:
    """Each bad setting must raise on every rank, and the group must still work afterwards."""
    rank = dist.get_rank()
    attempts = {
        "ep_not_dividing_world": lambda: init_parallel(3, _cfg()),
        "experts_not_divisible": lambda: init_parallel(2, _cfg(num_experts=3, top_k=1)),
        "config_mismatch": lambda: init_parallel(2, _cfg(hidden_dim=F + rank)),
        "ep_mismatch": lambda: init_parallel(1 + rank, _cfg()),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
        dist.barrier()  # every rank got here: nobody is stuck in a collective
    return messages


SCENARIOS = {"parity": scenario_parity, "bad_layouts": scenario_bad_layouts}


# ---------------------------------------------------------------------- parent-side assertions


def _assert_parity(results: list[dict], cases: list[str]) -> None:
    for rank, res in enumerate(results):
        for case in cases:
            r = res[case]
            if "finite" in r:
                assert r["finite"], f"rank {rank} {case}: non-finite gradients"
            if "errs" in r:
                bad = {k: v for k, v in r["errs"].items() if v > TOL}
                assert not bad, f"rank {rank} {case}: errors above {TOL}: {bad}"
            if "measured" in r:
                assert r["measured"] == r["expected"], (
                    f"rank {rank} {case}: bytes {r['measured']} != {r['expected']}"
                )
                assert r["wire"] == r["wire_expected"], (
                    f"rank {rank} {case}: bytes handed to the collectives {r['wire']} != {r['wire_expected']}"
                )


PARITY_CASES = [
    "dropless",
    "capacity_position",
    "capacity_probability",
    "extreme_dropless",
    "extreme_capacity",
    "all_losses",
    "empty_rank",
]


def _single_process_output(state: dict, results: list[dict], case: str) -> torch.Tensor:
    """One process with `state` on the ranks' concatenated inputs -> [W, B, S, D]."""
    model = MoE(_cfg(capacity_factor=1.0))
    model.load_state_dict(state)
    world = len(results)
    x = torch.stack([res[case]["x"] for res in results]).reshape(world * B, S, D)
    return model(x).output.detach().view(world, B, S, D)


def test_world2_ep2_matches_single_process(tmp_path):
    cases = [
        *PARITY_CASES,
        "shared_top1",
        "expert_choice",
        "traffic_dropless",
        "traffic_capacity",
        "model",
        "model_ddp",
        "optimizer",
        "reshard_to_one",
    ]
    results = run_ranks("parity", 2, ep=2, cases=cases, ckpt_dir=str(tmp_path))
    _assert_parity(results, cases)
    assert all(res["capacity_position"]["dropped"] > 0 for res in results), "capacity must drop tokens"
    assert all(res["extreme_capacity"]["dropped"] > 0.3 for res in results)
    # checkpoint EP 2 -> 1: the full layout loads into one process and gives the EP outputs
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    assert state["experts.w_in_EDF"].shape == (E, D, 2 * F)
    want = _single_process_output(state, results, "reshard_to_one")
    for rank, res in enumerate(results):
        assert _max_err(res["reshard_to_one"]["output"], want[rank]) < TOL, rank


def test_world4_ep4_matches_single_process(tmp_path):
    # checkpoint 1 -> EP 4: a single-process state dict loads into four shards
    torch.manual_seed(9)
    single = MoE(_cfg(capacity_factor=1.0))
    with torch.no_grad():
        single.experts.w_out_EFD[2].mul_(3.0)  # an expert that differs visibly
    torch.save(single.state_dict(), tmp_path / "single.pt")
    cases = [
        "dropless",
        "capacity_position",
        "extreme_capacity",
        "empty_rank",
        "traffic_capacity",
        "load_from_one",
    ]
    results = run_ranks("parity", 4, ep=4, cases=cases, ckpt_dir=str(tmp_path))
    _assert_parity(results, cases)
    want = _single_process_output(single.state_dict(), results, "load_from_one")
    for rank, res in enumerate(results):
        assert res["load_from_one"]["round_trip_equal"], rank
        assert _max_err(res["load_from_one"]["output"], want[rank]) < TOL, rank


def test_world4_ep2_reduces_experts_over_expert_data_parallel_group():
    cases = ["dropless", "capacity_probability", "extreme_dropless", "all_losses", "empty_rank", "model"]
    cases += ["model_ddp", "traffic_dropless"]
    _assert_parity(run_ranks("parity", 4, ep=2, cases=cases), cases)


def test_world2_ep1_data_parallel_matches_single_process():
    """EP 1 < world 2: experts replicated, the local dispatcher, capacity per rank; the losses are
    still those of both ranks' batch."""
    cases = ["dropless", "capacity_position", "all_losses", "empty_rank", "model", "model_ddp"]
    _assert_parity(run_ranks("parity", 2, ep=1, cases=cases), cases)


def test_bad_layouts_fail_on_every_rank():
    results = run_ranks("bad_layouts", 2)
    for rank, msgs in enumerate(results):
        assert "ep=3" in msgs["ep_not_dividing_world"] and "world size 2" in msgs["ep_not_dividing_world"], (
            rank
        )
        assert "num_experts=3" in msgs["experts_not_divisible"], rank
        assert "ep=2" in msgs["experts_not_divisible"], rank
        # the differing settings are named with every rank's value
        assert "config.hidden_dim: rank 0 has 24, rank 1 has 25" in msgs["config_mismatch"], rank
        assert "ep: rank 0 has '1', rank 1 has '2'" in msgs["ep_mismatch"], rank


# ---------------------------------------------------------------------- single-process pieces


def test_single_process_layout_is_a_no_op():
    layout = init_parallel(1, _cfg())
    assert layout == ParallelLayout.single() and not layout.distributed
    moe = MoE(_cfg())
    assert shard_model(moe, layout) is moe
    moe(torch.randn(3, D)).output.sum().backward()
    before = {n: p.grad.clone() for n, p in moe.named_parameters()}
    sync_gradients(moe, layout)
    assert all(torch.equal(before[n], p.grad) for n, p in moe.named_parameters())
    with pytest.raises(ValueError, match="ep=2 does not divide the world size 1"):
        init_parallel(2)


def test_shard_refuses_hierarchical_experts():
    inner = MoEConfig(dim=D, hidden_dim=8, num_experts=2, top_k=1)
    model = MoE(_cfg(inner=inner))
    assert shard_model(model, ParallelLayout.single()) is model  # EP 1 leaves any model alone
    with pytest.raises(ValueError, match="HierarchicalExperts experts"):
        shard_model(model, ParallelLayout(world_size=2, rank=0, ep=2))


def test_layout_groups_are_ep_major():
    layout = ParallelLayout(world_size=8, rank=5, ep=4)
    assert layout.ep_rank == 1 and layout.ep_ranks == [4, 5, 6, 7] and layout.edp_ranks == [1, 5]
    assert layout.local_experts(8) == range(2, 4)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by parallel.ep=4"):
        layout.local_experts(6)


def test_config_digest_is_stable_and_sensitive():
    assert config_digest(_cfg()) == config_digest(_cfg())
    assert config_digest(_cfg()) != config_digest(_cfg(hidden_dim=F + 1))


def test_expected_traffic_formula():
    t = expected_traffic(num_tokens=1024, dim=512, top_k=2, ep=4, num_experts=8, elem_bytes=2)
    one_way = 2 * 1024 * 3 // 4 * 512 * 2  # k T (P-1)/P rows of D bf16
    assert (t.dispatch_bytes, t.combine_bytes, t.backward_bytes) == (one_way, one_way, 2 * one_way)
    assert t.metadata_bytes == 8 * 2 * 3
    assert expected_traffic(1024, 512, 2, 1, 8).total_bytes == 0
