"""Memory and step time of data-parallel training with and without `fsdp: true`, on this machine.

    python benchmarks/fsdp_memory.py [--ranks 2] [--steps 2] [--model default] [--out DIR]

Runs the same training twice under `torchrun --standalone --nproc_per_node RANKS` (CPU: gloo, one
thread per rank), plain data-parallel then FSDP-sharded (`divrl.sharding`), one after the other
(run it with nothing else on the machine): `prompts_per_step = RANKS` (one group per rank),
`group_size` 4, ≤ 32 new tokens, dtype float32, `kl_coef` 0.001 with the exact KL (a frozen
reference copy on every rank).
Each rank reports, after its last step:

- the bytes of the parameters, gradients and AdamW state it holds, counted from the tensors
  themselves (a sharded tensor's local piece; tied weights once);
- its peak RSS (MB, ru_maxrss: model loading, the reference and the rollout included);
- the median seconds per step (steps 2..N; step 1 warms up).

Prints a table and `ratio_peak_rss_fsdp_vs_dp=X ratio_step_time_fsdp_vs_dp=Y` (rank-mean values),
and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (local pieces of sharded ones)."""
    seen: dict[int, int] = {}
    for t in tensors:
        local = _local(t)
        seen[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(seen.values())


def rank_main(out: Path, sets: list[str]) -> None:
    """One rank: train, then write what it holds and its timings to out/rank-R.json."""
    from divrl.config import build_config
    from divrl.trainer import Trainer

    torch.set_num_threads(1)
    cfg = build_config(None, sets)
    trainer = Trainer(cfg, log=lambda *_: None)
    seconds = []
    for step in range(cfg.steps):
        start = time.perf_counter()
        trainer.train_step(step)
        seconds.append(time.perf_counter() - start)
    stepped = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    held = {
        "weights_gathered": _bytes(trainer.model.parameters()),
        "weights_sharded": _bytes(stepped) if trainer.sharded else 0,
        "gradients": _bytes(p.grad for p in stepped if p.grad is not None),
        "adamw_state": _bytes(v for s in trainer.optimizer.state.values() for v in s.values() if v.dim()),
    }
    report = {
        "rank": trainer.world.rank,
        "sharded": trainer.sharded,
        "bytes": held,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "seconds_per_step": statistics.median(seconds[1:] or seconds),
        "steps": seconds,
    }
    (out / f"rank-{trainer.world.rank}.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rank-out", type=Path, help=argparse.SUPPRESS)  # internal: one rank's run
    args, rest = parser.parse_known_args()
    if args.rank_out is not None:
        rank_main(args.rank_out, rest)
        return
    from divrl.precision import cpu_info

    name, _ = cpu_info()
    machine = f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {args.ranks} ranks × 1 thread (gloo)"
    print(f"machine: {machine}")
    date = datetime.date.today().isoformat()
    out = args.out or Path(__file__).parent / "results" / f"{date}-fsdp-memory"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("dp", "fsdp"):
            ranks = Path(tmp) / mode
            ranks.mkdir()
            sets = [
                f"model={args.model}",
                f"steps={args.steps}",
                f"prompts_per_step={args.ranks}",
                "group_size=4",
                "max_new_tokens=32",
                "dtype=float32",
                "kl_coef=0.001",
                "kl_estimator=exact",
                f"fsdp={'true' if mode == 'fsdp' else 'false'}",
                f"output_dir={Path(tmp) / (mode + '-run')}",
            ]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            command = [
                *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
                *("--nproc_per_node", str(args.ranks), __file__, "--rank-out", str(ranks), *sets),
            ]
            print(f"{mode}: {' '.join(command[3:])}", flush=True)
            subprocess.run(command, env=env, check=True)
            results[mode] = [json.loads((ranks / f"rank-{r}.json").read_text()) for r in range(args.ranks)]
    mib = 2**20
    print(
        f"\n{'MiB':6} {'rank':>4} {'weights':>8} {'shards':>7} {'grads':>6} {'AdamW':>6} {'peak RSS':>9} {'s/step':>7}"
    )
    for mode, ranks in results.items():
        for r in ranks:
            b = r["bytes"]
            print(
                f"{mode:6} {r['rank']:>4} {b['weights_gathered'] / mib:>8.0f} {b['weights_sharded'] / mib:>7.0f} "
                f"{b['gradients'] / mib:>6.0f} {b['adamw_state'] / mib:>6.0f} {r['peak_rss_gb'] * 1e3:>9.0f} "
                f"{r['seconds_per_step']:>7.1f}"
            )

    def mean(mode: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[mode])

    rss = mean("fsdp", "peak_rss_gb") / mean("dp", "peak_rss_gb")
    time_ratio = mean("fsdp", "seconds_per_step") / mean("dp", "seconds_per_step")
    (out / "results.json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "results": results}, default=str, indent=1)
    )
    print(f"\nwrote {out / 'results.json'}")
    print(f"ratio_peak_rss_fsdp_vs_dp={rss:.3f} ratio_step_time_fsdp_vs_dp={time_ratio:.3f}")


if __name__ == "__main__":
    main()
