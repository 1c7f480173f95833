"""End-to-end smoke test on the real embedded default model (SmolLM2-135M-Instruct from GGUF)."""

import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from divrl.config import build_config
from divrl.models import default_model_dir
from divrl.runlog import read_metrics
from divrl.trainer import Trainer


def test_processes_materializing_the_cache_at_once_write_it_once(tmp_path):
    """Two processes (the ranks of a data-parallel run on a fresh machine) materialize the default
    tokenizer together: both succeed (the cache is written under a lock; unlocked, the second
    rename failed with ENOTEMPTY), and a killed writer's leftover directory is removed."""
    leftover = tmp_path / ".SmolLM2-135M-Instruct-tokenizer.killed"
    leftover.mkdir()
    code = "from divrl.models import default_tokenizer_dir; print(default_tokenizer_dir())"
    env = {**os.environ, "DIVRL_CACHE": str(tmp_path)}
    writers = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [writer.communicate(timeout=120)[0].strip() for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0]
    target = tmp_path / "SmolLM2-135M-Instruct-tokenizer"
    assert outputs == [str(target)] * 2 and (target / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", target.name]


@pytest.mark.slow
def test_one_step_on_the_default_model(tmp_path):
    cache = default_model_dir()
    loaded = AutoModelForCausalLM.from_pretrained(cache)
    assert getattr(loaded, "hf_quantizer", None) is None  # trainable, not flagged as quantized
    assert not hasattr(loaded.config, "quantization_config")
    assert loaded.config.vocab_size == 49152

    cfg = build_config(
        None,
        [
            "model=default",
            "steps=1",
            f"output_dir={tmp_path / 'run'}",
            "prompts_per_step=2",
            "group_size=2",
            "max_new_tokens=8",
            "eval_size=2",
            "eval_samples=2",
            "train_size=20",
        ],
    )
    summary = Trainer(cfg, log=lambda *_: None).run()
    row = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r)
    assert row["kl"] == pytest.approx(0.0, abs=1e-5) and row["entropy"] > 0
    assert 0.0 <= summary["after"]["eval_pass@1"] <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "step-1" / "model.safetensors").is_file()
