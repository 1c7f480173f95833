"""The README's worked objective configs (configs/examples/) are the files themselves, validate,
and train a step on the tiny models."""

from pathlib import Path

import pytest

from divrl.config import build_config
from divrl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "configs" / "examples").glob("*.yaml"))
TINY = [
    "model=tiny",
    "teacher=tiny",
    "steps=1",
    "prompts_per_step=2",
    "group_size=4",
    "max_new_tokens=6",
    "eval_size=2",
    "eval_samples=2",
    "train_size=20",
    "lr=1e-3",
    "eval_every=0",
]


def test_the_readme_shows_every_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert len(EXAMPLES) == 3
    for path in EXAMPLES:
        assert f"```yaml\n{path.read_text()}```" in readme, path.name


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_each_example_trains_a_step_on_the_tiny_models(tmp_path, path):
    cfg = build_config(path, [*TINY, f"output_dir={tmp_path / 'run'}"])
    metrics = Trainer(cfg, log=lambda *_: None).train_step(0)
    for term in cfg.objective.terms:
        assert metrics[term.name] >= 0 and f"{term.name}_share" in metrics
    assert metrics["grad_norm"] > 0
