"""divrl.weight_analysis on planted tensors (update sparsity, spectral drift, RELEX) and the
`divrl analyze` command on the tiny model."""

import argparse
import copy
import itertools
import json
import math
import shutil

import pytest
import torch

from divrl import analyze_cli
from divrl import weight_analysis as wa
from divrl.checkpoint import write_manifest

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- update sparsity -------------------------------------------------------------------------


def test_sparsity_of_a_masked_delta_is_the_masked_fraction_exactly():
    g = gen()
    base = torch.randn(64, 48, generator=g)
    mask = torch.rand(64, 48, generator=g) < 0.23
    step = 1e-3 * (1 + torch.rand(64, 48, generator=g)) * torch.randn(64, 48, generator=g).sign()
    counts, rtol, atol = wa.tensor_sparsity(base, base + mask * step)
    assert counts.unchanged == int((~mask).sum()) and counts.total == base.numel()
    assert counts.fraction == pytest.approx(1 - mask.float().mean().item(), abs=0)
    assert (rtol, atol) == wa.default_tolerance(torch.float32) and rtol == 2.0**-24


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_tolerance_is_bitwise_equality_in_the_stored_dtype(dtype):
    """Every one-ulp step (up, down, at powers of two, across zero) counts; equal values do not."""
    w = (torch.randn(5000, generator=gen(1)) * torch.logspace(-8, 2, 5000)).to(dtype)
    w = torch.cat([w, torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]).to(dtype)])
    assert wa.tensor_sparsity(w, w.clone())[0].unchanged == w.numel()
    for direction in (math.inf, -math.inf):
        moved = torch.nextafter(w, torch.full_like(w, direction))
        assert wa.tensor_sparsity(w, moved)[0].unchanged == 0


def test_rounding_to_a_coarser_dtype_alone_is_no_change():
    """An fp32 base against its bf16 copy (and back): |Δ| ≤ half a bf16 ulp ≤ u·min(|w|, |w'|)."""
    w = torch.randn(20000, generator=gen(3)) * torch.logspace(-6, 1, 20000)
    assert wa.tensor_sparsity(w, w.bfloat16())[0].unchanged == w.numel()
    assert wa.tensor_sparsity(w.bfloat16(), w)[0].unchanged == w.numel()
    assert wa.tensor_sparsity(w, w.bfloat16(), rtol=2.0**-24)[0].unchanged < w.numel() / 100


def test_a_change_below_tolerance_counts_as_unchanged():
    w = torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0])
    new = w + torch.tensor([0.9e-3, -0.9e-3, 1e-3, 0.5e-5, 2e-5])
    # |Δ| ≤ max(1e-5, 1e-3·min(|w|, |w'|)): within for ±1 and the first 0; 1e-3 > 5e-4 for 0.5
    unchanged = wa.unchanged_mask(w, new, rtol=1e-3, atol=1e-5)
    assert unchanged.tolist() == [True, True, False, True, False]
    assert wa.tensor_sparsity(w, new, rtol=1e-3, atol=1e-5)[0] == wa.Sparsity(3, 5)
    # an fp32 change of a tenth of a bf16 ulp: a change in fp32, none once both are rounded to bf16
    w = torch.randn(1000, generator=gen(2)).to(torch.bfloat16).float()
    new = w + 0.1 * (torch.nextafter(w.bfloat16(), torch.full_like(w, math.inf).bfloat16()).float() - w)
    assert wa.tensor_sparsity(w, new)[0].unchanged == 0
    assert wa.tensor_sparsity(w, new, compare_dtype=torch.bfloat16)[0].unchanged == 1000


def test_layers_group_by_name_and_weight_by_parameter_count():
    per_tensor = {
        "model.layers.0.a": wa.Sparsity(1, 10),
        "model.layers.0.b": wa.Sparsity(90, 90),
        "model.layers.11.a": wa.Sparsity(0, 5),
        "model.embed_tokens.weight": wa.Sparsity(7, 7),
    }
    overall, layers = wa.group_by_layer(per_tensor)
    assert overall == wa.Sparsity(98, 112)
    assert layers == {0: wa.Sparsity(91, 100), 11: wa.Sparsity(0, 5)}


# --- spectral drift --------------------------------------------------------------------------


def planted_matrix(m=60, n=40, seed=3):
    """W = U diag(σ) Vᵀ with a well separated, geometrically decaying spectrum."""
    g = gen(seed)
    u = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=DT))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    s = 10 * 0.8 ** torch.arange(n, dtype=DT)
    return u, s, v


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_update_orthogonal_to_the_top_k_subspace_has_no_alignment_and_no_rotation(method):
    u, s, v = planted_matrix()
    k = 5
    w = u @ torch.diag(s) @ v.T
    # ΔW in the complement of both top-k subspaces, small enough to keep the top-k on top
    delta = 0.05 * u[:, k:] @ torch.randn(35, 35, generator=gen(4), dtype=DT) @ v[:, k:].T
    drift = wa.spectral_drift(w, w + delta, top_k=k, method=method)
    assert drift["method"] == method and drift["k"] == k
    assert drift["alignment"] < 1e-10
    assert drift["rotation_left_deg"] < 1e-4 and drift["rotation_right_deg"] < 1e-4
    assert drift["sigma_rel_change_max"] < 1e-10
    # the same ΔW rotated into the top-k subspace is fully aligned and moves σ_1..σ_k
    inside = 0.05 * u[:, :k] @ torch.randn(k, k, generator=gen(4), dtype=DT) @ v[:, :k].T
    drift = wa.spectral_drift(w, w + inside, top_k=k, method=method)
    assert drift["alignment"] == pytest.approx(1.0, abs=1e-10) and drift["sigma_rel_change_max"] > 1e-4


def test_rotation_of_a_planted_turn_is_its_angle():
    u, s, v = planted_matrix()
    w = u @ torch.diag(s) @ v.T
    angle = math.radians(3.0)  # turn left singular vector 1 towards 50 (outside the top-2)
    turn = torch.eye(60, dtype=DT)
    turn[0, 0] = turn[50, 50] = math.cos(angle)
    turn[50, 0], turn[0, 50] = math.sin(angle), -math.sin(angle)
    basis = torch.linalg.qr(torch.cat([u, torch.randn(60, 20, generator=gen(5), dtype=DT)], 1))[0]
    w_new = basis @ turn @ basis.T @ w
    drift = wa.spectral_drift(w, w_new, top_k=2, method="full")
    assert drift["rotation_left_deg"] == pytest.approx(3.0, rel=1e-9)
    assert drift["rotation_right_deg"] < 1e-10 and drift["sigma_rel_change_max"] < 1e-12


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_a_rank_r_planted_update_has_rank_r(rank):
    g = gen(6)
    w = torch.randn(50, 40, generator=g)
    delta = torch.randn(50, rank, generator=g) @ torch.randn(rank, 40, generator=g) / 5
    assert wa.numerical_rank(delta) == rank
    drift = wa.spectral_drift(w, w + delta, top_k=16)
    assert drift["delta_rank"] == rank and drift["delta_rank_fraction"] == rank / 40
    assert wa.spectral_drift(w, w.clone(), top_k=4)["delta_rank"] == 0


def test_svd_method_is_full_below_the_work_threshold():
    assert wa.svd_method((49152, 576)) == "full"
    assert wa.svd_method((151936, 1536)) == "randomized"


# --- RELEX -----------------------------------------------------------------------------------


def planted_trajectory(noise: float, steps=(10, 20, 30, 40, 50), shape=(30, 20), seed=7):
    g = gen(seed)
    theta0 = torch.randn(*shape, generator=g, dtype=DT)
    u = torch.randn(*shape, generator=g, dtype=DT)
    u /= u.norm()
    rate = 0.01
    checkpoints = [theta0 + rate * s * u + noise * torch.randn(*shape, generator=g, dtype=DT) for s in steps]
    return theta0, u, rate, checkpoints


@pytest.mark.parametrize("window", [None, 2, 3])
def test_relex_recovers_a_rank_1_linear_trajectory_and_extrapolates_it_exactly(window):
    steps = [10, 20, 30, 40, 50]
    theta0, u, rate, checkpoints = planted_trajectory(0.0, steps)
    fit = wa.relex_fit(theta0, checkpoints, steps, window)
    assert abs(fit.trajectory.direction @ u.flatten()) == pytest.approx(1.0, abs=1e-12)
    assert fit.trajectory.energy == pytest.approx(1.0, abs=1e-12) and fit.line.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.fit_steps == steps[-(window or 5) :]
    assert fit.trajectory.coefficients[-1] > 0  # u points where training went
    torch.testing.assert_close(fit.at(theta0, 400), theta0 + rate * 400 * u, rtol=0, atol=1e-12)


def test_relex_extrapolation_error_shrinks_with_the_noise():
    steps = [10, 20, 30, 40, 50]
    errors = []
    for noise in (1e-2, 1e-3, 1e-4, 1e-5):
        theta0, u, rate, checkpoints = planted_trajectory(noise, steps)
        fit = wa.relex_fit(theta0, checkpoints, steps)
        errors.append((fit.at(theta0, 200) - (theta0 + rate * 200 * u)).norm().item())
    assert all(later < earlier / 5 for earlier, later in itertools.pairwise(errors)), errors


def test_relex_of_an_unchanged_tensor_stays_at_the_base_and_bad_windows_are_refused():
    theta0 = torch.randn(4, 3, generator=gen(8))
    fit = wa.relex_fit(theta0, [theta0.clone(), theta0.clone()], [1, 2])
    assert fit.trajectory.energy is None and fit.line.r2 is None
    torch.testing.assert_close(fit.at(theta0, 10), theta0.double())
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        wa.relex_fit(theta0, [theta0], [1])
    with pytest.raises(ValueError, match="must increase"):
        wa.relex_fit(theta0, [theta0, theta0], [2, 2])


# --- divrl analyze on the tiny model ---------------------------------------------------------


def analyze(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    analyze_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyze", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """A base directory and a run directory with checkpoints at steps 10 and 20 along
    θ_s = θ₀ + (s/10)·Δ, Δ on a random 30% of the entries: (base dir, run dir, θ₀, Δ, unchanged
    fraction)."""
    model, tokenizer = tiny
    root = tmp_path_factory.mktemp("analyze")
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    g = gen(9)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}  # the tied head once
    delta = {}
    for name, p in theta0.items():
        mask = torch.rand(p.shape, generator=g) < 0.3
        delta[name] = mask * 1e-3 * (1 + torch.rand(p.shape, generator=g)) * torch.randn(p.shape, generator=g).sign()
    for step in (10, 20):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                p.copy_(theta0[name] + step / 10 * delta[name])
        target = root / "run" / "checkpoints" / f"step-{step}"
        moved.save_pretrained(target)
        tokenizer.save_pretrained(target)
        (target / "trainer_state.json").write_text(json.dumps({"step": step}))
        write_manifest(target)  # what makes it a complete checkpoint (divrl.checkpoint)
    unchanged = sum(int((d == 0).sum()) for d in delta.values()) / sum(d.numel() for d in delta.values())
    return root / "base", root / "run", theta0, delta, unchanged


def test_analyze_writes_the_report_and_a_loadable_extrapolated_model(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base, run, theta0, delta, unchanged = trained
    out = tmp_path / "out"
    assert analyze("--base", str(base), str(run), "--out", str(out), "--top-k", "4", "--extrapolate-to", "40") == 0
    printed = capsys.readouterr()
    assert "update sparsity:" in printed.out and "RELEX over steps [10, 20]" in printed.out
    assert "analyze: 100%" in printed.err  # the progress bar
    report = json.loads((out / "analysis.json").read_text())
    assert report["checkpoint_step"] == 20 and report["skipped_tied_tensors"] == []
    assert report["sparsity"]["overall"]["fraction_unchanged"] == pytest.approx(unchanged, abs=1e-12)
    assert set(report["sparsity"]["per_layer"]) == {"0", "1"}
    spectra = report["spectral"]["matrices"]
    assert {e["method"] for e in spectra.values()} == {"full"} and len(spectra) == 1 + 2 * 7
    relex = report["relex"]
    assert relex["steps"] == [10, 20] and relex["target_step"] == 40
    assert relex["energy_rank1_overall"] == pytest.approx(1.0, abs=1e-6)
    for name in ("sparsity.png", "spectrum.png", "relex.png"):
        assert (out / name).stat().st_size > 10_000
    extrapolated = out / "extrapolated-step-40"
    assert (extrapolated / "tokenizer_config.json").is_file() and not (extrapolated / "trainer_state.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(extrapolated)
    params = dict(loaded.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(params[name].detach(), theta0[name] + 4 * delta[name], rtol=0, atol=1e-6)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_analyze_one_checkpoint_without_a_step_needs_no_relex(trained, tmp_path):
    base, run, *_ = trained
    (tmp_path / "ckpt").symlink_to(run / "checkpoints" / "step-10")
    assert (
        analyze(
            "--base",
            str(base),
            str(tmp_path / "ckpt"),
            "--out",
            str(tmp_path / "out"),
            "--top-k",
            "2",
            "--compare-dtype",
            "bfloat16",
        )
        == 0
    )
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert "relex" not in report and not (tmp_path / "out" / "relex.png").exists()
    assert report["sparsity"]["per_tensor"]["model.norm.weight"]["rtol"] == 2.0**-8


def test_analyze_reads_the_steps_of_hf_trainer_checkpoints(trained, tmp_path, capsys):
    """An HF Trainer's checkpoint-N/ with "global_step" in its trainer_state.json, or by its name."""
    base, run, *_ = trained
    for step in (10, 20):
        shutil.copytree(run / "checkpoints" / f"step-{step}", tmp_path / "hf" / f"checkpoint-{step}")
    (tmp_path / "hf" / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (tmp_path / "hf" / "checkpoint-20" / "trainer_state.json").unlink()
    checkpoints = [str(tmp_path / "hf" / f"checkpoint-{step}") for step in (20, 10)]
    assert analyze("--base", str(base), *checkpoints, "--out", str(tmp_path / "out"), "--top-k", "2") == 0
    assert "RELEX over steps [10, 20]" in capsys.readouterr().out


def test_analyze_refuses_another_architecture_naming_the_tensor(trained, tiny, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from divrl.models import tiny_config

    base, *_ = trained
    config = tiny_config(len(tiny[1]))
    config.hidden_size = 32
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    assert analyze("--base", str(base), str(tmp_path / "other"), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "divrl: error:" in err and "tensor 'model.embed_tokens.weight' has shape (49152, 32)" in err
    assert not (tmp_path / "out").exists()


def test_analyze_bad_inputs_fail_with_a_clear_message(trained, tmp_path, capsys):
    base, run, *_ = trained
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "config.yaml").write_text("model: tiny\n")
    one = str(run / "checkpoints" / "step-10")
    (tmp_path / "unstepped").mkdir()
    for file in (run / "checkpoints" / "step-20").iterdir():
        if file.name != "trainer_state.json":
            (tmp_path / "unstepped" / file.name).symlink_to(file)
    cases = [
        ([str(empty_run)], f"run directory '{empty_run}' has no complete checkpoint"),
        ([one, "--extrapolate-to", "40"], "needs at least 2 checkpoints, got 1"),
        ([one, str(tmp_path / "unstepped")], f"cannot tell the training step of {tmp_path / 'unstepped'}"),
        ([one, "--window", "1"], "--window must be >= 2"),
        ([str(tmp_path / "missing")], f"'{tmp_path / 'missing'}' is not a directory"),
        ([str(tmp_path / "unstepped"), "--base", str(tmp_path)], f"'{tmp_path}' has no config.json"),
    ]
    for argv, message in cases:
        assert analyze("--base", str(base), *argv, "--out", str(tmp_path / "out")) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("divrl: error:") and message in err, (argv, err)
