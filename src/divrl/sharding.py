"""FSDP for data-parallel training (config key `fsdp: true`): the policy's weights, gradients and
AdamW state are sharded over the ranks with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`),
so each rank keeps 1/W of the optimizer state and of the weights and gradients it steps.

How it meets divrl's step (`divrl.distributed` for the data-parallel rules it keeps):

- **Sharding.** Each transformer block (the model's `_no_split_modules`, the classes transformers
  says must not be split, as accelerate's FSDP auto-wrap uses) is one FSDP unit, the rest of the
  model (embeddings, final norm, output head) the root unit.
- **Gathered for the step.** divrl's ranks run different numbers of forwards (each rank samples
  to its own stop tokens, packs its own length buckets, evaluates on rank 0 alone) and read the
  output head outside the model's forward. Per-layer all-gathers in each forward would not pair up
  across ranks, so `gather` all-gathers every unit once, on every rank, before the step's work,
  and the units stay gathered (`reshard_after_forward=False`): sampling, the frozen passes and
  the update's forwards and backwards run on full weights with no collective.
- **Gradients.** The update's backward passes accumulate full gradients locally
  (`set_requires_gradient_sync(False)`); `reduce_gradients` then runs one synchronized backward
  of a zero loss through a one-token forward of the whole model, in which FSDP reduce-scatters
  the accumulated gradients, unit by unit, in the same order on every rank, and reshards. The
  reduction is a sum (divide factor 1), as `distributed.all_reduce_grads` is: the loss is already
  normalized over the global batch. Clipping (the norm of the sharded gradients), AdamW's step
  on the shards, then `gather` again.
- **Checkpoints** hold full tensors in the one-process format (`full_weights`,
  `full_optimizer_state`: collectives on every rank, rank 0 writes), so they load in one process
  or at another world size (`load_weights`, `load_optimizer_state`).

What this buys: between steps a rank holds 4 + 16/W bytes per float32 parameter (the gathered
weights, and its shards of the weights, the gradients and AdamW's two moments) against plain
data-parallel's 16; during the update it also holds the full gradients it accumulates. The
reference and the teacher are frozen full copies (not sharded). Per-layer resharding during the
forward (ZeRO-3's peak) is not done, for the reason above. Measured: `benchmarks/fsdp_memory.py`.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def units(model: nn.Module) -> list[FSDPModule]:
    """The model's FSDP units, the root last (gathers and reductions visit them in this order)."""
    found = [cast(FSDPModule, m) for m in model.modules() if isinstance(m, FSDPModule)]
    return [m for m in found if m is not model] + [m for m in found if m is model]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules of the classes the model lists in `_no_split_modules`, or of
    their subclasses (FSDP2's `fully_shard` swaps a block's class for `FSDP<Name>`, a subclass)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def shard(model: nn.Module, world_size: int) -> None:
    """Shard `model` in place over `world_size` ranks (the process group must be running); it is
    left sharded: build the optimizer on its parameters, then `gather`."""
    found = blocks(model)
    if not found:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules) to shard by")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size,))
    for block in found:
        fully_shard(block, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    for unit in units(model):
        unit.set_gradient_divide_factor(1.0)  # a sum over ranks: the loss is globally normalized
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
        unit.set_requires_gradient_sync(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
    # FSDP takes the module whose forward runs first as its root: the whole model's, here (divrl
    # later runs the body and the blocks directly)
    with torch.no_grad():
        _one_token_logits(model)
    _resharded(model)


def _one_token_logits(model: nn.Module) -> torch.Tensor:
    """The logits of a forward of the whole model (every unit) on one token."""
    device = next(model.parameters()).device
    return model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False).logits


def gather(model: nn.Module) -> None:
    """All-gather every unit's weights (on every rank, same order); they stay gathered."""
    for unit in units(model):
        unit.unshard()


def reduce_gradients(model: nn.Module) -> None:
    """Sum the gradients accumulated since the last reduction over the ranks into each rank's
    shard and reshard the weights: FSDP's synchronized backward, driven by a zero loss on a
    one-token forward of the whole model (it adds zeros to every gradient)."""
    everything = units(model)
    for unit in everything:
        unit.set_requires_gradient_sync(True, recurse=False)
        unit.set_reshard_after_backward(True, recurse=False)
    try:
        (_one_token_logits(model).float().sum() * 0.0).backward()
    finally:
        for unit in everything:
            unit.set_requires_gradient_sync(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)


def full(value: Any) -> Any:
    """A sharded tensor gathered to a full one on the CPU (a collective); anything else as it is."""
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def _resharded(model: nn.Module) -> nn.Module:
    """`model` with its units resharded (a local operation), so its parameters are the shards."""
    for unit in units(model):
        unit.reshard()
    return model


def _split_like(shard: DTensor, whole: torch.Tensor) -> DTensor:
    """`whole` split over the ranks as `shard` is (each rank cuts its own piece: no communication)."""
    return distribute_tensor(whole.to(shard.device), shard.device_mesh, shard.placements, src_data_rank=None)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with full tensors on the CPU (a collective: call on every rank);
    the model is left resharded (`gather` it before its next forward). Tied weights stay one
    tensor under both names, as in the model (save_pretrained then writes one of them)."""
    gathered: dict[tuple, torch.Tensor] = {}

    def key(value: torch.Tensor) -> tuple:  # the shard's storage: the same for tied names
        local = value.to_local() if isinstance(value, DTensor) else value
        return local.untyped_storage().data_ptr(), local.storage_offset(), tuple(value.shape)

    state = _resharded(model).state_dict()
    for value in state.values():
        if key(value) not in gathered:
            gathered[key(value)] = full(value)
    return {name: gathered[key(value)] for name, value in state.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy full weights (every rank holds them, read from the same checkpoint) into this rank's
    shards; returns the (missing, unexpected) names, as `load_state_dict` does; left resharded."""
    params = dict(_resharded(model).named_parameters())
    for name, p in params.items():
        if name in state:
            shard = cast(DTensor, p)
            with torch.no_grad():
                shard.to_local().copy_(_split_like(shard, state[name].to(p.dtype)).to_local())
    return [n for n in params if n not in state], [n for n in state if n not in params]


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with full tensors (the one-process format; a collective)."""
    state = optimizer.state_dict()
    return {
        "state": {i: {k: full(v) for k, v in s.items()} for i, s in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a one-process optimizer state dict into the optimizer of the sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded: dict[int, dict] = {}
    for index, values in state["state"].items():
        p = params[index]
        sharded[index] = {
            k: _split_like(p, v) if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
            for k, v in values.items()
        }
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})
