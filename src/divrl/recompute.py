"""Activation checkpointing of the policy's forwards with gradient (config key
`activation_checkpointing`): each transformer block keeps only its inputs for the backward and runs
its forward again there (`torch.utils.checkpoint`, non-reentrant), so a micro-batch holds one
block's activations at a time instead of all of them, for one more forward of the policy.

HF's own `activation_checkpointing_enable` (formerly `gradient_checkpointing_enable`, what TRL's
`gradient_checkpointing` turns on) cannot serve divrl's KV-cache path: in training mode its blocks
drop the KV cache, and `completion_hidden` runs each prompt once and its completions on that
prompt's cache. Here the blocks keep the cache, and the cache gives the same KV when a block runs
again: `completion_hidden`'s full-attention layers (`hidden.PrefixedLayer`) hold the prompt's KV
and replace, not append, what an update adds. Layers of other kinds (sliding windows) append, so a
model with them is refused (`refusal`). A packed forward (`divrl.packing`) has no cache: its
blocks run again on the same inputs and layout.

Measured (`benchmarks/grpo_step.py --sides …,divrl-fp32-recompute`, 20 steps, SmolLM2-135M, 4
prompts × 8 samples, micro-batches of 16, fp32, 2-core AVX2 EPYC): peak RSS 4.54 GB against 5.44
GB, the update's forward + backward 21.0 s against 16.3 s a step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from divrl import attention
from divrl.models import replaced_forwards
from divrl.sharding import blocks


def refusal(model: PreTrainedModel) -> str | None:
    """Why `model`'s blocks cannot be recomputed here, or None when they can."""
    name = type(model).__name__
    if not blocks(model):
        return f"{name} names no transformer block classes (_no_split_modules) to checkpoint"
    others = attention.other_layer_kinds(model)
    if others:
        return (
            f"{name} has attention layers of other kinds than full attention ({', '.join(others)}): "
            f"their cache appends on every forward, so a recomputed block would see its keys twice"
        )
    return None


@contextmanager
def recomputed_activations(model: nn.Module) -> Iterator[None]:
    """Inside, each transformer block of `model` (`sharding.blocks`) runs under non-reentrant
    activation checkpointing: its forward's intermediate tensors are recomputed in the backward
    instead of kept. The same numbers as without (the blocks run deterministic ops; checkpoint
    restores the RNG state for dropout)."""
    with replaced_forwards(blocks(model), lambda block: partial(checkpoint, block.forward, use_reentrant=False)):
        yield
