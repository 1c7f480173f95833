"""SIREN's anchored top-p entropy regularizer: the top-p entropy on hand-computed numbers and its
chunked gradient, the per-completion peak mask and c·(H̄ − H₀)², and the anchor's life in a run."""

import math

import pytest
import torch

from divrl import objectives, rowwise
from divrl.chunked import Head
from divrl.config import build_config
from divrl.rowwise import ModelOutputs
from divrl.runlog import read_metrics
from divrl.trainer import Trainer


def _entropy(probs):
    probs = torch.tensor(probs, dtype=torch.float64)
    return float(-(probs * probs.log()).sum())


def test_top_p_entropy_renormalizes_the_tokens_below_the_mass_threshold():
    logits = torch.tensor(
        [[0.5, 0.2, 0.15, 0.1, 0.05], [0.9, 0.05, 0.03, 0.01, 0.01], [0.3, 0.3, 0.22, 0.1, 0.08]], dtype=torch.float64
    ).log()
    got = rowwise._top_p_entropy_of_logits(logits, top_p=0.8, top_k=10000)
    # row 0: running mass 0.5, 0.7 < 0.8 → (5/7, 2/7); row 1: 0.9 ≥ 0.8 at once → nothing, 0;
    # row 2: 0.3, 0.6 < 0.8 ≤ 0.82 → (1/2, 1/2). No running mass sits at 0.8 itself: the softmax's
    # rounding differs by CPU (0.3 + 0.3 + 0.2 summed to 0.7999999999999998 on an AVX-512 EPYC)
    expected = [_entropy([5 / 7, 2 / 7]), 0.0, math.log(2)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    only_top = rowwise._top_p_entropy_of_logits(logits, top_p=0.8, top_k=1)
    torch.testing.assert_close(only_top, torch.zeros(3, dtype=torch.float64))


def test_chunked_top_p_entropy_matches_full_logits_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 4, dtype=torch.float64, generator=gen).requires_grad_()
    head = Head(torch.randn(11, 4, dtype=torch.float64, generator=gen).requires_grad_(), scale=2.0)
    got = rowwise.top_p_entropy(ModelOutputs(hidden, head), 0.8, 6, chunk_rows=3)
    full = rowwise._top_p_entropy_of_logits(head.logits(hidden), 0.8, 6)
    torch.testing.assert_close(got, full)
    weights = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
    grads = [torch.autograd.grad((weights * v).sum(), (hidden, head.weight), retain_graph=True) for v in (got, full)]
    for g, e in zip(*grads):
        torch.testing.assert_close(g, e)


def _inputs(anchor):
    """Two completions of 5 tokens over a 5-word table: token t of completion i reads row 5i + t."""
    gen = torch.Generator().manual_seed(1)
    table = (3 * torch.randn(10, 5, dtype=torch.float64, generator=gen)).requires_grad_()
    hidden = torch.eye(10, dtype=torch.float64)
    rows = torch.tensor([0] * 5 + [1] * 5)
    inputs = objectives.ObjectiveInputs(
        policy=ModelOutputs(hidden, Head(table.T)),
        tokens=torch.zeros(10, dtype=torch.long),
        rows=rows,
        advantages=torch.zeros(2, dtype=torch.float64),
        rewards=torch.zeros(2),
        group_pass_rate=torch.zeros(2),
        token_scale=torch.full((10,), 0.1, dtype=torch.float64),
        entropy_anchor=anchor,
        batch_fraction=0.5,
    )
    return inputs, table


def test_the_regularizer_is_the_squared_deviation_of_the_peak_tokens_mean_entropy():
    spec = build_config(None, ["policy_gradient=false"], recipe="siren").objective.entropy_anchor
    inputs, table = _inputs(anchor=0.1)
    per_token = rowwise._top_p_entropy_of_logits(table.detach(), 0.8, 10000)
    # 5 tokens: the 0.8-quantile (linear) lies between the 4th and 5th largest → only the peak is kept
    expected_mean = (per_token[:5].max() + per_token[5:].max()) / 2
    loss, mean_entropy, kept = objectives.entropy_anchor(spec, inputs)
    assert mean_entropy == pytest.approx(expected_mean.item(), rel=1e-12) and kept == pytest.approx(0.2)
    assert loss.item() == pytest.approx(0.005 * 0.5 * (expected_mean.item() - 0.1) ** 2, rel=1e-12)
    at_anchor, _ = _inputs(anchor=mean_entropy)
    (grad,) = torch.autograd.grad(objectives.entropy_anchor(spec, at_anchor)[0], at_anchor.policy.head.weight)
    assert grad.abs().max().item() < 1e-12  # H̄ = H₀: no push either way
    unset, _ = _inputs(anchor=None)
    assert objectives.entropy_anchor(spec, unset)[0].item() == 0.0


def test_the_anchor_is_set_by_the_first_step_and_survives_a_resume(tmp_path):
    args = [
        "model=tiny",
        "prompts_per_step=2",
        "group_size=2",
        "max_new_tokens=6",
        "eval_size=2",
        "eval_samples=1",
        "train_size=20",
        "checkpoint_every=1",
        "eval_every=0",
        "lr=1e-3",
        f"output_dir={tmp_path / 'run'}",
    ]
    first = Trainer(build_config(None, [*args, "steps=2"], recipe="siren"), log=lambda *_: None)
    first.run()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert rows[0]["entropy_anchor_h0"] == rows[0]["top_p_entropy"] == first.entropy_anchor
    assert rows[0]["entropy_anchor_loss"] == 0.0 and rows[1]["entropy_anchor_h0"] == first.entropy_anchor
    assert rows[1]["entropy_anchor_loss"] == pytest.approx(  # one micro-batch here: exactly c·(H̄ − H₀)²
        0.005 * (rows[1]["top_p_entropy"] - first.entropy_anchor) ** 2, rel=1e-9
    )
    resumed = Trainer(build_config(None, [*args, "steps=3", "resume=true"], recipe="siren"), log=lambda *_: None)
    resumed.run()
    assert resumed.entropy_anchor == first.entropy_anchor


@pytest.mark.parametrize(
    "value, message",
    [
        ("{coef: -1}", "entropy_anchor.coef: must be a finite number ≥ 0"),
        ("{top_p: 0}", "entropy_anchor.top_p: must be in (0, 1]"),
        ("{quantile: 1}", "entropy_anchor.quantile: must be in [0, 1)"),
        ("{topk: 5}", "entropy_anchor: unknown key 'topk'; did you mean 'top_k'?"),
    ],
)
def test_bad_anchor_settings_are_refused(value, message):
    with pytest.raises(Exception) as err:
        build_config(None, [f"entropy_anchor={value}"])
    assert message in str(err.value)
