"""Where divrl's GRPO step spends its time, by operator: the benchmark's configuration
(`grpo_step.divrl_config`: SmolLM2-135M-Instruct, 4 prompts × 8 samples, ≤ 64 new tokens, k3 KL),
two warm-up steps, then one step under `torch.profiler` (CPU).

    python benchmarks/grpo_step_profile.py [--dtype float32] [--rows 30]

Prints each step's phases and the operators sorted by their own CPU time. Profiling adds overhead
(the profiled step runs a few percent slower); compare operators with each other, not the step
time with `grpo_step.py`'s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from divrl.trainer import Trainer
from grpo_step import divrl_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    parser.add_argument("--rows", type=int, default=30, help="operators to print")
    args = parser.parse_args()
    phases = lambda m: {k[len("time_") :]: round(v, 2) for k, v in m.items() if k.startswith("time_")}  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(divrl_config(3, args.dtype, tmp, "cpu"), log=lambda *_: None)
        for step in range(2):
            print(f"step {step + 1} (warm-up): {phases(trainer.train_step(step))}", flush=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            metrics = trainer.train_step(2)
        print(f"step 3 (profiled): {phases(metrics)}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
