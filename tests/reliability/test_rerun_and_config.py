"""Re-running the main job (a fresh run directory per run, runs/latest, refuse-or-resume for an
explicit output_dir) and config validation (every range, conflicting options) before any model loads."""

import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from cli_args import ONE_TINY_STEP, as_sets
from divrl import run_dirs
from divrl.cli import main
from divrl.config import ConfigError, build_config
from divrl.models import ModelLoadError

TINY = as_sets(*ONE_TINY_STEP, "eval_every=0", "inspect_every=0")


@pytest.fixture
def main_config(tmp_path, monkeypatch):
    """A config file with no output_dir (like configs/default.yaml), run from tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "main.yaml").write_text("model: tiny\n")
    return "main.yaml"


def test_the_main_job_runs_again_into_a_fresh_directory_and_resumes_the_newest(main_config, capsys, one_thread):
    assert main(["train", main_config, *TINY]) == 0
    assert main(["train", main_config, *TINY]) == 0
    first, second = sorted(Path("runs").glob("main-*"))
    assert os.readlink("runs/latest") == second.name
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == f"report: {second / 'report.md'}" and (second / "report.md").is_file()

    assert main(["train", main_config, *TINY, "--set", "steps=2", "--set", "resume=true"]) == 0
    assert sorted(Path("runs").glob("main-*")) == [first, second]
    assert (second / "checkpoints" / "step-2").is_dir() and not (first / "checkpoints" / "step-2").exists()
    assert f"output_dir: {second}" in (second / "config.yaml").read_text()


def test_runs_started_in_the_same_second_get_distinct_directories(tmp_path):
    now = datetime(2026, 11, 26, 10, 15, 0)
    first = run_dirs.fresh_run_dir("default", tmp_path, now)
    second = run_dirs.fresh_run_dir("default", tmp_path, now)
    assert (first.name, second.name) == ("default-20261126-101500", "default-20261126-101500-2")
    assert run_dirs.newest_run("default", tmp_path) == second
    assert run_dirs.newest_run("other", tmp_path) is None


def test_latest_is_a_text_file_where_symlinks_fail(tmp_path, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(Path, "symlink_to", refuse)
    run = run_dirs.fresh_run_dir("default", tmp_path)
    run_dirs.point_latest(run)
    latest = tmp_path / "latest"
    assert not latest.is_symlink() and latest.read_text() == f"{run.name}\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_explicit_output_dir_that_holds_a_run_is_refused(main_config, capsys):
    Path("mine").mkdir()
    Path("mine/metrics.jsonl").write_text("{}\n")
    assert main(["train", main_config, *TINY, "--set", "output_dir=mine"]) == 2
    assert "config key 'output_dir': 'mine' already holds a run" in capsys.readouterr().err
    assert not Path("runs").exists()


def test_resume_without_output_dir_and_without_a_run_is_refused(main_config, capsys):
    assert main(["train", main_config, *TINY, "--set", "resume=true"]) == 2
    assert "config key 'resume': true without an output_dir" in capsys.readouterr().err


def test_a_run_that_fails_to_start_leaves_no_directory_and_no_latest(main_config, capsys):
    assert main(["train", main_config, *TINY, "--set", "model=./no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(Path("runs").iterdir()) == []


def test_make_run_passes_args_to_divrl_train():
    root = Path(__file__).resolve().parents[2]
    dry = subprocess.run(
        ["make", "-n", "-C", str(root), "run", "ARGS=--set steps=10"], capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0
    assert "divrl train configs/default.yaml --set steps=10" in dry.stdout


# One row per key that has a range: (key, a value outside it). Keys parsed by the objective
# (divrl.spec) name themselves without quotes.
OUT_OF_RANGE = [
    ("steps", 0),
    ("prompts_per_step", 0),
    ("group_size", 0),
    ("max_new_tokens", 0),
    ("train_size", 0),
    ("eval_size", 0),
    ("eval_samples", 0),
    ("micro_batch_size", 0),
    ("inner_iterations", 0),
    ("keep_checkpoints", 0),
    ("checkpoint_every", 0),
    ("stored_prompts", 0),
    ("stored_samples", 0),
    ("stored_per_step", 0),
    ("eval_every", -1),
    ("inspect_every", -1),
    ("monitor_kl_every", 0),
    ("max_refills", -1),
    ("seed", -1),
    ("seed", 2**32),
    ("eval_seed", -1),
    ("temperature", 0),
    ("temperature", ".inf"),
    ("eval_temperature", 0),
    ("top_p", 0),
    ("top_p", 1.5),
    ("lr", 0),
    ("lr", ".nan"),
    ("weight_decay", -0.1),
    ("max_grad_norm", -1),
    ("clip_low", -0.1),
    ("clip_low", 1),
    ("clip_high", -0.1),
    ("kl_coef", -1),
    ("advantage_clip", -1),
    ("loss_normalizer", 0),
    ("overlong_buffer", 1.5),
    ("overlong_penalty", -1),
    ("stored_solved", 0),
    ("stored_solved", 1.5),
    ("stored_temperature", 0),
    ("stored_top_p", 1.5),
    ("behaviour_cloning_steps", -1),
    ("behaviour_cloning_lr", 0),
    ("reference_refresh_every", -1),
    ("offline_keep", -1),
    ("offline_shortest", 0),
    ("offline_shortest", 1.5),
]


@pytest.mark.parametrize("key, value", OUT_OF_RANGE)
def test_a_value_out_of_range_names_the_key_and_the_value(key, value):
    with pytest.raises(ConfigError, match=rf"^config key '?{key}'?:? must ") as caught:
        build_config(None, [f"{key}={value}"])
    parsed = yaml.safe_load(str(value))  # as --set reads it; a float key shows 0 as 0.0
    assert f"got {parsed!r}" in str(caught.value) or f"got {float(parsed)!r}" in str(caught.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["policy_gradient=false", "terms=[{divergence: forward_kl, target: reference, coef: 0}]"],
            "with policy_gradient false every loss term's coefficient is 0 (forward_kl_to_reference coef 0)",
        ),
        (
            ["policy_gradient=false", "entropy_anchor={coef: 0}"],
            "every loss term's coefficient is 0 (entropy_anchor coef 0)",
        ),
        (
            [
                "policy_gradient=false",
                "kl_coef=0.1",
                "kl_estimator=k1",
                "kl_in_reward=true",
                "terms=[{divergence: forward_kl, target: reference}]",
            ],
            "'policy_gradient' is false, so the reward-placed terms reverse_kl_to_reference",
        ),
        (["kl_coef=0.1", "kl_estimator=k3", "top_p=0.9"], "'top_p' < 1 samples from the renormalized nucleus"),
        (["eval_seed=0"], "'eval_seed' must differ from seed"),
    ],
)
def test_conflicting_options_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=r"^config key") as caught:
        build_config(None, overrides)
    assert message in str(caught.value)


def test_an_annealed_coefficient_that_becomes_positive_trains():
    cfg = build_config(
        None,
        [
            "policy_gradient=false",
            "terms=[{divergence: forward_kl, target: reference, coef: 0, anneal: {to: 0.1, steps: 5}}]",
        ],
    )
    assert not cfg.objective.policy_gradient


@pytest.fixture
def loads(monkeypatch):
    """Every model load, recorded and refused (so a test that gets past validation stops there)."""
    calls = []

    def refuse(spec, *_args, **_kwargs):
        calls.append(spec)
        raise ModelLoadError(f"no model loads in this test ({spec})")

    monkeypatch.setattr("divrl.models.load_model", refuse)
    monkeypatch.setattr("divrl.trainer.load_model", refuse)
    return calls


@pytest.mark.parametrize("override", ["lr=0", "seed=-1", "top_p=1.5", "kl_coef=.inf", "policy_gradient=false"])
def test_validation_happens_before_any_model_loads(main_config, capsys, loads, override):
    assert main(["train", main_config, *TINY, "--set", override]) == 2
    assert "divrl: error: config key" in capsys.readouterr().err
    assert loads == [] and not Path("runs").exists()


def test_a_valid_config_reaches_the_model_loader(main_config, capsys, loads):
    assert main(["train", main_config, *TINY]) == 2
    assert loads == ["tiny"] and "no model loads in this test" in capsys.readouterr().err
