"""Data-parallel training: `torchrun --nproc_per_node N -m divrl train …` (or `accelerate launch
-m divrl train …`) runs N ranks that each sample, score and backpropagate a share of every step's
batch; the update equals that of one process on the whole batch (up to float summation order).

How a step is split, and why the result is the single-process update:

- **Launch.** The launcher sets RANK, WORLD_SIZE and LOCAL_RANK (torchrun and accelerate both do,
  with MASTER_ADDR/MASTER_PORT); `init` starts the process group from them: `gloo` on the CPU,
  `nccl` on CUDA, each rank on `cuda:LOCAL_RANK` (`device: auto`/`cuda`). WORLD_SIZE unset or 1
  is the ordinary single-process run, unchanged bit for bit; a process group started by the caller
  (a test's `init_method=file://…`) is used as it is. Collectives wait `DIVRL_DIST_TIMEOUT_MINUTES`
  (default 120): ranks ≥ 1 wait at the next collective while rank 0 evaluates.
- **Prompts.** Every rank draws the same `prompts_per_step` prompts for the step (the prompt
  source is seeded by the run's seed, and its state, e.g. the curriculum's EMA, is fed the pass
  rates of *all* groups, gathered in batch order) and takes one contiguous block of
  `prompts_per_step / W` of them (`shard`): a group never straddles ranks, and rank order is batch
  order. `prompts_per_step` not a multiple of W is refused (ConfigError naming both).
- **Sampling.** Each rank samples its block with its own generator: rank 0's is seeded by `seed`
  exactly as in one process, rank r's by (`seed`, r) (`rank_seed`). Completions of a W-rank run
  therefore differ from a one-process run's; the update on a *given* batch does not.
- **Loss normalizer and gradients.** Aggregation weights (`objectives.token_scale`: token_mean's
  1/ΣL, the sequence means' 1/B) are computed over the lengths of the whole batch, gathered from
  every rank, and each rank takes its slice; each rank backpropagates Σ_t a_t ℓ_t over its tokens,
  and the gradients are *summed* over ranks (`all_reduce_grads`; no division by W — the global
  normalizer already divides). So the gradient, its clipping norm and the optimizer step are those
  of one process on the union batch, and the weights stay identical on every rank. Advantages are
  per group (a group is on one rank): no communication. The batch pass rate (`accuracy_tanh`) and
  each micro-batch's share of the batch (the entropy anchor's weight) are global. Statistics over a
  micro-batch (quantile masks such as `entropy_quantile`, the entropy anchor's H̄) stay the
  micro-batch's, as in one process; they match a one-process run exactly when the blocks
  (`prompts_per_step / W` groups) are a multiple of the micro-batch (`micro_batch_size //
  group_size` groups), so the micro-batch boundaries coincide.
- **Non-finite steps.** Whether a pass is skipped is agreed by all ranks (`agree`): the first
  rank's reason wins, and every rank skips, so the weights never diverge.
- **Metrics.** Rollout statistics are recomputed on rank 0's copy of every rank's rewards, lengths
  and verifier failures (in batch order: the same numbers as one process would log); the objective's
  token sums and loss parts are summed over ranks before `objectives.summarize`. Timings are rank
  0's. Only rank 0 writes anything under `output_dir`: `config.yaml`, `metrics.jsonl`,
  TensorBoard, the evaluations (run on rank 0 alone, the others waiting), `inspect/` records (rank
  0's share of the batch), checkpoints, the report; the other ranks print nothing either.
- **Checkpoints** are written once, by rank 0, after the optimizer step (the weights are the same
  on every rank): the same files as one process (`rng.pt` holds rank 0's sampling state) plus
  `rng-rank-R.pt`, rank R's sampling generator, for R ≥ 1. They load in one process as any
  checkpoint does.
- **Resume across world sizes.** Weights, optimizer state, prompt order and curriculum state,
  step and counters resume at any world size. A resume at the same W repeats the uninterrupted run
  exactly (every rank gets its generator back); at another W, rank 0 continues its generator, rank
  R takes `rng-rank-R.pt` when the checkpoint has one and otherwise starts a fresh stream seeded by
  (`seed`, R, step) — the sampled completions necessarily differ from those of a run at the old W.

Not supported with W > 1 (refused with a ConfigError naming the key): `dynamic_sampling` and
`prompt_filter` (the kept groups would differ per rank), `offline`, `stored` terms,
`behaviour_cloning_steps`, `stage1`, `reward_calibration` (per-rank caches and files),
`rollout_backend: vllm` (an engine per rank). With
`fsdp: true` the policy's weights, gradients and optimizer state are sharded over the ranks
(`divrl.sharding`); the rules above are unchanged, FSDP's reduce-scatter taking the place of
`all_reduce_grads`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (rank 0 of 1 in a plain run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> World:
    """The world the launcher describes in RANK / WORLD_SIZE / LOCAL_RANK (torchrun, accelerate)."""
    return World(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    )


def world() -> World:
    """The running process group's world, else the launcher's (before `init`), else one process."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", str(dist.get_rank())))
        return World(dist.get_rank(), dist.get_world_size(), local)
    return launched()


def init(device: str = "auto") -> World:
    """Start the process group when launched with WORLD_SIZE > 1 (gloo on the CPU, nccl on CUDA);
    a group already started is kept. Returns the world."""
    if dist.is_available() and dist.is_initialized():
        return world()
    here = launched()
    if not here.parallel:
        return here
    cuda = device_for(device, here).type == "cuda"
    if cuda:
        torch.cuda.set_device(here.local_rank)
    minutes = float(os.environ.get("DIVRL_DIST_TIMEOUT_MINUTES", "120"))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=minutes))
    return world()


def device_for(spec: str, here: World) -> torch.device:
    """Config key `device` on this rank: `auto`/`cuda` is `cuda:LOCAL_RANK` when CUDA is there
    (with W > 1), anything else as it is (`divrl.models.resolve_device`)."""
    if here.parallel and spec in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{here.local_rank}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


UNSUPPORTED = {  # config key → what makes it a per-rank decision (refused with W > 1)
    "dynamic_sampling": "each rank would drop and refill its own groups",
    "prompt_filter": "each rank would filter its own prompts",
    "prefix_replay": "each rank would keep its own buffer of correct traces",
    "knowledge_hints": "each rank would search hint subsets for its own prompts",
    "offline": "offline batches are not sharded",
    "behaviour_cloning_steps": "behaviour cloning writes behaviour_cloned/ from every rank",
    "stage1": "the first stage would be trained by every rank",
    "reward_calibration": "each rank would sample its own calibration set",
    "preference": "preference pairs are not sharded",
    "rollout_backend": "each rank would start its own vLLM engine",
}


def check_config(cfg: Any, here: World) -> None:
    """Refuse what data-parallel training does not support, naming the key and the world size."""
    if not here.parallel:
        return
    from divrl.config import ConfigError

    if cfg.prompts_per_step % here.size:
        raise ConfigError(
            f"config key 'prompts_per_step': {cfg.prompts_per_step} prompts cannot be split evenly over "
            f"{here.size} ranks (WORLD_SIZE); each rank takes whole groups, so prompts_per_step must be a "
            f"multiple of the world size"
        )
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for key, why in UNSUPPORTED.items():
        if getattr(cfg, key) != defaults[key]:  # on: {} too, a mapping key's defaults
            raise ConfigError(
                f"config key '{key}': not supported with data-parallel training ({here.size} ranks): {why}; "
                f"run it in one process"
            )
    if cfg.objective.stored_terms:
        raise ConfigError(
            f"config key 'terms': stored terms are not supported with data-parallel training ({here.size} "
            f"ranks); run it in one process"
        )
    on_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", here.local_rank + 1)), torch.cuda.device_count()
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available() and on_node > gpus:
        raise ConfigError(
            f"config key 'device': {cfg.device!r} puts each process of a node on its own CUDA device "
            f"(cuda:LOCAL_RANK), but this node runs {on_node} processes and has {gpus} CUDA device(s); "
            f"launch at most {gpus} per node, or set device=cpu to train on the CPU (gloo)"
        )


def shard(items: Sequence[T], here: World) -> list[T]:
    """Rank r's contiguous block of `items` (len divisible by the world size): rank order is item order."""
    if len(items) % here.size:
        raise ValueError(f"{len(items)} items do not split evenly over {here.size} ranks")
    per = len(items) // here.size
    return list(items[here.rank * per : (here.rank + 1) * per])


def rank_seed(seed: int, rank: int, step: int | None = None) -> int:
    """The seed of rank `rank`'s sampling generator: `seed` itself for rank 0 from the start (as in
    one process), else derived from (seed, rank) — and `step` for a stream started on resume."""
    if rank == 0 and step is None:
        return seed
    key = f"{seed}:rank:{rank}" + ("" if step is None else f":step:{step}")
    return random.Random(key).getrandbits(63)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    if not world().parallel:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not world().parallel:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(reason: str | None) -> str | None:
    """The first rank's non-None `reason` on every rank (None where no rank has one)."""
    return next((r for r in all_gather_object(reason) if r is not None), None)


def shutdown() -> None:
    """End the process group, if one was started (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().parallel:
        dist.barrier()


def sum_dicts(dicts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise sums, keys in first-seen order."""
    out: dict[str, float] = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = out.get(key, 0.0) + value
    return out


def all_reduce_grads(model: torch.nn.Module, bucket_elements: int = 2**25) -> None:
    """Sum every parameter's gradient over ranks, in flat buckets (one all-reduce each).

    A parameter without a gradient on every rank keeps none (AdamW then skips it, as in one
    process); one with a gradient on some rank gets zeros where it had none, then the sum."""
    if not world().parallel:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    grads = []
    for p, flag in zip(params, has.tolist()):
        if flag:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    buckets: dict[tuple[torch.dtype, torch.device], list[list[torch.Tensor]]] = {}
    for g in grads:
        group = buckets.setdefault((g.dtype, g.device), [[]])
        if group[-1] and sum(t.numel() for t in group[-1]) + g.numel() > bucket_elements:
            group.append([])
        group[-1].append(g)
    for group in buckets.values():
        for bucket in group:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
