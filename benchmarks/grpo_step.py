"""A GRPO step of divrl against TRL's GRPOTrainer, on the same configuration, on this machine.

    python benchmarks/grpo_step.py [--steps 4] [--sides trl-fp32,divrl-fp32,trl-bf16,divrl-auto]
                                   [--sides …,divrl-fp32-recompute]
                                   [--side-timeout 3600] [--timeout trl-bf16=600] [--out DIR]
                                   [--device auto|cpu|cuda] [--together 2] [--seed 0]
    python benchmarks/grpo_step.py --from-results DIR     # summary.md and reward.png again

TRL comes with the `bench` extra: `pip install -e '.[bench]'`.

The configuration (issue 10): SmolLM2-135M-Instruct, reasoning-gym chain_sum (2 terms, 1 digit), 4
prompts × 8 samples, ≤ 64 new tokens, T = 1.0, β = 0.04 with the k3 estimator in the loss (TRL's
`use_bias_correction_kl` off: TRL 1.16 turns it on by default, which makes its KL gradient the
reverse-KL one, divrl's `k3_st`; `tests/test_trl_crosscheck.py` checks both pairings), AdamW
at a constant lr 1e-6, gradient clipping at 1.0, token-mean loss (TRL's `dapo`), advantages
normalized by the group's sample std, PPO clip 0.2 on both sides (one inner iteration, so the ratio
is 1), micro-batches of 16 sequences. TRL samples with transformers' `generate`. Both sides train
on the same prompts at each step: TRL gets them in the order divrl's trainer draws them.

Each side runs in its own subprocess (TRL fp32, divrl fp32, TRL bf16, divrl `dtype: auto`, in
that order; on request also `divrl-fp32-recompute`, divrl fp32 with `activation_checkpointing`,
the activations recomputed in the backward as TRL's default does), writing one JSON line per step
as it goes, so a side stopped at --side-timeout still reports the steps it finished (and one that
finished none reports a lower bound). The sides run --together at a time (consecutive in the
list, 2 by default: each TRL side with the divrl side after it) in lockstep: step 1 of each, then
step 2 of each, and so on, one process computing while the others wait for their turn, so a
machine whose speed drifts (a shared VM's does, by 17% within an hour) slows both sides of a
comparison alike. Timings are the median of steps 2..N (step 1 warms up).
Peak RSS is the process's ru_maxrss (model loading included, on both sides). Its floor, reported
per side, is the training state the side holds (weights of policy and reference, AdamW's
moments, gradients the size of the trainable weights) plus the process's RSS before it loads a
model: what no activation saving can go below. Model
FLOPs count each token's weight matmuls (2 × parameters per token and pass, the output layer
only at completion positions, attention scores left out): sampling one forward, the policy a
forward and a backward (×3), the reference a forward; the machine's matmul peak is measured
here at each precision. On a GPU (`--device auto` takes CUDA when there is one) both sides train
there, and each side's peak GPU memory (the allocator's) is reported beside its RSS. Prints a
table, writes `results.json`, `reward.png` (reward per step of every side) and `summary.md` to
--out, and ends with the line
`ratio_samples_per_s_vs_trl=X ratio_peak_rss_vs_trl=Y` (divrl's faster setting against TRL's
faster one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS, GROUP, MAX_NEW, BETA, LR, TEMPERATURE, MICRO = 4, 8, 64, 0.04, 1e-6, 1.0, 16
TASK_PARAMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "allow_negation": False}
DEFAULT_SIDES = ("trl-fp32", "divrl-fp32", "trl-bf16", "divrl-auto")
SIDES = (*DEFAULT_SIDES, "divrl-fp32-recompute")
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def current_rss_gb() -> float:
    """This process's resident memory now (Linux's /proc; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return math.nan
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


def held_state_gb(models: list, optimizer: torch.optim.Optimizer) -> float:
    """The training state a side must hold, in GB: the weights of its models (None: absent; a tied
    tensor once), the optimizer's state, and the gradients (the trainable weights of models[0] in
    size: both sides hold them through every backward and free them after the optimizer step)."""
    held = [p for model in models if model is not None for p in model.parameters()]
    held += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    distinct = {t.data_ptr(): t.numel() * t.element_size() for t in held}
    gradients = sum(p.numel() * p.element_size() for p in models[0].parameters() if p.requires_grad)
    return (sum(distinct.values()) + gradients) / 1e9


def peak_memory(device: torch.device) -> dict:
    """This process's peak RSS, and on CUDA the allocator's peak on the device."""
    out = {"peak_rss_gb": peak_rss_gb()}
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def divrl_config(steps: int, dtype: str, output_dir: str, device: str = "cpu", recompute: bool = False, seed: int = 0):
    from divrl.config import TrainConfig

    return TrainConfig(
        model="default",
        task="chain_sum",
        task_params=TASK_PARAMS,
        steps=steps,
        prompts_per_step=PROMPTS,
        group_size=GROUP,
        max_new_tokens=MAX_NEW,
        temperature=TEMPERATURE,
        lr=LR,
        kl_coef=BETA,
        kl_estimator="k3",
        clip_low=0.2,
        clip_high=0.2,
        micro_batch_size=MICRO,
        eval_size=8,
        inspect_every=0,
        checkpoint_every=10**9,
        dtype=dtype,
        output_dir=output_dir,
        device=device,
        activation_checkpointing=recompute,
        seed=seed,
    )


def wait_for_turn() -> None:
    """Block until the driver says this worker's next step may start (a line on stdin, see
    `lockstep`); a worker whose stdin is closed or a terminal runs on."""
    if not sys.stdin.isatty():
        sys.stdin.readline()


def run_divrl(steps: int, dtype: str, device: torch.device, emit, recompute: bool = False, seed: int = 0) -> None:
    from divrl.trainer import Trainer

    before_model = current_rss_gb()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(divrl_config(steps, dtype, tmp, str(device), recompute, seed), log=lambda *_: None)
        params = model_params(trainer.model)
        for step in range(steps):
            wait_for_turn()
            m = trainer.train_step(step)
            emit(
                {
                    "step": step + 1,
                    # the step's prompts, drawn again from the trainer's own (deterministic) source
                    "prompts": sorted(indices_in(trainer.task.train, trainer.prompts.batch(step, PROMPTS))),
                    "seconds": m["time_step"],
                    "reward": m["reward"],
                    "completion_tokens": m["completion_length"] * PROMPTS * GROUP,
                    "phases": {k[len("time_") :]: m[k] for k in m if k.startswith("time_") and k != "time_step"},
                    "autocast": trainer.precision,
                    "rss_before_model_gb": before_model,
                    "state_gb": held_state_gb([trainer.model, trainer.reference], trainer.optimizer),
                    **params,
                }
            )


def model_params(model) -> dict:
    """Parameters in matmuls per token: the body's (no embedding lookup) and the output layer's."""
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # a tied output layer is counted once
    embedding = model.get_input_embeddings().weight.numel()
    return {"params_body": total - embedding - (0 if model.config.tie_word_embeddings else head), "params_head": head}


def indices_in(train: list, examples: list) -> list[int]:
    """The positions in `train` of `examples` (the same objects, as a prompt source returns them)."""
    index = {id(example): i for i, example in enumerate(train)}
    return [index[id(example)] for example in examples]


def trl_task(steps: int, seed: int = 0):
    """The task's training rows in TRL's conversational form (`index` names the example), in the
    order divrl's trainer draws them (its prompt source, seeded by the config), so that with TRL's
    shuffling off step k trains on the same 4 prompts on both sides; and TRL's reward function:
    the verifier divrl's trainer scores with, on the same examples."""
    from divrl.evaluation import score_completions
    from divrl.guarded_verifier import GuardedVerifier
    from divrl.prompts import build_source
    from divrl.tasks import build_task

    cfg = divrl_config(steps, "float32", "unused", seed=seed)
    task = build_task(cfg)
    verifier = GuardedVerifier.from_config(task, cfg)
    source = build_source(cfg.prompt_sampler, task.train, cfg.seed)
    drawn = indices_in(task.train, [e for step in range(steps) for e in source.batch(step, PROMPTS)])
    rows = [{"prompt": [{"role": "user", "content": task.train[i].prompt}], "index": i} for i in drawn]

    def reward(completions, index, **_):
        reward.scored.update(index)
        texts = [c[-1]["content"] for c in completions]
        return score_completions(verifier, texts, [task.train[i] for i in index], 1)[0]

    reward.scored = set()  # type: ignore[attr-defined]  # the examples scored since the last step's row
    return rows, reward


def run_trl(steps: int, bf16: bool, device: torch.device, emit, seed: int = 0) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from divrl.models import load_model

    before_model = current_rss_gb()
    model, tokenizer = load_model("default")
    rows, reward = trl_task(steps, seed)

    class Clock(TrainerCallback):
        trainer: GRPOTrainer  # set once built: on_step_end reads its models and optimizer

        def on_step_begin(self, *_, **__):
            wait_for_turn()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds = time.perf_counter() - self.start
            self.state_gb = held_state_gb([self.trainer.model, self.trainer.ref_model], self.trainer.optimizer)

        def on_log(self, args, state, control, logs=None, **_):
            if logs and "reward" in logs:
                emit(
                    {
                        "step": state.global_step,
                        "prompts": sorted(reward.scored),
                        "seconds": self.seconds,
                        "reward": logs["reward"],
                        "completion_tokens": logs["completions/mean_length"] * PROMPTS * GROUP,
                        "autocast": "bf16" if bf16 else "none",
                        "rss_before_model_gb": before_model,
                        "state_gb": self.state_gb,
                        **params,
                    }
                )
                reward.scored.clear()

    params = model_params(model)
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=MICRO,
            gradient_accumulation_steps=PROMPTS * GROUP // MICRO,
            num_generations=GROUP,
            max_completion_length=MAX_NEW,
            temperature=TEMPERATURE,
            beta=BETA,
            use_bias_correction_kl=False,  # plain k3 in the loss, as divrl's kl_estimator k3 (tests/test_trl_crosscheck.py)
            learning_rate=LR,
            lr_scheduler_type="constant",
            loss_type="dapo",
            scale_rewards="group",
            epsilon=0.2,
            max_grad_norm=1.0,
            weight_decay=0.0,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=device.type == "cpu",
            bf16=bf16,
            seed=seed,
            shuffle_dataset=False,  # the rows are already in divrl's order (`trl_task`)
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        clock = Clock()
        clock.trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock],
        )
        clock.trainer.train()


def worker(side: str, steps: int, path: Path, device: torch.device, seed: int) -> None:
    def emit(row: dict) -> None:
        row.update(peak_memory(device))
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if side.startswith("trl"):
        run_trl(steps, side == "trl-bf16", device, emit, seed)
    else:
        dtype = side.split("-")[1].replace("fp32", "float32")
        run_divrl(steps, dtype, device, emit, side.endswith("-recompute"), seed)


@dataclass
class SideRun:
    """How a worker of `lockstep` ended: its exit code (None if killed), whether it was stopped at
    its time limit, and the seconds it had the machine (its turns, model loading included)."""

    exit_code: int | None = None
    limit_hit: bool = False
    seconds: float = 0.0


def _complete_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def lockstep(commands: dict[str, list[str]], rows: dict[str, Path], steps: int, limits: dict[str, float]) -> dict:
    """Run the workers `commands` (side → argv) side by side in turns: each gets a line on its
    stdin (`wait_for_turn`), and the driver waits until it has appended that step's line to its
    `rows` file, exited, or used up its `limits` (seconds over all its turns; then it is killed),
    before the next side's turn. Returns side → SideRun. The rows files start empty; an
    interrupted driver kills its workers."""
    for path in rows.values():
        path.unlink(missing_ok=True)
    processes = {side: subprocess.Popen(argv, stdin=subprocess.PIPE, text=True) for side, argv in commands.items()}
    runs = {side: SideRun() for side in commands}
    try:
        for step in range(1, steps + 1):
            for side, process in processes.items():
                run = runs[side]
                if process.poll() is not None or run.limit_hit:
                    continue
                start = time.perf_counter()
                try:
                    assert process.stdin is not None  # opened as a pipe above
                    process.stdin.write("go\n")
                    process.stdin.flush()
                except BrokenPipeError:  # exited between the poll and the write
                    continue
                while _complete_lines(rows[side]) < step and process.poll() is None:
                    if run.seconds + time.perf_counter() - start > limits[side]:
                        process.kill()
                        run.limit_hit = True
                        break
                    time.sleep(0.05)
                run.seconds += time.perf_counter() - start
    except BaseException:  # Ctrl-C or a failure of the driver: the workers stop with it
        for process in processes.values():
            process.kill()
        raise
    finally:
        for side, process in processes.items():
            if process.stdin is not None:
                process.stdin.close()
            run = runs[side]
            try:
                process.wait(timeout=None if run.limit_hit else max(60.0, limits[side] - run.seconds))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                run.limit_hit = True
            run.exit_code = None if run.limit_hit else process.returncode
    return runs


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 1.5) -> float:
    """FLOP/s of square matmuls at `dtype` on `device` (1024² on a CPU, 8192² on a GPU; best of a
    few timed batches)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def model_flops(row: dict, prompt_tokens: float) -> float:
    """Model FLOPs of one step (see the module docstring)."""
    body, head = row["params_body"], row["params_head"]
    completion = row["completion_tokens"]
    per_forward = 2 * body * (prompt_tokens + completion) + 2 * head * completion
    return per_forward * (1 + 3 + 1)  # sampling, policy forward + backward, reference


def summarize(side: str, rows: list[dict], limit_hit: bool, timeout: float, peaks: dict, prompt_tokens: float) -> dict:
    timed = rows[1:] if len(rows) > 1 else rows
    if not rows:
        return {"side": side, "steps": 0, "seconds_per_step_lower_bound": timeout, "limit_hit": limit_hit}
    seconds = statistics.median(r["seconds"] for r in timed)
    tokens = statistics.median(r["completion_tokens"] for r in timed)
    precision = "bf16" if rows[-1]["autocast"] == "bf16" else "fp32"
    flops = statistics.median(model_flops(r, prompt_tokens) for r in timed)
    out = {
        "side": side,
        "steps": len(rows),
        "limit_hit": limit_hit,
        "seconds_per_step": seconds,
        "samples_per_s": PROMPTS * GROUP / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_gb": max(r["peak_rss_gb"] for r in rows),
        "precision": precision,
        **({"peak_gpu_gb": max(r["peak_gpu_gb"] for r in rows)} if "peak_gpu_gb" in rows[-1] else {}),
        "model_tflop_per_step": flops / 1e12,
        "fraction_of_peak": flops / seconds / peaks[precision],
        "rewards": [r["reward"] for r in rows],
        "prompts": [r.get("prompts") for r in rows],  # the training examples of each step (None: not recorded)
    }
    if "state_gb" in rows[-1]:  # results from before these were recorded have none
        out["state_gb"] = max(r["state_gb"] for r in rows)
        out["rss_before_model_gb"] = rows[0]["rss_before_model_gb"]
    if "phases" in rows[-1]:
        out["phases"] = {k: statistics.median(r["phases"][k] for r in timed) for k in rows[-1]["phases"]}
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r.get("rewards"):
            ax.plot(range(1, len(r["rewards"]) + 1), r["rewards"], marker="o", label=r["side"])
    ax.set(xlabel="step", ylabel="mean reward of the step's 32 samples", title="GRPO, same configuration")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict]) -> str:
    gpu = any("peak_gpu_gb" in r for r in results)
    lines = [
        "| side | precision | steps | s/step | samples/s | tokens/s | peak RSS GB | "
        + ("peak GPU GB | " if gpu else "")
        + "model TFLOP/step | of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for r in results:
        if not r["steps"]:
            why = f"failed, exit code {r['exit_code']}" if r.get("exit_code") else "no step within the limit"
            lines.append(
                f"| {r['side']} | | 0 | > {r['seconds_per_step_lower_bound']:.0f} ({why}) "
                f"| | | | | |" + (" |" if gpu else "")
            )
            continue
        lines.append(
            f"| {r['side']} | {r['precision']} | {r['steps']} | {r['seconds_per_step']:.2f} | "
            f"{r['samples_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['peak_rss_gb']:.2f} | "
            + (f"{r.get('peak_gpu_gb', math.nan):.2f} | " if gpu else "")
            + f"{r['model_tflop_per_step']:.2f} | {100 * r['fraction_of_peak']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES))
    parser.add_argument("--side-timeout", type=float, default=3600.0, help="seconds one side may run")
    parser.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="SIDE=SECONDS",
        help="another limit for one side (e.g. trl-bf16=600 where bf16 is slow)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--together",
        type=int,
        default=2,
        help="sides run in lockstep at a time (consecutive in --sides; 1: one by one)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="both sides' seed (sampling, and the prompts' order: divrl's `seed`)"
    )
    parser.add_argument("--device", default="auto", help="where both sides train: auto (CUDA when present), cpu, cuda")
    parser.add_argument(
        "--from-results", type=Path, metavar="DIR", help="write the summary of DIR/results.json again, running nothing"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from divrl.models import resolve_device

    device = resolve_device(args.device)
    if args.worker:
        return worker(args.worker, args.steps, args.rows, device, args.seed)
    if args.from_results:
        return report(json.loads((args.from_results / "results.json").read_text()), args.from_results)
    limits = {}
    for limit in args.timeout:
        side, _, seconds = limit.partition("=")
        if side not in SIDES or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--timeout {limit!r}: expected SIDE=SECONDS with SIDE one of {', '.join(SIDES)}")
        limits[side] = float(seconds)
    if args.together < 1:
        parser.error(f"--together {args.together}: expected at least 1")
    unknown = [side for side in args.sides.split(",") if side not in SIDES]
    if unknown:
        parser.error(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")

    date, host = datetime.date.today().isoformat(), socket.gethostname().split(".")[0]
    out = args.out or Path(__file__).parent / "results" / f"{date}-grpo-step"
    out.mkdir(parents=True, exist_ok=True)
    from divrl.precision import cpu_info

    name, present = cpu_info()
    flags = [f for f in FLAGS if f in present]
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    gpu = f"GPU {torch.cuda.get_device_name(device)} (both sides train there); " if device.type == "cuda" else ""
    machine = (
        f"{gpu}{name}, {os.cpu_count()} cores, flags {' '.join(flags) or 'none of ' + ' '.join(FLAGS)}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"machine: {machine}")
    from divrl.models import load_model
    from divrl.precision import resolve

    print(f"divrl dtype auto here: {resolve('auto', load_model('default', device=device)[0], print)}")
    print(
        f"matmul peak ({device.type}): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    prompt_tokens = prompt_token_count()

    sides = args.sides.split(",")
    results = []
    for first in range(0, len(sides), args.together):
        group = sides[first : first + args.together]
        paths = {side: out / f"steps-{side}.jsonl" for side in group}
        print(f"{', '.join(group)}: {args.steps} steps in lockstep …", flush=True)
        argv = [sys.executable, __file__, "--steps", str(args.steps), "--device", str(device), "--seed", str(args.seed)]
        commands = {side: [*argv, "--worker", side, "--rows", str(path)] for side, path in paths.items()}
        runs = lockstep(commands, paths, args.steps, {side: limits.get(side, args.side_timeout) for side in group})
        for side, run in runs.items():
            rows = [json.loads(line) for line in paths[side].read_text().splitlines()] if paths[side].exists() else []
            results.append(
                summarize(side, rows, run.limit_hit, run.seconds, peaks, prompt_tokens)
                | ({"exit_code": run.exit_code} if run.exit_code else {})
            )
            print(table(results[-1:]).splitlines()[-1], flush=True)
    summary = {
        "date": date,
        "host": host,
        "machine": machine,
        "peaks_gflops": {k: v / 1e9 for k, v in peaks.items()},
        "steps": args.steps,
        "seed": args.seed,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    report(summary, out)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else math.nan)


def same_prompts_note(ours: dict, theirs: dict) -> list[str]:
    """A line saying at how many steps the two sides trained on the same prompts and, over those
    steps, their reward difference paired by step (mean ± standard error); [] when the steps'
    prompts were not recorded."""
    pairs = list(zip(ours.get("prompts", []), theirs.get("prompts", []), ours["rewards"], theirs["rewards"]))
    if not pairs or any(a is None or b is None for a, b, _, _ in pairs):
        return []
    same = [r1 - r2 for a, b, r1, r2 in pairs if a == b]
    line = f"- the same prompts at {len(same)} of {len(pairs)} steps"
    if len(same) > 1:
        mean, se = mean_and_se(same)
        line += f"; reward difference paired by step over those: {mean:+.3f} ± {se:.3f}"
    return [line]


def floor_note(r: dict, peer: dict) -> str:
    """Where `r`'s peak memory goes, against `peer`'s: the training state it must hold and the rest.
    On a GPU the state lives in the device's memory, so the floor is the allocator's peak there;
    on a CPU it is the state plus the process's RSS before any model, against the peak RSS."""
    if "peak_gpu_gb" in r and "peak_gpu_gb" in peer:
        floor, peak, peer_peak, of = r["state_gb"], r["peak_gpu_gb"], peer["peak_gpu_gb"], "peak GPU memory"
        parts = f"{floor:.2f} GB of weights, reference, gradients and AdamW state on the GPU"
    else:
        floor, peak, peer_peak, of = (
            r["state_gb"] + r["rss_before_model_gb"],
            r["peak_rss_gb"],
            peer["peak_rss_gb"],
            "peak RSS",
        )
        parts = (
            f"{r['state_gb']:.2f} GB of weights, reference, gradients and AdamW state + "
            f"{r['rss_before_model_gb']:.2f} GB of process before any model = {floor:.2f} GB"
        )
    return (
        f"- {r['side']} memory floor: {parts}, {floor / peer_peak:.2f}× {peer['side']}'s {of}; the other "
        f"{peak - floor:.2f} GB of its {of} are activations, temporaries and the allocator's free memory"
    )


def report(summary: dict, out: Path) -> None:
    """Print and write (summary.md, reward.png) the comparison of a run's results, ending with the
    ratio line."""
    results, peaks = summary["results"], summary["peaks_gflops"]
    plot(results, out / "reward.png")
    notes = [
        f"- {r['side']} phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        for r in results
        if r.get("phases")
    ]
    done = [r for r in results if r["steps"]]
    for r in done:
        mean, se = mean_and_se(r["rewards"])
        notes.append(f"- {r['side']} reward over its {r['steps']} steps: {mean:.3f} ± {se:.3f} (mean ± standard error)")
    trl = [r for r in done if r["side"].startswith("trl")]
    ours = [r for r in done if r["side"].startswith("divrl")]
    ratio = rss = math.nan
    if trl and ours:
        best_trl = max(trl, key=lambda r: r["samples_per_s"])
        best = max(ours, key=lambda r: r["samples_per_s"])
        ratio = best["samples_per_s"] / best_trl["samples_per_s"]
        rss = best["peak_rss_gb"] / best_trl["peak_rss_gb"]
        if "peak_gpu_gb" in best and "peak_gpu_gb" in best_trl:
            notes.append(
                f"- peak GPU memory {best['side']} / {best_trl['side']}: "
                f"{best['peak_gpu_gb'] / best_trl['peak_gpu_gb']:.2f}"
            )
        (m1, s1), (m2, s2) = mean_and_se(best["rewards"]), mean_and_se(best_trl["rewards"])
        gap, gap_se = m1 - m2, (s1**2 + s2**2) ** 0.5
        notes.append(
            f"- reward difference {best['side']} − {best_trl['side']}: {gap:+.3f} ± {gap_se:.3f}"
            f" ({'within' if abs(gap) <= 2 * gap_se else 'outside'} two standard errors)"
        )
        notes += same_prompts_note(best, best_trl)
        unfinished = "; ".join(
            f"{r['side']} did not finish a step within {r['seconds_per_step_lower_bound']:.0f} s"
            for r in results
            if r["side"].startswith("trl") and not r["steps"]
        )
        notes += [floor_note(r, best_trl) for r in (best, best_trl) if "state_gb" in r]
        notes += [
            f"- {r['side']} (activations recomputed, as TRL's are) against {best_trl['side']}: "
            f"{r['samples_per_s'] / best_trl['samples_per_s']:.2f}× the samples/s at "
            f"{r['peak_rss_gb'] / best_trl['peak_rss_gb']:.2f}× the peak RSS"
            for r in ours
            if r["side"].endswith("-recompute") and r is not best
        ]
        notes += [
            "",
            f"{best['side']} against {best_trl['side']}: {ratio:.2f}× the samples/s at "
            f"{rss:.2f}× the peak RSS" + (f" ({unfinished})" if unfinished else "") + ".",
        ]
    lines = [
        f"# GRPO step, divrl vs TRL ({summary['date']}, {summary['host']})",
        "",
        f"Machine: {summary['machine']}.",
        f"Matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s. "
        f"Seed {summary.get('seed', 0)}.",
        "",
        table(results),
        "",
        *notes,
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + table(results) + "\n\n" + "\n".join(notes))
    print(f"ratio_samples_per_s_vs_trl={ratio:.2f} ratio_peak_rss_vs_trl={rss:.2f}")


def prompt_token_count() -> float:
    """Mean chat-templated prompt tokens per step (P prompts, each computed once), from the task."""
    from divrl.models import default_tokenizer_dir, load_tokenizer
    from divrl.tasks import build_task, encode_prompt

    tokenizer = load_tokenizer(default_tokenizer_dir())
    task = build_task(divrl_config(1, "float32", "unused"))
    lengths = [len(encode_prompt(tokenizer, e.prompt, None)) for e in task.train[:64]]
    return PROMPTS * sum(lengths) / len(lengths)


if __name__ == "__main__":
    main()
