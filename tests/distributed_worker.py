"""Worker of tests/test_distributed.py: 2 training steps of a tiny model on a batch that does not
depend on how it is split, in one process (`python tests/distributed_worker.py OUT`) or as one
rank of a data-parallel launch (`torchrun --nproc_per_node 2 tests/distributed_worker.py OUT`).

Each prompt's completions are sampled with a generator seeded by the prompt's text and cut to
lengths that differ from prompt to prompt, so every rank builds exactly its block of the batch
one process builds, with unequal token counts per rank (a per-rank token-mean normalizer would
give another update). Writes OUT/rank-R.pt: after each step, the weights, the (summed, clipped)
gradients the step applied, the logged metrics and the number of AdamW first-moment elements the
rank holds. Extra `--set`-style overrides follow OUT (e.g. fsdp=true)."""

import sys
import zlib
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from divrl import sharding
from divrl.config import build_config
from divrl.rollout import Rollout
from divrl.trainer import Trainer

OVERRIDES = [
    "model=tiny",
    "dtype=float32",  # the one-process run is compared with the ranks: not a per-machine timing's choice
    "device=cpu",  # gloo, also where CUDA is
    "steps=2",
    "prompts_per_step=4",
    "group_size=2",
    "max_new_tokens=6",
    "eval_size=2",
    "eval_samples=1",
    "train_size=20",
    "lr=1e-3",
    "kl_coef=0.1",
    "eval_every=0",
]


def per_prompt_sampling(trainer: Trainer) -> None:
    """Replace the trainer's sampler by one whose draws depend on each prompt alone."""
    real = trainer._sample

    def sample(examples, group_size, temperature, generator, top_p=None, model=None, prefixes=None):
        assert not any(prefixes or []), "no PrefixRL prefixes in these runs"
        rows = []
        for e in examples:
            seed = zlib.crc32(e.prompt.encode())
            one = real([e], group_size, temperature, torch.Generator().manual_seed(seed), top_p, model)
            for j in range(group_size):
                keep = 1 + (seed + 3 * j) % max(1, len(one.completion_ids[j]))  # 1 … its length
                rows.append((one.completion_ids[j][:keep], one.logprobs[j][:keep], False))
        return Rollout(
            prompt_ids=[trainer._prompt_ids(e) for e in examples],
            completion_ids=[r[0] for r in rows],
            logprobs=[r[1] for r in rows],
            finished=[r[2] for r in rows],
            group_size=group_size,
        )

    trainer._sample = sample


def keep_gradients_of_each_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The (summed, clipped) gradients the optimizer steps with, by parameter name, written at each
    optimizer step (the trainer frees them right after); the caller clears it before each step."""
    names = [name for name, _ in trainer.model.named_parameters()]
    stepped = trainer.optimizer.param_groups[0]["params"]  # FSDP: the shards, in the same order
    kept: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def step_keeping_gradients(*args, **kwargs):
        kept.update({k: sharding.full(p.grad).detach().clone() for k, p in zip(names, stepped) if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = step_keeping_gradients  # type: ignore[method-assign]
    return kept


def main(out: Path, *extra: str) -> None:
    """One thread, as each torchrun rank has (OMP_NUM_THREADS=1): with more, `divrl.chunked` sums
    its vocabulary chunks over a thread pool in a scheduling-dependent order, and AdamW's first
    step turns that rounding noise into ±lr on coordinates whose gradient is about zero."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = build_config(None, [*OVERRIDES, f"output_dir={out / 'run'}", *extra])
        trainer = Trainer(cfg, log=lambda *_: None)
        per_prompt_sampling(trainer)
        grads = keep_gradients_of_each_step(trainer)
        record = []
        for step in range(cfg.steps):
            grads.clear()  # a skipped step leaves none
            metrics = trainer.train_step(step)
            weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}  # gathered, under FSDP
            moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]  # this rank's share of AdamW's
            held = sum((m.to_local() if isinstance(m, DTensor) else m).numel() for m in moments)
            record.append({"weights": weights, "grads": dict(grads), "metrics": metrics, "moment_elements": held})
        torch.save(record, out / f"rank-{trainer.world.rank}.pt")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
