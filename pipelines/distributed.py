"""Processes, devices and collectives: the one place (with the engine in ``pipelines.optim``) that knows
``torch.distributed`` and DeepSpeed's process group. The libraries receive what they need from here as arguments:
``gather`` functions for the global-batch losses and ``mean_over_ranks_tensor`` for the global token counts."""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch

from .config import DeepSpeedConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(ds: DeepSpeedConfig) -> DistInfo:
    """Join (or create, for a plain single process) the process group DeepSpeed needs."""
    import deepspeed
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:  # plain `python -m ...` / `dvlp ...`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    backend = ds.backend if ds.backend != "auto" else ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient of the gathered tensor and keeps this rank's rows.

    Not ``torch.distributed.nn.functional.all_gather``: on gloo its backward (an all_to_all into ``empty_like`` of
    the incoming gradients) returns wrong values when those gradients are not contiguous, as einsum's are.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows[0]:ctx.rows[1]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (the ``gather`` the libraries' global-batch losses receive); every rank
    must pass the same shape."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (hard-negative mining, caption ids)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def mean_over_ranks_tensor(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the ranks (an all-reduce; ``x`` itself in one process), without gradient: the
    ``mean_count_over_ranks`` the token-averaged losses (the LLM's LM loss, ITG) receive, so that each rank divides its
    summed token loss by global token count / world size."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    total = x.detach().to(torch.float64).clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(values, t.tolist())}


def gather_objects(obj):
    """Every rank's ``obj`` (picklable), in rank order: e.g. the data positions a checkpoint keeps per rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(dist_info: DistInfo):
    """The block runs on the main rank first, then on the others: for work that leaves shared files behind (the
    feature and prompt caches), so that one rank builds them and the others open them complete."""
    if not dist_info.is_main:
        barrier()
    try:
        yield
    finally:
        if dist_info.is_main:
            barrier()


