import os

import pytest
import yaml

from divrl.config import ConfigError, build_config, describe, save_config


def test_defaults_validate_and_overrides_apply(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nmodel: tiny\n")
    cfg = build_config(path, ["lr=1e-5", "task_params.min_terms=3", "output_dir=x"])
    assert (cfg.steps, cfg.model, cfg.lr, cfg.output_dir) == (5, "tiny", 1e-5, "x")
    assert cfg.task_params["min_terms"] == 3 and cfg.task_params["max_terms"] == 2


@pytest.mark.parametrize(
    "source, message",
    [
        ("stepz: 3", "unknown config key 'stepz'; did you mean 'steps'?"),
        ("steps: many", "config key 'steps' must be int"),
        ("steps: 0", "config key 'steps' must be ≥ 1"),
        ("kl_estimator: k4", "config key 'kl_estimator' must be one of"),
        ("kl_coef: 0.1\nkl_in_reward: true", "config key kl_in_reward: the exact divergence is a loss term"),
        ("- a list", "must hold a mapping"),
        ("monitor_kl_every: 0", "config key 'monitor_kl_every' must be ≥ 1"),
        ("device: tpu", "config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_bad_config_file_names_the_key(tmp_path, source, message):
    path = tmp_path / "c.yaml"
    path.write_text(source)
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        build_config(path)


def test_a_config_file_that_is_not_utf8_is_refused_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"lr: 1e-5\nsystem_prompt: caf\xe9\n")
    with pytest.raises(ConfigError, match=f"'{path}' is not UTF-8 text .* at byte 27"):
        build_config(path)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="did you mean 'output_dir'"):
        build_config(None, ["outputdir=x"])
    with pytest.raises(ConfigError, match="key=value"):
        build_config(None, ["steps"])
    with pytest.raises(ConfigError, match="'steps' is not a mapping"):
        build_config(None, ["steps.x=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("/no/such/config.yaml")


def test_every_key_is_documented():
    text = describe()
    for key in ("model", "task", "steps", "output_dir", "kl_coef", "kl_estimator"):
        assert f"  {key} (default" in text


@pytest.mark.parametrize(
    "recipe, overrides, message",
    [
        (
            "dph-rl",
            ["stored_top_p=0.5"],
            "config key 'stored_top_p' < 1 stores samples of the renormalized nucleus, not of π_ref",
        ),
        ("dph-rl", ["top_p=0.9"], "config key 'top_p' < 1 stores samples of the renormalized nucleus"),
        (
            "dph-rl",
            ["stored_temperature=1.0"],
            "config key 'stored_temperature' must equal temperature (0.7) with the stored estimators",
        ),
        (
            "g-opd",
            ["teacher=tiny", "terms[0].placement=reward"],
            "config key 'group_size' must be ≥ 2 with the reward-placed terms reverse_kl_to_teacher",
        ),
        (
            "w-reinforce",
            ["overlong_buffer=0.5"],
            "config key 'overlong_buffer' shapes the task reward, which advantage: signed does not read",
        ),
        ("w-reinforce", ["diversity_bonus={}"], "config key 'diversity_bonus' shapes the task reward"),
        (
            "g-opd",
            ["teacher=tiny", "reward_calibration={}"],
            "config key 'reward_calibration' shapes the task reward, which advantage: none does not read",
        ),
        (None, ["reward_calibration={samples: true}"], "config key 'reward_calibration': samples must be an integer"),
        (None, ["attention_dtype=float16"], "config key 'attention_dtype' must be one of"),
        (
            None,
            ["dtype=float32", "attention_dtype=bfloat16"],
            "config key 'attention_dtype' cannot be bfloat16 at dtype float32",
        ),
    ],
)
def test_settings_that_would_train_wrongly_or_not_at_all_are_refused(recipe, overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides, recipe=recipe)
    assert message in str(err.value)


def test_stored_terms_accept_the_online_nucleus_when_the_stored_one_is_full():
    cfg = build_config(None, ["top_p=0.9", "stored_top_p=1.0", "stored_temperature=0.7"], recipe="dph-rl")
    assert (cfg.top_p, cfg.stored_top_p, cfg.stored_temperature, cfg.temperature) == (0.9, 1.0, 0.7, 0.7)


def test_save_config_leaves_the_old_file_whole_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(build_config(None, ["steps=3"]), path)

    def killed(*_):  # the process dies after writing, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_config(build_config(None, ["steps=5"]), path)
    assert yaml.safe_load(path.read_text())["steps"] == 3 and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
