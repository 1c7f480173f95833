"""divrl.lab: closed forms C1–C6 against the exact numerical solver, brute force and Monte Carlo;
the `divrl lab` handler's table and PNG."""

import argparse
import itertools
import math

import pytest
import torch

from divrl import divergences, lab, lab_cli

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def tv(lp_a, lp_b):
    """Largest total variation over contexts."""
    return 0.5 * (lp_a.exp() - lp_b.exp()).abs().sum(-1).max().item()


@pytest.fixture
def problem():
    return lab.random_problem(6, (3,), seed=1)


@pytest.fixture
def off_support_problem():
    """q_2 = 0 and token 2 has the highest reward (RAPO's 'escape the support' setting)."""
    ref_logprobs, reward = lab.random_problem(6, (3,), seed=2)
    ref_logprobs = ref_logprobs.index_fill(-1, torch.tensor([2]), -math.inf).log_softmax(-1)
    return ref_logprobs, reward.index_fill(-1, torch.tensor([2]), 2.0)


@pytest.mark.parametrize("beta", [0.02, 0.1, 0.5, 3.0])
def test_reverse_kl_optimum_is_the_tilt(problem, beta):
    ref_logprobs, reward = problem
    numerical = lab.regularized_optimum(ref_logprobs, reward, beta, "reverse_kl")
    assert tv(numerical, lab.tilted(ref_logprobs, reward, beta)) < 1e-4


@pytest.mark.parametrize("beta", [0.02, 0.1, 0.5, 3.0])
def test_forward_kl_optimum_is_the_hyperbolic_tilt(problem, beta):
    ref_logprobs, reward = problem
    closed = lab.forward_kl_optimum(ref_logprobs, reward, beta)
    assert tv(lab.regularized_optimum(ref_logprobs, reward, beta, "forward_kl"), closed) < 1e-6
    # stationarity r_i + β q_i/p_i = λ: one multiplier per context
    multiplier = reward + beta * (ref_logprobs - closed).exp()
    assert torch.allclose(multiplier, multiplier[..., :1].expand_as(multiplier), atol=1e-9)


def test_forward_kl_optimum_large_beta_is_linear_tilt(problem):
    ref_logprobs, reward = problem
    beta, q = 1e3, ref_logprobs.exp()
    mean = (q * reward).sum(-1, keepdim=True)
    first_order = q * (1 + (reward - mean) / beta)
    closed = lab.forward_kl_optimum(ref_logprobs, reward, beta).exp()
    assert (closed - first_order).abs().max() < 10 / beta**2


@pytest.mark.parametrize("beta", [0.02, 0.1, 3.0])
def test_chi2_optimum_matches_solver(problem, beta):
    ref_logprobs, reward = problem
    closed = lab.chi2_optimum(ref_logprobs, reward, beta)
    assert tv(lab.regularized_optimum(ref_logprobs, reward, beta, "chi2"), closed) < 1e-6
    if beta < 0.1:  # small β zeroes the low-reward tokens exactly
        assert (closed == -math.inf).any()


def test_chi2_optimum_unclipped_is_linear_tilt(problem):
    ref_logprobs, reward = problem
    q = ref_logprobs.exp()
    mean = (q * reward).sum(-1, keepdim=True)
    beta = 0.5  # 2β = 1 ≥ r̄ − min r since rewards lie in [0, 1]: nothing is clipped
    linear = q * (1 + (reward - mean) / (2 * beta))
    assert torch.allclose(lab.chi2_optimum(ref_logprobs, reward, beta).exp(), linear, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_forward_kl_escapes_the_reference_support_reverse_kl_does_not(off_support_problem, beta):
    ref_logprobs, reward = off_support_problem
    forward = lab.forward_kl_optimum(ref_logprobs, reward, beta)
    assert (forward[..., 2].exp() > 0.5).all()
    assert tv(lab.regularized_optimum(ref_logprobs, reward, beta, "forward_kl"), forward) < 1e-6
    reverse = lab.tilted(ref_logprobs, reward, beta)
    assert (reverse[..., 2] == -math.inf).all()
    assert tv(lab.regularized_optimum(ref_logprobs, reward, beta, "reverse_kl"), reverse) < 1e-6
    chi2 = lab.chi2_optimum(ref_logprobs, reward, beta)
    assert (chi2[..., 2] == -math.inf).all()
    assert tv(lab.regularized_optimum(ref_logprobs, reward, beta, "chi2"), chi2) < 1e-6


def test_forward_kl_ignores_a_low_reward_off_support_token(off_support_problem):
    """With r_off below λ₀ no mass leaves supp(q), and the free solver agrees."""
    ref_logprobs, reward = off_support_problem
    reward = reward.index_fill(-1, torch.tensor([2]), -1.0)
    closed = lab.forward_kl_optimum(ref_logprobs, reward, 0.3)
    assert (closed[..., 2] == -math.inf).all()
    assert tv(lab.regularized_optimum(ref_logprobs, reward, 0.3, "forward_kl"), closed) < 1e-6


def test_bayesian_inference_view():
    """J(π) + β KL(π‖π*) = β log Z for every π (Korbak et al.), with π* the tilt."""
    ref_logprobs, reward = lab.random_problem(7, (4,), seed=3)
    beta = 0.3
    posterior = lab.tilted(ref_logprobs, reward, beta)
    log_z = lab.soft_value(ref_logprobs, reward, beta)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        policy = (3 * torch.randn(4, 7, generator=gen, dtype=DT)).log_softmax(-1)
        value = lab.regularized_value(policy, ref_logprobs, reward, beta)
        gap = beta * divergences.reverse_kl(policy, posterior)
        assert torch.allclose(value + gap, log_z, atol=1e-12)
    optimum = lab.regularized_value(posterior, ref_logprobs, reward, beta)
    assert torch.allclose(optimum, log_z, atol=1e-12)


def _brute_force_best_of_n(q, reward, n):
    """Enumerate all Vⁿ draws; the winner is uniform among the draws of highest reward."""
    law = torch.zeros_like(q)
    for draw in itertools.product(range(len(q)), repeat=n):
        weight = math.prod(q[i].item() for i in draw)
        best = max(reward[i].item() for i in draw)
        winners = [i for i in draw if reward[i].item() == best]
        for i in winners:
            law[i] += weight / len(winners)
    return law


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_best_of_n_matches_enumeration_with_ties(n):
    q = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=DT)
    reward = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0], dtype=DT)  # two tied pairs
    expected = _brute_force_best_of_n(q, reward, n)
    assert torch.allclose(lab.best_of_n(q, reward, n), expected, atol=1e-14)


def test_best_of_n_kl_on_a_fine_uniform_support():
    """Distinct rewards on M equiprobable tokens are the continuous law cut into M cells, and the
    exact discrete KL is a coarse-graining of the continuous one (density g(u) = n u^{n−1} on
    u = F(r) ∈ [0, 1]), so it is below log n − (n−1)/n by ≈ Σ_cells h³ g′²/(24 g) (second-order
    Taylor of the convex g log g over a cell of width h = 1/M)
    = n(n−1)²/24 · ∫_{1/M}^1 u^{n−3} du / M²; asserted within a factor 2."""
    M = 2000
    q = torch.full((M,), 1.0 / M, dtype=DT)
    reward = torch.randperm(M, generator=torch.Generator().manual_seed(0)).to(DT)
    for n in (2, 4, 8, 16):
        kl = divergences.reverse_kl(lab.best_of_n(q, reward, n).log(), q.log()).item()
        integral = math.log(M) if n == 2 else (1 - M ** (2.0 - n)) / (n - 2)
        predicted_gap = n * (n - 1) ** 2 / 24 * integral / M**2
        gap = lab.best_of_n_kl(n) - kl
        assert 0.5 * predicted_gap < gap < 2 * predicted_gap


@pytest.mark.parametrize("seed", range(3))
def test_best_of_n_kl_is_an_upper_bound_on_coarse_supports(seed):
    ref_logprobs, reward = lab.random_problem(5, seed=seed)
    tied = reward.clone()
    tied[1] = tied[0]
    for rewards in (reward, tied):
        for n in range(1, 33):
            law = lab.best_of_n(ref_logprobs.exp(), rewards, n)
            assert law.sum().item() == pytest.approx(1.0, abs=1e-12)
            kl = divergences.reverse_kl(law.log(), ref_logprobs).item()
            assert kl <= lab.best_of_n_kl(n) + 1e-12


def test_kl_rl_is_the_reward_frontier():
    """At the KL of best-of-n, the tilt of that KL (found by bisection on β) earns at least as much
    reward: it maximizes E r − β KL, so no policy with KL ≤ its KL earns more."""
    ref_logprobs, reward = lab.random_problem(8, seed=4)
    for n in (2, 4, 16):
        best = lab.best_of_n(ref_logprobs.exp(), reward, n).log()
        kl = divergences.reverse_kl(best, ref_logprobs).item()
        frontier, beta = lab.tilted_at_kl(ref_logprobs, reward, kl)
        frontier_kl = divergences.reverse_kl(frontier, ref_logprobs).item()
        assert frontier_kl == pytest.approx(kl, rel=1e-9)
        assert torch.allclose(frontier, lab.tilted(ref_logprobs, reward, beta))
        assert lab.expected_reward(frontier, reward) >= lab.expected_reward(best, reward)


def test_a_constant_reward_tilts_nothing_and_nan_is_not_hidden():
    """On supp(q) a constant reward (q = 0 entries may differ) makes every tilt the reference: β = ∞."""
    ref_logprobs = torch.tensor([[0.2, 0.3, 0.5, 0.0], [0.2, 0.3, 0.5, 0.0]], dtype=DT).log()
    reward = torch.tensor([[1.0, 1.0, 1.0, 5.0], [0.0, 1.0, 2.0, 0.0]], dtype=DT)
    policy, beta = lab.tilted_at_kl(ref_logprobs, reward, 0.1)
    assert torch.allclose(policy[0], ref_logprobs[0]) and beta[0].item() == math.inf
    assert divergences.reverse_kl(policy[1], ref_logprobs[1]).item() == pytest.approx(0.1, rel=1e-9)
    assert lab.expected_reward(policy, reward)[0].item() == pytest.approx(1.0)
    assert math.isnan(lab.expected_reward(torch.tensor([math.nan, 0.0], dtype=DT), torch.ones(2, dtype=DT)).item())


@pytest.fixture
def estimator_problem():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5, generator=gen, dtype=DT)
    ref_logprobs = torch.randn(5, generator=gen, dtype=DT).log_softmax(-1)
    return logits, ref_logprobs, gen


@pytest.mark.parametrize(
    "estimator, exact",
    [("k1", None), ("k2", "reverse_kl"), ("k3", "forward_kl"), ("k3_st", "reverse_kl")],
)
def test_sampled_estimator_gradients(estimator_problem, estimator, exact):
    """C6: as a loss on y ~ p, k1 → 0, k2 → ∇KL(p‖q), k3 → ∇KL(q‖p) (the forward direction),
    the straight-through k3 → ∇KL(p‖q); within 4 standard errors that are small against ∇KL."""
    logits, ref_logprobs, gen = estimator_problem
    sampled = divergences.get_estimator(estimator)
    mean, stderr = lab.sampled_gradient(logits, ref_logprobs, sampled, 100_000, gen)
    scale = lab.divergence_gradient(logits, ref_logprobs, "reverse_kl").abs().max()
    target = 0 if exact is None else lab.divergence_gradient(logits, ref_logprobs, exact)
    assert ((mean - target).abs() < 4 * stderr).all()
    assert stderr.max() < 0.05 * scale


def test_k3_gradient_is_not_the_reverse_kl_gradient(estimator_problem):
    logits, ref_logprobs, gen = estimator_problem
    mean, stderr = lab.sampled_gradient(logits, ref_logprobs, divergences.k3, 100_000, gen)
    reverse = lab.divergence_gradient(logits, ref_logprobs, "reverse_kl")
    assert ((mean - reverse).abs() > 10 * stderr).any()


def test_soft_bellman_equals_the_sequence_level_tilt():
    """Token-level soft Bellman backup reproduces C1 applied to whole sequences (V=3, T=3)."""
    gen = torch.Generator().manual_seed(6)
    vocab, length, beta = 3, 3, 0.4
    ref = [torch.randn((vocab,) * (t + 1), generator=gen, dtype=DT).log_softmax(-1) for t in range(length)]
    reward = torch.rand((vocab,) * length, generator=gen, dtype=DT)
    ref_joint = lab.joint_logprobs(ref)
    assert ref_joint.logsumexp(tuple(range(length))).item() == pytest.approx(0.0, abs=1e-12)
    policy = lab.soft_bellman(ref, reward, beta)
    flat_tilt = lab.tilted(ref_joint.flatten(), reward.flatten(), beta)
    assert torch.allclose(lab.joint_logprobs(policy).flatten(), flat_tilt, atol=1e-12)


def test_adam_solver_also_reaches_the_tilt(problem):
    ref_logprobs, reward = problem
    numerical = lab.regularized_optimum(ref_logprobs, reward, 0.5, "reverse_kl", method="adam", steps=1500)
    assert tv(numerical, lab.tilted(ref_logprobs, reward, 0.5)) < 1e-4


def _lab_args(argv):
    parser = argparse.ArgumentParser()
    lab_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["lab", *argv])


def _table(output):
    """Rows of the fixed-point table: (beta, divergence) → (E[r], KL)."""
    rows = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[2] in ("closed-form", "lbfgs"):
            rows[float(fields[0]), fields[1]] = (float(fields[3]), float(fields[4]))
    return rows


def test_lab_command_random_problem(tmp_path, capsys):
    out = tmp_path / "frontier.png"
    names = ["reverse_kl", "forward_kl", "chi2", "hellinger"]
    args = _lab_args(
        [
            "--vocab",
            "6",
            "--seed",
            "3",
            "--betas",
            "0.1",
            "1",
            "--max-n",
            "8",
            "--divergences",
            *names,
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    rows = _table(capsys.readouterr().out)
    assert set(rows) == {(beta, name) for beta in (0.1, 1.0) for name in names}
    ref_logprobs, reward = lab.random_problem(6, seed=3)
    for beta in (0.1, 1.0):
        for name, solve in lab.CLOSED_FORMS.items():
            policy = solve(ref_logprobs, reward, beta)
            value = lab.expected_reward(policy, reward).item()
            kl = divergences.reverse_kl(policy, ref_logprobs).item()
            assert rows[beta, name] == pytest.approx((value, kl), abs=1e-4)
        # the reverse-KL fixed point has the highest E[r] − β KL(p‖ref) of all rows (4 decimals)
        objective = {name: rows[beta, name][0] - beta * rows[beta, name][1] for name in names}
        assert max(objective.values()) <= objective["reverse_kl"] + 1e-3
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out).shape
    assert width > 400 and height > 300


def test_lab_command_given_problem_off_support(tmp_path, capsys):
    out = tmp_path / "given.png"
    args = _lab_args(
        [
            "--rewards",
            "0",
            "0.3",
            "0.6",
            "1",
            "2",
            "--ref",
            "4",
            "3",
            "2",
            "1",
            "0",
            "--betas",
            "0.2",
            "--divergences",
            "reverse_kl",
            "forward_kl",
            "--max-n",
            "4",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    rows = _table(capsys.readouterr().out)
    assert rows[0.2, "forward_kl"][1] == math.inf  # mass on the off-support token: KL(p‖ref) = ∞
    assert math.isfinite(rows[0.2, "reverse_kl"][1])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lab_command_rejects_bad_input(tmp_path, capsys):
    args = _lab_args(["--rewards", "0", "1", "--ref", "1", "1", "1", "--out", str(tmp_path / "x.png")])
    assert args.func(args) == 2
    assert "--ref has 3 values" in capsys.readouterr().err
    args = _lab_args(["--divergences", "nope", "--out", str(tmp_path / "x.png")])
    assert args.func(args) == 2
    assert not (tmp_path / "x.png").exists()
