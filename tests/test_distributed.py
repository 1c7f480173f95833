"""Data-parallel training (`divrl.distributed`) on the CPU with gloo and 2 processes.

- The update of 2 ranks equals that of one process on the same global batch: 2 steps, weights
  compared after each (tests/distributed_worker.py makes the batch independent of the split).
- `torchrun … -m divrl train …` and `accelerate launch --multi_gpu --num_processes 2 -m divrl train …`
  run end to end: only rank 0 writes, the checkpoint holds every
  rank's sampling state and resumes in one process (another world size).
- A world size that does not divide prompts_per_step, and the options that cannot be sharded, are
  refused naming the key and the world size."""

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from divrl import distributed
from divrl.config import ConfigError, build_config
from divrl.runlog import read_metrics

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


LAUNCHERS = {  # two ranks on this machine's CPU (gloo)
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's multi-process launcher (torch's elastic launch underneath); --cpu would pick its
    # single-process or MPI launcher instead, and the ranks choose the CPU themselves (device auto)
    "accelerate": [
        *("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),
    ],
}


def _torchrun(
    *args: str, cwd: Path, env: dict | None = None, launcher: str = "torchrun"
) -> subprocess.CompletedProcess:
    command = [sys.executable, *LAUNCHERS[launcher], *args]
    done = subprocess.run(command, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def test_two_ranks_update_as_one_process_on_the_same_global_batch(tmp_path, say_task):
    """Plain data-parallel ranks and FSDP-sharded ones (`fsdp=true`, `divrl.sharding`) both; the
    FSDP ranks also recompute their blocks' activations (`activation_checkpointing`, `divrl.recompute`).
    A reward that varies within groups (the parity of the completion's length), so the
    policy gradient carries the update (with rewards all equal, the first step's gradient would be
    float noise, which Adam scales up to lr-sized steps)."""
    task = say_task(range(20), "parity")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    runs = {name: tmp_path / name for name in ("single", "parallel", "fsdp")}
    for out in runs.values():
        out.mkdir()
    # one process, fresh like each rank (not this one, whose earlier tests leave global state behind)
    done = subprocess.run(
        [sys.executable, str(WORKER), str(runs["single"]), *task],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    _torchrun(str(WORKER), str(runs["parallel"]), *task, cwd=tmp_path, env=env)
    _torchrun(
        str(WORKER), str(runs["fsdp"]), *task, "fsdp=true", "activation_checkpointing=true", cwd=tmp_path, env=env
    )
    one = torch.load(runs["single"] / "rank-0.pt", weights_only=False)
    for name in ("parallel", "fsdp"):
        ranks = [torch.load(runs[name] / f"rank-{r}.pt", weights_only=False) for r in range(2)]
        for step in range(2):
            expected = one[step]["weights"]
            for rank in ranks:
                got = rank[step]["weights"]
                assert got.keys() == expected.keys()
                for key, value in expected.items():
                    torch.testing.assert_close(got[key], value, rtol=1e-5, atol=5e-6, msg=f"{name} {step + 1} {key}")
                whole = sum(v.numel() for v in one[step]["grads"].values())
                held = {"parallel": whole, "fsdp": whole / 2}[name]  # FSDP: each rank keeps half of AdamW's state
                assert rank[step]["moment_elements"] == pytest.approx(held, rel=0.01), name
                assert rank[step]["grads"].keys() == one[step]["grads"].keys()
                for key, grad in one[step]["grads"].items():  # the summed gradient of the step
                    torch.testing.assert_close(rank[step]["grads"][key], grad, rtol=1e-4, atol=1e-7)
            for key in ("reward", "pass_rate", "completion_length", "loss", "pg_loss", "kl", "entropy", "grad_norm"):
                got, expected = ranks[0][step]["metrics"][key], one[step]["metrics"][key]
                assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), (name, key)
                assert ranks[1][step]["metrics"][key] == ranks[0][step]["metrics"][key], (name, key)
    assert {one[step]["metrics"]["reward"] for step in range(2)} - {0.0, 1.0}, "rewards all equal: no signal"


@pytest.mark.parametrize("launcher, fsdp", [("torchrun", False), ("accelerate", False), ("torchrun", True)])
def test_torchrun_and_accelerate_launch_write_once_and_resume_in_one_process(tmp_path, say_task, launcher, fsdp):
    """With fsdp, also: the checkpoint (full tensors, gathered from the shards) loads with
    from_pretrained, and a sharded resume from step 1 repeats step 2 exactly (a reward that
    varies within groups and lr 1e-3: steps far above float noise, so a lost AdamW state shows)."""
    run = tmp_path / "run"
    sets = [
        # with fsdp also a reference refreshed from the sharded policy every step (and on resume)
        *([*say_task(range(20), "parity"), "reference_refresh_every=1"] if fsdp else []),
        f"fsdp={str(fsdp).lower()}",
        "device=cpu",  # gloo, also where CUDA is
        "lr=1e-3",
        "model=tiny",
        "steps=2",
        "prompts_per_step=2",
        "group_size=2",
        "max_new_tokens=6",
        "eval_size=2",
        "eval_samples=1",
        "train_size=20",
        "checkpoint_every=1",
        "eval_every=0",
        f"output_dir={run}",
    ]
    done = _torchrun(
        "-m", "divrl", "train", *(arg for s in sets for arg in ("--set", s)), cwd=tmp_path, launcher=launcher
    )
    assert done.stdout.count("resolved config:") == 1 and done.stdout.count("report: ") == 1
    said = done.stdout.splitlines()
    assert sum(line.startswith("dtype auto:") for line in said) == 1  # rank 1 is silent
    assert sum(line.startswith("attention_dtype auto:") for line in said) <= 1  # said at bf16 only
    assert done.stdout.count("objective: ") == 1
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]  # once each: rank 1 wrote no row
    assert [r["step"] for r in rows if "eval_pass@1" in r] == [0, 2]
    step2 = run / "checkpoints" / "step-2"
    assert (step2 / "rng-rank-1.pt").is_file() and not (step2 / "rng-rank-2.pt").exists()
    assert "rng-rank-1.pt" in json.loads((step2 / "manifest.json").read_text())["files"]
    assert json.loads((step2 / "trainer_state.json").read_text())["step"] == 2
    assert (run / "report.md").is_file()
    if fsdp:
        _sharded_checkpoints_load_and_resume(run, sets, rows, launcher)

    from divrl.trainer import Trainer  # resume at world size 1: step 3 from the 2-rank checkpoint

    cfg = build_config(None, [*(s for s in sets if not s.startswith("steps=")), "steps=3", "resume=true"])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.run()
    assert trainer.step == 3
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "reward" in r] == [1, 2, 3]


def _sharded_checkpoints_load_and_resume(run: Path, sets: list[str], rows: list[dict], launcher: str) -> None:
    from transformers import AutoModelForCausalLM

    step2 = run / "checkpoints" / "step-2"
    assert json.loads((step2 / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(step2)
    optimizer = torch.load(step2 / "optimizer.pt", weights_only=True)  # the one-process format, full tensors
    for index, (name, p) in enumerate(loaded.named_parameters()):
        assert optimizer["state"][index]["exp_avg"].shape == p.shape, name
    # step 2 again, from the step-1 checkpoint loaded into shards (weights and AdamW state): the
    # same metrics and the same weights after it
    before = loaded.state_dict()
    shutil.rmtree(step2)
    (run / "report.md").unlink()
    _torchrun(
        "-m",
        "divrl",
        "train",
        *(arg for s in [*sets, "resume=true"] for arg in ("--set", s)),
        cwd=run.parent,
        launcher=launcher,
    )
    again = read_metrics(run / "metrics.jsonl")
    first, second = (next(r for r in rs if r["step"] == 2 and "reward" in r) for rs in (rows, again))
    for key in ("reward", "completion_length", "loss", "entropy", "grad_norm"):
        assert second[key] == pytest.approx(first[key], rel=1e-5, abs=1e-6), key
    after = AutoModelForCausalLM.from_pretrained(step2).state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _cfg(tmp_path, *extra):
    return build_config(None, ["model=tiny", "prompts_per_step=4", f"output_dir={tmp_path / 'run'}", *extra])


def test_a_world_size_that_does_not_divide_the_prompts_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'prompts_per_step': 4 prompts .* 3 ranks"):
        distributed.check_config(_cfg(tmp_path), distributed.World(0, 3, 0))
    distributed.check_config(_cfg(tmp_path), distributed.World(1, 2, 1))  # 2 per rank: fine
    distributed.check_config(_cfg(tmp_path, "prompts_per_step=3"), distributed.World())  # one process


@pytest.mark.parametrize(
    "key",  # a mapping key is on with {} (its defaults)
    ["dynamic_sampling=true", "prompt_filter=greedy_unsolved", "prefix_replay={}", "knowledge_hints={}"],
)
def test_options_decided_per_rank_are_refused(tmp_path, key):
    with pytest.raises(ConfigError, match=rf"'{key.split('=')[0]}': not supported with data-parallel .*2 ranks"):
        distributed.check_config(_cfg(tmp_path, key), distributed.World(0, 2, 0))


def test_shards_are_contiguous_blocks_in_rank_order():
    items = list(range(6))
    blocks = [distributed.shard(items, distributed.World(r, 3, r)) for r in range(3)]
    assert blocks == [[0, 1], [2, 3], [4, 5]]
    assert distributed.rank_seed(7, 0) == 7  # rank 0 samples as one process does
    assert len({distributed.rank_seed(7, r) for r in range(4)}) == 4


def test_fsdp_is_refused_with_lora_and_ignored_in_one_process(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'fsdp' cannot shard a LoRA run"):
        _cfg(tmp_path, "fsdp=true", "lora={}")
    from divrl.sharding import is_sharded
    from divrl.trainer import Trainer

    said: list[str] = []
    trainer = Trainer(_cfg(tmp_path, "fsdp=true"), log=said.append)
    assert not trainer.sharded and not is_sharded(trainer.model)
    assert "fsdp: one process, nothing to shard; the model is trained whole" in said


def test_a_model_without_transformer_block_classes_is_not_sharded():
    from divrl import sharding

    with pytest.raises(ValueError, match=r"Linear names no transformer block class \(_no_split_modules\)"):
        sharding.shard(torch.nn.Linear(2, 2), 2)


def test_the_vllm_backend_is_refused_with_ranks(tmp_path):
    """Checked on a config built without the key (vLLM itself is absent from this environment)."""
    cfg = dataclasses.replace(_cfg(tmp_path), rollout_backend="vllm")
    with pytest.raises(
        ConfigError, match=r"'rollout_backend': not supported with data-parallel .*2 ranks.*own vLLM engine"
    ):
        distributed.check_config(cfg, distributed.World(0, 2, 0))
    distributed.check_config(_cfg(tmp_path), distributed.World(0, 2, 0))  # 'builtin': fine


def test_sharded_blocks_are_found_and_recomputed(tmp_path, tiny, monkeypatch):
    """FSDP2 renames each block's class (`FSDPLlamaDecoderLayer`): the blocks are still found, so
    `activation_checkpointing` recomputes every one of them under FSDP (one process, gloo)."""
    import torch.distributed as dist

    from divrl import recompute, sharding
    from divrl.hidden import completion_hidden

    model, tokenizer = tiny
    calls = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    def checkpointed_forwards(model) -> int:
        calls.clear()
        with recompute.recomputed_activations(model):
            out = completion_hidden(model, [[5, 6, 7]], [[8, 9, 10], [11, 12]], tokenizer.pad_token_id)
        out.hidden.sum().backward()
        return len(calls)

    whole = checkpointed_forwards(copy.deepcopy(model))  # copies: the session's model stays as it is
    model = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharding.shard(model, 1)
        sharding.gather(model)
        assert len(sharding.blocks(model)) == 2
        sharded = checkpointed_forwards(model)
    finally:
        dist.destroy_process_group()
    assert sharded == whole == 2  # 2 blocks × one packed forward (prompt and completions)


def test_more_processes_on_a_node_than_its_cuda_devices_are_refused(tmp_path, monkeypatch):
    """`device: auto`/`cuda` gives local rank r cuda:r: 2 processes on a 1-GPU node are refused up
    front, on every rank alike (LOCAL_WORLD_SIZE, not the rank's own index), naming the key."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in (0, 1):
        with pytest.raises(ConfigError, match=r"'device'.*runs 2 processes and has 1 CUDA device"):
            distributed.check_config(_cfg(tmp_path), distributed.World(rank, 2, rank))
    distributed.check_config(_cfg(tmp_path, "device=cpu"), distributed.World(1, 2, 1))  # gloo: fine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # 2 nodes of 1 process each
    distributed.check_config(_cfg(tmp_path), distributed.World(1, 2, 0))
