"""LoRA (config key `lora`, `divrl.lora`): adapters train, the base stays bit-identical, the reference
is the policy with its adapters off, checkpoints hold the adapter (and a merged model on request)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from divrl import chunked, lora
from divrl.checkpoint import checkpoint_dirs, resolve_model
from divrl.config import ConfigError, build_config
from divrl.hidden import completion_hidden
from divrl.models import load_model, output_head
from divrl.trainer import Trainer

LORA = "lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, up_proj]}"


def _overrides(tmp_path):
    return [
        "model=tiny",
        "steps=1",
        f"output_dir={tmp_path / 'run'}",
        "prompts_per_step=2",
        "group_size=4",
        "max_new_tokens=6",
        "eval_size=2",
        "eval_samples=2",
        "train_size=20",
        "lr=1e-2",
        "checkpoint_every=1",
        "eval_every=0",
        "dtype=float32",
    ]


def tiny_cfg(tmp_path, *extra, recipe=None):
    return build_config(None, [*_overrides(tmp_path), LORA, *extra], recipe=recipe)


def quiet(*_args, **_kwargs):
    pass


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{r: 0}", "'lora.r' must be an integer ≥ 1"),
        ("{alpha: -1}", "'lora.alpha' must be a number > 0"),
        ("{dropout: 0.1}", "'lora.dropout' must be 0"),
        ("{target_modules: []}", "'lora.target_modules'"),
        ("{rank: 4}", "'lora.rank' is unknown"),
        ("4", "'lora' must be dict"),
    ],
)
def test_bad_lora_values_name_the_key(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(None, ["model=tiny", f"output_dir={tmp_path}", f"lora={value}"])


def test_adapting_the_output_head_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.target_modules.*output head"):
        Trainer(tiny_cfg(tmp_path, "lora.target_modules=[q_proj, lm_head]"), log=quiet)


def test_one_step_changes_only_adapter_weights_and_the_reference_is_the_base(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, "kl_coef=0.1"), log=quiet)
    assert isinstance(trainer.reference, lora.AdaptersOff)  # no second copy of the model
    base, _ = load_model("tiny", seed=0)  # the same initial weights, loaded separately
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.run()
    changed = {k for k, v in trainer.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(".lora_B." in k or ".lora_A." in k for k in changed)
    assert any(".lora_B." in k for k in changed)
    base_state = base.state_dict()
    for name, value in trainer.model.named_parameters():
        if "lora_" not in name:  # base weights bit-identical to a fresh load
            assert torch.equal(value, base_state[name.replace(".base_layer", "")]), name

    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13], [14, 15], [16, 17, 18]]
    pad = trainer.tokenizer.pad_token_id
    with torch.no_grad():
        with lora.forward_of(trainer.reference) as reference:
            ref = completion_hidden(reference, prompts, completions, pad)
            ref_lp, _ = chunked.logprob_entropy(ref.hidden, output_head(reference), ref.tokens)
        expected = completion_hidden(base, prompts, completions, pad)
        base_lp, _ = chunked.logprob_entropy(expected.hidden, output_head(base), expected.tokens)
        policy = completion_hidden(trainer.model, prompts, completions, pad)  # adapters back on
        policy_lp, _ = chunked.logprob_entropy(policy.hidden, output_head(trainer.model), policy.tokens)
    torch.testing.assert_close(ref_lp, base_lp, rtol=0, atol=1e-6)
    assert not torch.equal(policy_lp, base_lp)  # the trained adapters change the policy (a little: B was 0)


@pytest.mark.parametrize("recipe", ["grpo", "rapo", "dph-rl", "ps-kd", "demo-rl", "opd"])
def test_recipes_train_a_step_with_lora(tmp_path, recipe):
    extra = {
        "ps-kd": ["reference_refresh_every=1"],
        "demo-rl": ["behaviour_cloning_steps=1", "demonstrations_from=answers"],
        "dph-rl": ["stored_prompts=4", "stored_samples=2", "stored_per_step=2"],
    }.get(recipe, [])
    teacher = ["teacher=tiny"] if recipe in ("opd",) else []
    cfg = tiny_cfg(tmp_path, "micro_batch_size=8", *teacher, *extra, recipe=recipe)
    trainer = Trainer(cfg, log=quiet)
    trainer.run()
    step = next(
        r
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if r["step"] == 1 and "reward" in r
    )
    assert step["skipped_step"] == 0
    assert (tmp_path / "run" / "checkpoints" / "step-1" / lora.ADAPTER_WEIGHTS).is_file()


def test_checkpoint_resume_and_merged_save(tmp_path):
    cfg = tiny_cfg(tmp_path, "steps=2", "kl_coef=0.1", "lora.save_merged=true")
    straight = Trainer(cfg, log=quiet)
    straight.run()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", lora.ADAPTER_WEIGHTS, lora.BASE_FILE, "merged", "optimizer.pt"} <= names
    assert "model.safetensors" not in names  # the adapter only, beside the merged copy
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert "merged/model.safetensors" in manifest and lora.ADAPTER_WEIGHTS in manifest

    # merged/ loads with plain transformers and computes what base + adapters compute
    merged = AutoModelForCausalLM.from_pretrained(checkpoint / "merged", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, straight.model(ids).logits, rtol=1e-5, atol=1e-5)
        # and so does the base rebuilt from lora_base.json with the adapter (no merged/ needed)
        via_run, _ = load_model(resolve_model(str(tmp_path / "run")))  # the run's newest checkpoint
        torch.testing.assert_close(via_run(ids).logits, straight.model(ids).logits, rtol=1e-5, atol=1e-5)
        adapter_only = tmp_path / "adapter-only"
        shutil.copytree(checkpoint, adapter_only, ignore=shutil.ignore_patterns("merged"))
        rebuilt, _ = load_model(str(adapter_only))
        torch.testing.assert_close(rebuilt(ids).logits, straight.model(ids).logits, rtol=1e-5, atol=1e-5)

    # resume from step 1 repeats step 2: adapters and optimizer restored
    resumed_dir = tmp_path / "resumed"
    first = Trainer(tiny_cfg(resumed_dir, "steps=1", "kl_coef=0.1"), log=quiet)
    first.run()
    again = Trainer(tiny_cfg(resumed_dir, "steps=2", "kl_coef=0.1", "resume=true"), log=quiet)
    again.run()
    assert [s for s, _ in checkpoint_dirs(resumed_dir / "run")] == [1, 2]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), name


def test_a_full_weight_checkpoint_is_not_resumed_with_lora(tmp_path):
    cfg = build_config(None, _overrides(tmp_path))
    Trainer(cfg, log=quiet).run()
    with pytest.raises(RuntimeError, match="resume with the config key 'lora'"):
        Trainer(tiny_cfg(tmp_path, "steps=2", "resume=true"), log=quiet).run()


def test_a_behaviour_cloned_reference_is_the_merged_copy_fresh_and_resumed(tmp_path):
    """Demo-RL with LoRA: the fresh run's reference is π_BC read back from behaviour_cloned/ (base +
    adapters merged), as the resumed run's is, so both runs compute the same numbers."""
    args = ("behaviour_cloning_steps=2", "demonstrations_from=answers", "group_size=2")
    fresh = Trainer(tiny_cfg(tmp_path, *args, recipe="demo-rl"), log=quiet)
    fresh.run()
    resumed = Trainer(tiny_cfg(tmp_path, *args, "steps=2", "resume=true", recipe="demo-rl"), log=quiet)
    want, got = fresh.reference.state_dict(), resumed.reference.state_dict()
    assert got.keys() == want.keys() and not any("lora" in k for k in want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.no_grad():  # π_BC: the policy as cloned, before any RL step
        initial, _ = load_model("tiny", seed=0)
        assert not torch.equal(fresh.reference(ids).logits, initial(ids).logits)
