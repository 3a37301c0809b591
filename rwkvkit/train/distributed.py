"""Multi-process training plumbing: process group set-up under torchrun, DDP / FSDP2 wrapping, reductions,
and full (unsharded) state dicts for checkpoints.

One process (no ``WORLD_SIZE`` in the environment, or 1) needs no process group and every helper here is
a no-op. Under ``torchrun --nproc_per_node=N -m rwkvkit.train ...`` each process joins the group from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``):
NCCL on CUDA (each process takes ``cuda:LOCAL_RANK``), gloo elsewhere (CPU). Rank 0 alone writes files.

State dicts go through ``torch.distributed.checkpoint.state_dict`` with full_state_dict: the same code
gathers a plain module, a DDP replica or FSDP2 shards into one ordinary state dict on rank 0, and loads
one back (rank 0 reads the file, the values are broadcast).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rwkvkit.errors import RwkvkitError


@dataclass
class Distributed:
    """Where this process stands: rank of world_size, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(0, 1, 0, torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Distributed(rank, world_size, local_rank, dev)


def teardown(world: Distributed) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: Distributed, fsdp: bool) -> nn.Module:
    """The module the training loop calls: the model itself, a DDP replica, or FSDP2-sharded in place."""
    if not world.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard  # here: only FSDP runs need it

        for block in model.blocks:  # one shard group per layer, then the rest (emb, ln_out, head)
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # find_unused_parameters: some parameters take no part in a step (layer 0's v0/v1/v2 in RWKV-7)
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def no_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce for a micro-batch whose gradients are accumulated locally."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def all_reduce_sum(value: torch.Tensor, world: Distributed) -> torch.Tensor:
    """The sum over all processes of ``value`` (a tensor on this process's device)."""
    if world.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_gradients(module: nn.Module, world: Distributed, mean: bool, bucket: int = 1 << 24) -> None:
    """Sum (``mean=False``) or average (``mean=True``, as DDP's backward does) the ``.grad`` of
    ``module``'s trained parameters over the processes, in place, for steps that run the unwrapped model.
    A parameter that has a gradient on some process but not on this one takes part with zeros; one no
    process has a gradient for keeps None. Gradients travel flattened in buckets of about ``bucket``
    elements."""
    if not world.enabled:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    has = torch.tensor([float(p.grad is not None) for p in params], device=world.device)
    has = all_reduce_sum(has, world)
    grads = []
    for p, n in zip(params, has.tolist(), strict=True):
        if n > 0:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    while grads:
        size, count = 0, 0
        while count < len(grads) and (count == 0 or size + grads[count].numel() <= bucket):
            size += grads[count].numel()
            count += 1
        part, grads = grads[:count], grads[count:]
        flat = torch.cat([g.flatten() for g in part])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if mean:
            flat /= world.world_size
        offset = 0
        for g in part:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def sum_values(values: list[float], world: Distributed) -> list[float]:
    """The sums over all processes of a few numbers (float64, one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    return all_reduce_sum(t, world).tolist()


def barrier(world: Distributed) -> None:
    if world.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, world: Distributed) -> bool:
    """Rank 0's value of ``flag`` on every process."""
    if not world.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=world.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# torch.distributed.checkpoint is imported where it is used: it adds about half of torch's import time.


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(model state dict, optimizer state dict), complete and on the CPU, on rank 0 (empty elsewhere).

    Collective: every process must call it. Optimizer state is keyed by parameter name.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(model, options=_options())
    optim_sd = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=_options())
    return model_sd, optim_sd


def load_full_state_dicts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict,
    world: Distributed,
) -> None:
    """Load complete state dicts (as :func:`full_state_dicts` made them) into every process's model and
    optimizer; under several processes only rank 0's copy is read and the values are broadcast."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options(broadcast_from_rank0=world.enabled)
    # A parameter that never had a gradient (RWKV-7 layer 0's unused v0/v1/v2) has no optimizer state.
    optim_options = _options(broadcast_from_rank0=world.enabled, strict=False)
    try:
        set_model_state_dict(model, model_sd, options=options)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=optim_options)
    except (KeyError, RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())[:300]
        raise RwkvkitError(f"the training state does not fit this model and optimizer ({detail})") from None
