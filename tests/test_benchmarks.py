"""The parts of the benchmark scripts that run without their peers (TRL is only in the `bench`
extra): a benchmark whose TRL side scores with a stale API fails only when someone runs it."""

import copy
import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from divrl.prompts import build_source
from divrl.tasks import build_task


def benchmark(name: str):
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def test_grpo_step_trl_side_trains_on_divrls_prompts_and_scores_with_its_verifier():
    grpo_step = benchmark("grpo_step")
    rows, reward = grpo_step.trl_task(3)
    cfg = grpo_step.divrl_config(3, "float32", "unused")
    train = build_task(cfg).train
    source = build_source(cfg.prompt_sampler, train, cfg.seed)
    # step by step the prompts divrl's trainer draws (`Trainer._collect`), which are not the first ones
    drawn = [e.prompt for step in range(3) for e in source.batch(step, grpo_step.PROMPTS)]
    assert [r["prompt"][0]["content"] for r in rows] == drawn
    assert drawn != [e.prompt for e in train[: len(drawn)]]
    assert [r["index"] for r in grpo_step.trl_task(3, seed=1)[0]] != [r["index"] for r in rows]  # --seed
    example = train[rows[1]["index"]]
    assert example.prompt == drawn[1]
    right, wrong = example.answer, str(int(example.answer) + 1)
    completions = [[{"role": "assistant", "content": f"So the answer is {a}."}] for a in (right, wrong)]
    assert reward(completions=completions, index=[rows[1]["index"]] * 2) == [1.0, 0.0]


def test_grpo_step_memory_floor_counts_weights_reference_gradients_and_adamw(tiny):
    model, _ = tiny
    reference = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied tensor once
    steps = len(optimizer.state) * 4  # AdamW's per-parameter step counter, a float32 scalar
    held = benchmark("grpo_step").held_state_gb([model, reference], optimizer)
    # policy + reference + two moments + gradients
    assert held * 1e9 == pytest.approx(5 * weights + steps, rel=1e-9)


# A worker of `lockstep`: logs each turn it gets, works `pause` seconds, then appends its step's row.
_TURN_TAKER = """
import sys, time
side, rows, log, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
for step in range(1, 4):
    sys.stdin.readline()
    with open(log, "a") as f:
        f.write(f"{side}{step} ")
    time.sleep(pause)
    with open(rows, "a") as f:
        f.write("{}\\n")
"""


def test_grpo_step_runs_sides_in_turns_and_stops_one_at_its_limit(tmp_path):
    grpo_step = benchmark("grpo_step")
    log = tmp_path / "turns.txt"
    pauses = {"a": 0.0, "b": 0.0, "slow": 2.0}
    rows = {side: tmp_path / f"{side}.jsonl" for side in pauses}
    commands = {
        side: [sys.executable, "-c", _TURN_TAKER, side, str(rows[side]), str(log), str(pause)]
        for side, pause in pauses.items()
    }
    runs = grpo_step.lockstep(commands, rows, 3, {"a": 60.0, "b": 60.0, "slow": 3.0})
    # one side works at a time, step by step; the slow one is killed in its second turn
    assert log.read_text().split() == ["a1", "b1", "slow1", "a2", "b2", "slow2", "a3", "b3"]
    assert [len(rows[side].read_text().splitlines()) for side in pauses] == [3, 3, 1]
    assert (runs["a"].exit_code, runs["a"].limit_hit) == (0, False)
    assert (runs["slow"].exit_code, runs["slow"].limit_hit) == (None, True)
    assert 3.0 <= runs["slow"].seconds < 10.0


def test_grpo_step_pairs_the_rewards_of_steps_with_the_same_prompts():
    note = benchmark("grpo_step").same_prompts_note
    ours = {"prompts": [[1, 2], [3, 4], [5, 6]], "rewards": [0.5, 0.25, 1.0]}
    theirs = {"prompts": [[1, 2], [3, 4], [7, 8]], "rewards": [0.25, 0.25, 0.0]}
    # differences 0.25 and 0.0 at the two shared steps: mean 0.125, standard error 0.125
    assert note(ours, theirs) == [
        "- the same prompts at 2 of 3 steps; reward difference paired by step over those: +0.125 ± 0.125"
    ]
    assert note(ours, {"prompts": [None] * 3, "rewards": [0.0] * 3}) == []


def test_grpo_step_lockstep_kills_its_workers_when_the_driver_fails(monkeypatch):
    grpo_step = benchmark("grpo_step")
    started, original = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(original(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(grpo_step.subprocess, "Popen", popen)
    start = time.perf_counter()
    # a rows file the driver cannot find: its first wait fails, as a Ctrl-C there would
    with pytest.raises(KeyError):
        grpo_step.lockstep({"a": [sys.executable, "-c", "import time; time.sleep(600)"]}, {}, 1, {"a": 600.0})
    assert [p.returncode for p in started] == [-signal.SIGKILL]  # killed and reaped at once,
    assert time.perf_counter() - start < 60  # not after waiting out its 600 s limit


def test_grpo_step_memory_floor_is_held_against_the_memory_the_state_lives_in():
    floor_note = benchmark("grpo_step").floor_note
    cpu = {"side": "divrl", "state_gb": 2.0, "rss_before_model_gb": 0.5, "peak_rss_gb": 4.0}
    peer = {"side": "trl", "state_gb": 2.0, "rss_before_model_gb": 0.5, "peak_rss_gb": 5.0}
    # on a CPU: 2.0 + 0.5 GB against the peer's peak RSS of 5.0, 1.5 GB above the floor
    assert floor_note(cpu, peer) == (
        "- divrl memory floor: 2.00 GB of weights, reference, gradients and AdamW state + 0.50 GB of process "
        "before any model = 2.50 GB, 0.50× trl's peak RSS; the other 1.50 GB of its peak RSS are activations, "
        "temporaries and the allocator's free memory"
    )
    # on a GPU the state is in the device's memory (the host's RSS holds none of it)
    gpu, peer_gpu = cpu | {"peak_rss_gb": 1.8, "peak_gpu_gb": 3.0}, peer | {"peak_rss_gb": 1.9, "peak_gpu_gb": 2.5}
    assert floor_note(gpu, peer_gpu) == (
        "- divrl memory floor: 2.00 GB of weights, reference, gradients and AdamW state on the GPU, 0.80× trl's "
        "peak GPU memory; the other 1.00 GB of its peak GPU memory are activations, temporaries and the "
        "allocator's free memory"
    )


def test_rollout_benchmark_times_and_profiles_both_samplers():
    script = Path(__file__).parents[1] / "benchmarks" / "rollout.py"
    sizes = ["--prompts", "2", "--group", "2", "--new", "3", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, str(script), "--model", "tiny", *sizes, "--profile", "--device", "auto"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for setting in ("stop", "full"):
        assert f"[{setting}] divrl / hf throughput:" in done.stdout
    for sampler in ("divrl", "hf"):
        assert f"--- {sampler}: " in done.stdout  # its profile's table follows
        assert f"{sampler} host-device synchronizations and copies:" in done.stdout


def test_rollout_benchmark_times_an_architecture_with_random_weights(tmp_path):
    """--random-init: a directory with a config and tokenizer files, no weights (what a GPU machine
    gets without the default model's file)."""
    from divrl.models import default_tokenizer_dir, load_tokenizer, tiny_config

    tokenizer = load_tokenizer(default_tokenizer_dir())
    tokenizer.save_pretrained(tmp_path)
    tiny_config(len(tokenizer)).to_json_file(tmp_path / "config.json")
    script = Path(__file__).parents[1] / "benchmarks" / "rollout.py"
    sizes = ["--prompts", "2", "--group", "2", "--new", "3", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, str(script), "--model", str(tmp_path), "--random-init", *sizes],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[full] divrl / hf throughput:" in done.stdout


def test_rollout_benchmark_refuses_a_device_it_cannot_use_by_name():
    script = Path(__file__).parents[1] / "benchmarks" / "rollout.py"
    bad = ["gpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        done = subprocess.run([sys.executable, str(script), "--device", device], capture_output=True, text=True)
        assert done.returncode == 2 and "--device" in done.stderr and "Traceback" not in done.stderr, done.stderr
