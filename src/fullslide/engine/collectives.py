"""Process groups and the three collectives of a step: feature gather, logit exchange, gradient reduction.

A step makes exactly three kinds of collective call, each commented where it happens:
1. ``all_gather`` of encoder features inside the tile-parallel group (ranks that share slides);
2. ``all_reduce`` of the step's slide logits over the world (every rank then computes the same loss);
3. ``all_reduce`` of gradients over the world, in buckets.
With one process (no ``torch.distributed``) all three are no-ops and nothing is copied.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from fullslide.engine.mesh import ParallelDims

_BUCKET_ELEMENTS = 1 << 25  # 32 Mi elements (128 MB fp32) per gradient all_reduce


@dataclass
class ParallelContext:
    """Where this process sits in the layout, and the process group of its tile-parallel group."""

    dims: ParallelDims
    rank: int
    device: torch.device
    tp_group: "dist.ProcessGroup | None" = None  # None when tile_parallel == 1 (nothing to gather)

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelContext":
        """One process, no ``torch.distributed``."""
        return cls(dims=ParallelDims(world_size=1, tile_parallel=1), rank=0, device=torch.device(device))

    @property
    def distributed(self) -> bool:
        return self.dims.world_size > 1

    @property
    def tp_size(self) -> int:
        return self.dims.tile_parallel

    @property
    def tp_rank(self) -> int:
        return self.dims.tp_rank(self.rank)

    @property
    def slide_group(self) -> int:
        return self.dims.group_of(self.rank)


def init_parallel(
    tile_parallel: int = 1, backend: str | None = None, timeout_s: float = 1800.0, device: str = "auto"
) -> ParallelContext:
    """Join the job started by torchrun (or return a single-process context when there is none).

    Uses NCCL and ``cuda:LOCAL_RANK`` when CUDA is available (``device`` "auto" or "cuda"), gloo and the CPU
    otherwise. Every rank creates every tile-parallel group (``new_group`` is collective) and keeps its own.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        from fullslide.errors import ConfigError

        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ConfigError(f"train.device: 'cuda' was asked for, but {why} (torch {torch.__version__}); "
                          "use train.device=auto or cpu")
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world == 1 and not dist.is_initialized():
        ParallelDims(world_size=1, tile_parallel=tile_parallel)  # validates tile_parallel against a world of 1
        return ParallelContext.single(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if cuda else "gloo"),
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
        atexit.register(shutdown_parallel)  # a process group left to static destructors can abort (gloo threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(world_size=world, tile_parallel=tile_parallel)
    own = None
    for group in range(dims.slide_groups):
        pg = dist.new_group(dims.group_ranks(group)) if dims.tile_parallel > 1 else None
        if group == dims.group_of(rank):
            own = pg
    return ParallelContext(dims=dims, rank=rank, device=device, tp_group=own)


def shutdown_parallel(*, wait: bool = False) -> None:
    """Destroy the default process group (if any); with ``wait``, first let every rank arrive."""
    if not dist.is_initialized():
        return
    if wait:
        dist.barrier()  # COLLECTIVE (world): the last one, so no rank leaves while another still needs it
    dist.destroy_process_group()


def all_gather_rows(ctx: ParallelContext, local: torch.Tensor, rows_per_rank: Sequence[int]) -> list[torch.Tensor]:
    """Gather a ``[rows, D]`` tensor from every rank of the tile-parallel group; row counts may differ.

    ``rows_per_rank[r]`` must be known on every rank (it is, from the chunk layout), so the tensors are
    padded to the largest count and gathered in one call.
    """
    if ctx.tp_size == 1:
        return [local]
    width = local.shape[1]
    most = max(rows_per_rank)
    padded = local.new_zeros((most, width))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in rows_per_rank]
    dist.all_gather(parts, padded, group=ctx.tp_group)  # COLLECTIVE (tile-parallel group): features
    return [p[:n] for p, n in zip(parts, rows_per_rank)]


def share_rows(ctx: ParallelContext, rows: torch.Tensor) -> torch.Tensor:
    """Sum a ``[N, C]`` tensor over the world where each row is filled by exactly one rank (others zero)."""
    if ctx.distributed:
        dist.all_reduce(rows, op=dist.ReduceOp.SUM)  # COLLECTIVE (world): slide logits of the step
    return rows


def all_reduce_gradients(ctx: ParallelContext, params: Sequence[torch.nn.Parameter]) -> None:
    """Sum ``.grad`` of ``params`` over the world, in flat buckets.

    A parameter without a gradient on this rank contributes zeros. One that has no gradient on *any* rank keeps
    ``.grad = None``, as it would in one process (an optimizer then skips it: AdamW applies no weight decay to
    it). Each bucket carries one presence count per parameter after its gradients, so this costs no extra
    collective.
    """
    if not ctx.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)  # by the parameter: the same buckets on every rank
    for group in by_dtype.values():
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in group + [None]:  # None flushes the last bucket
            if p is not None and (size + p.numel() <= _BUCKET_ELEMENTS or not bucket):
                bucket.append(p)
                size += p.numel()
                continue
            _reduce_bucket(bucket)
            bucket, size = ([p], p.numel()) if p is not None else ([], 0)


def _reduce_bucket(bucket: list[torch.nn.Parameter]) -> None:
    """One all_reduce for the gradients of ``bucket`` (same dtype) and their presence counts."""
    ref = bucket[0].grad if bucket[0].grad is not None else bucket[0]
    parts = [q.grad.reshape(-1) if q.grad is not None else ref.new_zeros(q.numel()) for q in bucket]
    present = torch.tensor([q.grad is not None for q in bucket], dtype=ref.dtype, device=ref.device)
    flat = torch.cat(parts + [present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # COLLECTIVE (world): gradients + presence, one bucket
    anyone = (flat[-len(bucket):] > 0).tolist()  # host sync: one per bucket
    offset = 0
    for q, has in zip(bucket, anyone):
        if not has:  # no rank had a gradient: stay None, as in one process
            q.grad = None
        elif q.grad is None:
            q.grad = flat[offset : offset + q.numel()].view_as(q).clone()
        else:
            q.grad.copy_(flat[offset : offset + q.numel()].view_as(q.grad))
        offset += q.numel()
