import json
import os
import subprocess
import sys

import pytest

from cli_args import ONE_TINY_STEP, as_sets
from divrl.cli import main

TINY = as_sets("model=tiny", *ONE_TINY_STEP)


def test_train_happy_path_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["train", str(config), *TINY]) == 0
    out = capsys.readouterr()
    assert "resolved config:" in out.out and "held-out pass@1" in out.out
    assert "train: 100%" in out.err  # the progress bar
    run = tmp_path / "out"
    assert (run / "checkpoints" / "step-1" / "model.safetensors").is_file()
    assert "model: tiny" in (run / "config.yaml").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "modle=tiny"], "unknown config key 'modle'; did you mean 'model'?"),
        (["--set", "task=chain_summ"], "unknown task 'chain_summ'"),
        (["--set", "model=./no/such/model"], "model path './no/such/model' does not exist"),
        (["--set", "reference=./no/such/model"], "config key 'reference': model path './no/such/model' does not exist"),
        (
            ["--set", "teacher=./no/such/model", "--set", "terms=[{divergence: reverse_kl, target: teacher}]"],
            "config key 'teacher': model path './no/such/model' does not exist",
        ),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_message(tmp_path, capsys, args, message):
    assert main(["train", *TINY, "--set", f"output_dir={tmp_path / 'out'}", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_malformed_dataset_line_is_reported_with_file_and_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n{broken\n")
    assert main(["train", *TINY, "--set", f"task={data}", "--set", f"output_dir={tmp_path / 'out'}"]) == 2
    assert f"{data}:2: not valid JSON" in capsys.readouterr().err


def test_help_config_lists_keys(capsys):
    assert main(["train", "--help-config"]) == 0
    assert "output_dir (default None): Run directory" in capsys.readouterr().out


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "divrl")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout


def test_every_command_is_registered(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    for command in ("train", "recipes", "eval", "compare", "inspect", "analyze", "lab"):
        assert command in listed
