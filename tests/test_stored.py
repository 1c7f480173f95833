"""DPH-RL's stored responses: the stored-sample estimator is unbiased for the f-divergence (value
and gradient, by enumeration), DPH-F/JS forms, and the rehearsal set in a run: sampled once,
split by pass rate, solved prompts out of the policy-gradient pool, reused on resume."""

import json

import pytest
import torch

from divrl import objectives, stored
from divrl.config import build_config
from divrl.runlog import read_metrics
from divrl.trainer import Trainer


@pytest.mark.parametrize("name, params", [("forward_kl", {}), ("jsd", {"beta": 0.5}), ("chi2", {}),
                                          ("reverse_kl", {}), ("alpha", {"alpha": 0.3})])
def test_stored_estimate_is_unbiased_under_the_target(name, params):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, dtype=torch.float64, generator=gen).requires_grad_()
    lq = torch.randn(6, dtype=torch.float64, generator=gen).log_softmax(-1)
    lp = logits.log_softmax(-1)
    every_token = objectives.stored_estimate(name, params, lp, lq)  # y = each token, weighted by q(y)
    expected = objectives.divergences.get(name)(lp, lq, **params)
    value = (lq.exp() * every_token).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    grads = [torch.autograd.grad(v, logits, retain_graph=True)[0] for v in (value, expected)]
    torch.testing.assert_close(grads[0], grads[1])
    assert (every_token.detach() >= -1e-12).all()  # the control variate keeps each sample ≥ 0


def test_dph_forms():
    lp, lq = torch.log(torch.tensor([0.3, 0.05])), torch.log(torch.tensor([0.1, 0.4]))
    u = (lp - lq).exp()
    torch.testing.assert_close(objectives.stored_estimate("forward_kl", {}, lp, lq), u - 1 - u.log())
    js = u * u.log() - (u + 1) * ((u + 1) / 2).log()  # DPH-JS generator
    torch.testing.assert_close(2 * objectives.stored_estimate("jsd", {"beta": 0.5}, lp, lq), js)


VERIFIER = "def even_solved(completion, answer):\n    return 1.0 if int(answer) % 2 == 0 else 0.0\n"


def test_the_rehearsal_set_is_sampled_once_split_and_reused(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n" for i in range(30)))
    (tmp_path / "dph_verifier.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["model=tiny", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "eval_size=4",
            "eval_samples=1", "checkpoint_every=1", "eval_every=0", f"task={data}",
            "verifier=dph_verifier:even_solved", "stored_prompts=10", "stored_samples=2", "stored_per_step=2",
            "monitor_kl=false", f"output_dir={tmp_path / 'run'}"]
    trainer = Trainer(build_config(None, [*args, "steps=1"], recipe="dph-rl"), log=lambda *_: None)
    solved = {trainer.task.train[g.index].answer for g in trainer.stored_groups}
    assert solved and all(int(a) % 2 == 0 for a in solved)  # the initial policy "solves" even answers
    assert not solved & {e.answer for e in trainer.prompts.examples}  # no longer PG prompts
    assert trainer.reference is None  # the stored log-probs replace an online reference model
    saved = (tmp_path / "run" / stored.FILENAME).read_text()
    trainer.run()
    (row,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    assert row["forward_kl_to_reference_stored"] >= 0 and 0 < row["forward_kl_to_reference_stored_share"] <= 1
    resumed = Trainer(build_config(None, [*args, "steps=2", "resume=true"], recipe="dph-rl"), log=lambda *_: None)
    assert (tmp_path / "run" / stored.FILENAME).read_text() == saved
    assert [g.index for g in resumed.stored_groups] == [g.index for g in trainer.stored_groups]


def test_stored_terms_are_validated():
    with pytest.raises(Exception, match="its target is reference"):
        build_config(None, ["teacher=tiny", "terms=[{divergence: forward_kl, target: teacher, estimator: stored}]"])
    with pytest.raises(Exception, match="'stored_solved' must be in \\(0, 1\\]"):
        build_config(None, ["stored_solved=0"], recipe="dph-rl")


def test_a_rehearsal_set_that_leaves_no_policy_gradient_prompt_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": str(2 * i)}) + "\n" for i in range(12)))
    (tmp_path / "dph_verifier.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = build_config(None, ["model=tiny", "eval_size=4", "max_new_tokens=4", f"task={data}",
                              "verifier=dph_verifier:even_solved", "stored_samples=2",
                              f"output_dir={tmp_path / 'run'}"], recipe="dph-rl")
    with pytest.raises(Exception, match="none is left for the policy gradient"):
        Trainer(cfg, log=lambda *_: None)
