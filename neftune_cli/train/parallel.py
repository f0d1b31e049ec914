"""Everything distributed, in one place: torchrun's process group, DDP / FSDP2 wrapping, each rank's share of a
step, the step's collectives, rank-0 I/O and full state dicts for checkpoints.

With one process (no torchrun, or ``--nproc_per_node 1``) every function here is the identity or does nothing,
so the training loop reads as a single-process loop.

The global batch is the recipe's: a step is ``train.grad_accum`` micro-batches of ``train.micro_batch_size``
examples, whatever the number of processes; each of W processes runs ``grad_accum / W`` of them (the step's
micro-batches r, r + W, ...). The loss is normalised by the trained tokens of the whole step across ranks, so
W processes compute the same update as one.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist
from torch import nn

from neftune_cli.io import console
from neftune_cli.io.errors import UsageError
from neftune_cli.train.precision import Precision


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "ddp"  # train.distributed

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes the run directory."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.mode == "fsdp"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


SINGLE = Dist()


def init(mode: str) -> Dist:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); one process when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(mode=mode)
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), mode)
    if not dist.main:  # one voice: rank 0 logs; the others print only their own errors (see cli.main)
        console.out.quiet = console.err.quiet = True
    if not torch_dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(dist.local_rank)
        # A long timeout: rank 0 alone tokenizes the data while the others wait at a barrier.
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
    return dist


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def check_batch(grad_accum: int, micro_batch_size: int, dist: Dist) -> None:
    if grad_accum % dist.world:
        raise UsageError(
            f"train.grad_accum {grad_accum} does not divide among {dist.world} processes: a step is {grad_accum} "
            f"micro-batches of {micro_batch_size} examples in total, and each process runs the same number of them; "
            f"use a multiple of {dist.world} (e.g. {dist.world * max(1, round(grad_accum / dist.world))})"
        )


def my_share(items: list, dist: Dist, pad: bool = False) -> list:
    """This rank's micro-batches of a step (or batches of the eval set): r, r + W, r + 2W, ...

    pad: None fills the shares that come up short (an epoch's last step), so every rank runs as many forwards
    and backwards as the others: gradient reduction and FSDP's gathers need every rank, every time.
    """
    share = items[dist.rank :: dist.world]
    return share + [None] * (-(-len(items) // dist.world) - len(share)) if pad else share


def sum_all(values: list[float], dist: Dist) -> list[float]:
    """Element-wise sums over the ranks (one small all-reduce); the values themselves with one process."""
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return t.tolist()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


@contextmanager
def main_first(dist: Dist):
    """Rank 0 runs the block first (tokenize and cache the data, clean the run dir), then the others."""
    if not dist.main:
        barrier(dist)
    yield
    if dist.main:
        barrier(dist)


def wrap(lm_loss: nn.Module, dist: Dist, precision: Precision) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per decoder layer, then the whole, casting as ``precision`` says), around the
    training forward."""
    if not dist.enabled:
        return lm_loss
    if dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync in forward: rotary caches are the same everywhere, and eval's shares of batches differ in
        # number between ranks (torch 2.13 renamed the switch)
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        return DistributedDataParallel(
            lm_loss, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None, **no_sync
        )
    from torch.distributed.fsdp import fully_shard

    policy = precision.fsdp_policy()
    for layer in decoder_layers(lm_loss):
        fully_shard(layer, mp_policy=policy)
    fully_shard(lm_loss, mp_policy=policy)
    return lm_loss


def materialize(lm_loss: nn.Module, source: nn.Module | None, dist: Dist) -> None:
    """FSDP: the model, built on the meta device and sharded on every rank, gets its weights. Rank 0 holds them whole
    in host memory (``source``: the same model, loaded on the CPU) and sends each rank its shards, tensor by
    tensor, so no GPU ever holds the whole model. Buffers (RoPE tables, ...) come from rank 0 as well."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    lm_loss.to_empty(device=dist.device)
    state = source.state_dict() if dist.main else {}
    set_model_state_dict(lm_loss.model, state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = dict(source.named_buffers()) if dist.main else {}
    for name, buffer in lm_loss.model.named_buffers():
        if dist.main:
            buffer.copy_(buffers[name])
        torch_dist.broadcast(buffer, src=0)


def probe(forward: nn.Module, lm_loss: nn.Module, check, dist: Dist):
    """``check(lm_loss)`` (a start-up measurement or check); under FSDP run as the sharded module's forward, on
    every rank, so that FSDP gathers the weights it reads."""
    return forward(probe=check) if dist.fsdp else check(lm_loss)


def decoder_layers(lm_loss: nn.Module) -> list[nn.Module]:
    layers = getattr(lm_loss.decoder, "layers", None)
    if layers is None:
        raise UsageError("train.distributed: fsdp needs a decoder with a `layers` list (Llama, Mistral, Qwen...); "
                         "use train.distributed: ddp")
    return list(layers)


def grad_sync(module: nn.Module, dist: Dist, last: bool):
    """Gradients are reduced across ranks once per step, on its last micro-batch, not on every one."""
    if not dist.enabled or last:
        if dist.fsdp:
            module.set_requires_gradient_sync(True)
        return nullcontext()
    if dist.fsdp:
        module.set_requires_gradient_sync(False)
        return nullcontext()
    return module.no_sync()


def gather_object(obj, dist: Dist) -> list:
    """Every rank's `obj`, in rank order, on rank 0 (others get [])."""
    if not dist.enabled:
        return [obj]
    out = [None] * dist.world if dist.main else None
    torch_dist.gather_object(obj, out, dst=0)
    return out or []


def full_model_state(model: nn.Module, dist: Dist) -> dict | None:
    """The unsharded trained weights (on rank 0, on the CPU) when FSDP holds them in shards; None otherwise (the
    model's own state dict is whole). Every rank must call it. Frozen weights are never gathered: what we save is
    the trained ones (an adapter, or every weight of a full fine-tune), and a LoRA run's frozen base would otherwise
    pass through rank 0's host memory at every checkpoint (13.5 GB on a 7B model)."""
    if not dist.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def optimizer_state(model: nn.Module, optimizer, dist: Dist) -> dict:
    """The optimizer state to save: whole on rank 0 even when FSDP shards it. Every rank must call it."""
    if not dist.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict, dist: Dist) -> None:
    if not dist.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local part of a tensor FSDP shards (a DTensor); the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_peer_failure(error: BaseException) -> bool:
    """Did a collective fail because another process died? That process prints the cause; repeating its
    consequence on every other rank would bury it."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    return isinstance(error, getattr(torch_dist, "DistError", ())) or any(
        hint in str(error) for hint in ("Connection closed by peer", "remote worker", "Connection reset by peer")
    )
