"""Where divrl's GRPO step holds its memory: RSS by phase, the training state, activations.

    python benchmarks/grpo_step_memory.py [--steps 3] [--dtype auto] [--trim] [--activation-checkpointing]
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/grpo_step_memory.py   # glibc settings, compared

The configuration of `grpo_step.py` (divrl, `--dtype` float32 by default). A thread samples the process's RSS every 10 ms;
each step prints its time, the peak RSS of each phase (rollout, frozen passes, the update's
forward + backward, optimizer), the training state held (`grpo_step.held_state_gb`) and what the
model body's forward of the largest update micro-batch saves for backward beyond the weights
(its activations, by unique storage, through `torch.autograd.graph.saved_tensors_hooks`; the
output layer's, streamed by `divrl.chunked`, are not in it). `--trim` calls glibc's `malloc_trim(0)` after every
phase (and reports the seconds it took). `--activation-checkpointing` sets the config key of that
name (`divrl.recompute`); the blocks' recomputed activations are then not in the saved figure,
which counts what the update saves outside them. Ends with the process's ru_maxrss, the number
`grpo_step.py` compares.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import threading
import time
from collections import defaultdict

import torch

import grpo_step
from divrl import trainer as trainer_module


class RssSampler:
    """The process's RSS every `period` seconds, in a daemon thread; peak(since) reads it."""

    def __init__(self, period: float = 0.01):
        self.samples: list[tuple[float, float]] = []
        self.period = period
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), grpo_step.current_rss_gb()))
            time.sleep(self.period)

    def peak(self, start: float, end: float) -> float:
        return max((rss for t, rss in self.samples if start <= t <= end), default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="the config's dtype: float32, bfloat16 or auto")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after every phase")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute the blocks' activations")
    args = parser.parse_args()
    trim = ctypes.CDLL("libc.so.6").malloc_trim if args.trim else None
    rss = RssSampler()
    phases: dict[str, list[tuple[float, float]]] = defaultdict(list)  # name → (start, end) of each call
    trim_seconds = [0.0]
    saved: dict[int, int] = {}  # storage address → bytes, of one update forward's saved tensors
    activations: list[int] = []  # per update forward: the bytes it saved beyond the weights

    def timed(name, function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                phases[name].append((start, time.perf_counter()))
                if trim is not None:
                    clock = time.perf_counter()
                    trim(0)
                    trim_seconds[0] += time.perf_counter() - clock

        return wrapper

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    completion_hidden = trainer_module.completion_hidden

    def hidden_of_update(*a, **k):  # the update's forwards (the frozen ones save nothing)
        if not torch.is_grad_enabled():
            return completion_hidden(*a, **k)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = completion_hidden(*a, **k)
        activations.append(sum(n for address, n in saved.items() if address not in weights))
        return out

    with tempfile.TemporaryDirectory() as tmp:
        cfg = grpo_step.divrl_config(args.steps, args.dtype, tmp, recompute=args.activation_checkpointing)
        trainer = trainer_module.Trainer(cfg, log=lambda *_: None)
        weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
        trainer._rollout_groups = timed("rollout", trainer._rollout_groups)  # type: ignore[method-assign]
        trainer._frozen_inputs = timed("frozen", trainer._frozen_inputs)  # type: ignore[method-assign]
        trainer._optimizer_step = timed("optimizer", trainer._optimizer_step)  # type: ignore[method-assign]
        trainer_module.completion_hidden = hidden_of_update
        for step in range(args.steps):
            phases.clear()
            activations.clear()
            start = time.perf_counter()
            metrics = trainer.train_step(step)
            end = time.perf_counter()
            frozen_end = phases["frozen"][-1][1]
            optimizer_start = phases["optimizer"][0][0]
            peaks = {
                "rollout": max(rss.peak(a, b) for a, b in phases["rollout"]),
                "frozen": max(rss.peak(a, b) for a, b in phases["frozen"]),
                "forward+backward": rss.peak(frozen_end, optimizer_start),
                "optimizer": max(rss.peak(a, b) for a, b in phases["optimizer"]),
            }
            print(
                f"step {step + 1}: {metrics['time_step']:.1f} s; peak RSS GB "
                + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items())
                + f"; step {rss.peak(start, end):.2f}; state held "
                f"{grpo_step.held_state_gb([trainer.model, trainer.reference], trainer.optimizer):.2f} GB; "
                f"the body's activations saved for backward, largest micro-batch of {len(activations)}: "
                f"{max(activations) / 1e9:.2f} GB",
                flush=True,
            )
    if trim is not None:
        print(f"malloc_trim: {trim_seconds[0]:.2f} s in all")
    print(f"peak RSS (ru_maxrss): {grpo_step.peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
