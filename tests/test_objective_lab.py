"""The objective the trainer runs (`divrl.objectives.objective_loss`), driven on tabular bandits
by `divrl.lab.objective_fixed_point`, converges to the closed-form optima (methods.md C1, C3, C4,
C7) and, without a policy gradient, to its target."""

import pytest
import torch

from divrl import lab, targets
from divrl.spec import parse_objective

BETA = 0.5


@pytest.fixture(scope="module")
def problem():
    ref, reward = lab.random_problem(5, (2,), seed=0)
    teacher = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    return ref, reward, teacher


def _fixed_point(terms, policy_gradient, reward, models, steps=600):
    spec = parse_objective(
        {"policy_gradient": policy_gradient, "advantage": "mean_only", "teacher": "given", "terms": terms}
    )
    return lab.objective_fixed_point(spec, reward, models, steps=steps, lr=3.0)


@pytest.mark.parametrize(
    "divergence,closed_form",
    [("reverse_kl", lab.tilted), ("forward_kl", lab.forward_kl_optimum), ("chi2", lab.chi2_optimum)],
)
def test_policy_gradient_plus_divergence_reaches_its_closed_form(problem, divergence, closed_form):
    ref, reward, _ = problem
    got = _fixed_point(
        [{"divergence": divergence, "target": "reference", "coef": BETA}], True, reward, {"reference": ref}
    )
    expected = closed_form(ref, reward, BETA)
    torch.testing.assert_close(got.exp(), expected.exp(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_pure_distillation_reaches_the_teacher(problem, divergence):
    ref, reward, teacher = problem
    got = _fixed_point(
        [{"divergence": divergence, "target": "teacher"}], False, reward, {"reference": ref, "teacher": teacher}
    )
    torch.testing.assert_close(got.exp(), teacher.exp(), atol=1e-6, rtol=0)


def test_distillation_toward_the_extrapolated_teacher_reaches_it(problem):
    ref, reward, teacher = problem
    target = {"extrapolate": {"ref": "reference", "teacher": "teacher", "lam": 1.5}}
    got = _fixed_point(
        [{"divergence": "reverse_kl", "target": target}], False, reward, {"reference": ref, "teacher": teacher}
    )
    expected = targets.extrapolate(ref, teacher, 1.5)
    torch.testing.assert_close(got.exp(), expected.exp(), atol=1e-6, rtol=0)
    # C7: the same distribution is the reverse-KL tilt of the reference by log(teacher/ref), β = 1/λ
    torch.testing.assert_close(expected, lab.tilted(ref, teacher - ref, 1 / 1.5))
