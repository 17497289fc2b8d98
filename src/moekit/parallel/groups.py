"""Process groups for expert parallelism: who holds which experts, who averages what.

World of W ranks, expert-parallel size P (`ep`), W = P * Q. Ranks are laid out EP-major:

    EP group g            = ranks g*P .. g*P + P - 1         (adjacent ranks: the all-to-all stays
                                                             on one host when P <= ranks per host)
    expert-data-parallel  = ranks i, i + P, i + 2P, ...      (same ep_rank = same experts)

EP rank r holds experts r*E/P .. (r+1)*E/P - 1 of every MoE layer (contiguous shards); tokens only
move inside an EP group. Non-expert parameters are replicated on all W ranks (data parallel);
expert parameters are replicated over the Q ranks of an expert-data-parallel (EDP) group.

`init_parallel(ep, config)` builds both kinds of group with `torch.distributed.new_group` (every
rank creates every group, as torch requires) and validates the layout. Checks run so that every
rank raises the same error: first an all_gather of a hash of (ep, config), so that a rank started
with different settings makes all raise, naming the settings that differ and every rank's value;
then the divisibility rules, which are now identical on all ranks.
Raising on one rank while the others enter a collective would hang the job instead.

`ParallelLayout.single()` describes one process without torch.distributed: every helper of this
package is then a no-op, so a trainer needs no `if distributed` branches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the data x expert parallel layout (groups are None for one process)."""

    world_size: int
    rank: int
    ep: int  # expert-parallel size P: ranks that split each MoE layer's experts
    ep_group: Any = None  # this rank's EP group (tokens are exchanged in it)
    edp_group: Any = None  # this rank's expert-data-parallel group (expert grads are reduced in it)
    # all ranks, for DistributedDataParallel alone: its all-reduces run on a background thread
    # during the backward, next to the MoE all-to-alls, so they get a communicator of their own
    dp_group: Any = None

    @classmethod
    def single(cls) -> ParallelLayout:
        return cls(world_size=1, rank=0, ep=1)

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep

    @property
    def ep_ranks(self) -> list[int]:
        """Global ranks of this rank's EP group, in EP-rank order."""
        start = self.rank - self.ep_rank
        return list(range(start, start + self.ep))

    @property
    def edp_ranks(self) -> list[int]:
        return list(range(self.ep_rank, self.world_size, self.ep))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def local_experts(self, num_experts: int) -> range:
        """Experts of a layer with `num_experts` experts held by this rank."""
        check_divisible(num_experts, self.ep, self.world_size)
        per_rank = num_experts // self.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


def check_divisible(num_experts: int | None, ep: int, world_size: int) -> None:
    """Raise ValueError naming the values when the layout cannot be built."""
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ValueError(f"parallel.ep={ep!r} is invalid: expected a positive integer")
    if world_size % ep:
        raise ValueError(
            f"parallel.ep={ep} does not divide the world size {world_size}: expected ep in "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    if num_experts is not None and num_experts % ep:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by parallel.ep={ep}: every EP rank must hold "
            f"the same number of experts (choose ep in "
            f"{[d for d in range(1, num_experts + 1) if num_experts % d == 0 and world_size % d == 0]})"
        )


def num_experts_of(config: Any) -> list[int]:
    """Expert counts named by a MoEConfig, a ModelConfig (its `moe`), a dict, or None."""
    if config is None:
        return []
    if isinstance(config, dict):
        if "num_experts" in config:
            return [int(config["num_experts"])]
        return num_experts_of(config.get("moe"))
    if hasattr(config, "num_experts"):  # an inner (hierarchical) MoE lives inside one expert: not sharded
        return [config.num_experts]
    return num_experts_of(getattr(config, "moe", None))


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def config_digest(config: Any) -> int:
    """A stable 63-bit hash of a config (dataclass, dict or anything JSON-able via str)."""
    text = json.dumps(config, sort_keys=True, default=_jsonable)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for the leaves of nested dicts (lists are leaves)."""
    if not isinstance(obj, dict):
        return {prefix or "<value>": obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _differences(texts: list[str], limit: int = 5) -> str:
    """'key: rank 0 has X, rank r has Y' for the first `limit` settings that differ across ranks."""
    flat = [_flatten(json.loads(t)) for t in texts]
    keys = sorted(set().union(*flat))
    missing = object()
    lines = []
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if any(v != values[0] for v in values):
            shown = ", ".join(
                f"rank {r} has {'nothing' if v is missing else repr(v)}" for r, v in enumerate(values)
            )
            lines.append(f"{key}: {shown}")
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def check_consistent(config: Any, group: Any = None, what: str = "config") -> None:
    """All ranks of `group` must pass equal configs; else every rank raises naming the settings that
    differ and each rank's value.

    One all_gather of an int64 digest; every rank sees all digests, so all raise together. Only
    when they differ, the configs themselves are all-gathered (as JSON) to name the differences.
    """
    text = json.dumps(config, sort_keys=True, default=_jsonable)
    digest = torch.tensor([config_digest(config)], dtype=torch.int64)
    size = dist.get_world_size(group)
    gathered = [torch.empty_like(digest) for _ in range(size)]
    dist.all_gather(gathered, digest, group=group)
    digests = [int(d) for d in gathered]
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        texts: list[Any] = [None] * size
        dist.all_gather_object(texts, text, group=group)
        raise ValueError(
            f"{what} not the same on every rank (rank {odd[0]} differs from rank 0): {_differences(texts)}; "
            "start every rank with the same settings"
        )


def init_parallel(ep: int, config: Any = None, timeout: timedelta | None = None) -> ParallelLayout:
    """Validate (ep, config) on every rank and build the EP and expert-data-parallel groups.

    Needs an initialized default process group unless ep == 1 and it is absent (one process).
    `config` (MoEConfig, ModelConfig, dict or None) is checked for equality across ranks and for
    experts divisible by ep.
    """
    if not (dist.is_available() and dist.is_initialized()):
        check_divisible(None, ep, 1)
        for num_experts in num_experts_of(config):
            check_divisible(num_experts, ep, 1)
        return ParallelLayout.single()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_consistent({"ep": repr(ep), "config": config}, what="parallel settings (ep, config)")
    check_divisible(None, ep, world_size)
    for num_experts in num_experts_of(config):
        check_divisible(num_experts, ep, world_size)
    kwargs = {} if timeout is None else {"timeout": timeout}
    ep_group = edp_group = None
    for start in range(0, world_size, ep):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(start, start + ep)), **kwargs)
        if start <= rank < start + ep:
            ep_group = group
    for ep_rank in range(ep):
        group = dist.new_group(list(range(ep_rank, world_size, ep)), **kwargs)
        if rank % ep == ep_rank:
            edp_group = group
    dp_group = dist.new_group(list(range(world_size)), **kwargs)
    return ParallelLayout(world_size, rank, ep, ep_group, edp_group, dp_group)
