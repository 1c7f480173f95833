import pytest

from divrl.config import ConfigError, build_config, describe


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
