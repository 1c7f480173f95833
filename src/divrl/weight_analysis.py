"""What RL did to the weights: update sparsity, spectral drift and RELEX rank-1 extrapolation, as
pure functions of base tensors θ₀ and checkpoint tensors θ (`divrl analyze` reads the files).

**Update sparsity** (Mukherjee et al. 2025, arXiv 2505.11711, "RL Finetunes Small Subnetworks in
Large Language Models": RL updates 5–30% of the parameters; the updates are nearly full rank):
the fraction of entries with |w' − w| ≤ max(atol, rtol·min(|w|, |w'|)). Defaults, from the
coarsest dtype involved (the stored ones, or `compare_dtype`): rtol = u = eps/2, the unit
roundoff, and atol = half the smallest subnormal, the largest |x| that rounds to 0. Then for
weights stored in the compared dtype "unchanged" is exactly "bitwise equal" (for bf16: equal in
bf16, |Δ| below half a bf16 ulp): distinct floats differ by ≥ 1 ulp > u·min(|w|, |w'|); and
rounding to the coarser dtype alone (an fp32 base against a bf16 checkpoint) is no change. With
|w_base| for the min, the one-ulp step down from a power of two (|Δ| = u·|w|) would be missed;
with isclose's atol + rtol·|w|, one-ulp steps at the top of a binade would. Confirmed in the
authors' code (github.com/SagnikMukherjee/sparsity_in_rl): check_sparsity.py loads both models
in bf16, takes Δ in bf16 and counts torch.isclose(Δ, 0, atol=1e-5) as unchanged — here
`compare_dtype=bfloat16, rtol=0, atol=1e-5`, up to the rounding of Δ to bf16; update_rank.py
uses torch.linalg.matrix_rank(Δ.float()), the rule of `numerical_rank`. The paper's text beyond
its abstract could not be read.

**Spectral drift** (Zhu et al. 2025, arXiv 2511.08567, "The Path Not Taken: RLVR Provably Learns
Off the Principals"; only the abstract could be read: RLVR shows "minimal spectral drift, reduced
principal-subspace rotation, and off-principal update alignment"). For W → W' = W + ΔW with top-k
SVDs U_k Σ_k V_kᵀ, U'_k Σ'_k V'_kᵀ: |σ'_i − σ_i|/σ_i (i ≤ k); the largest principal angle between
span U_k and span U'_k (and V_k, V'_k); the alignment ‖U_kᵀ ΔW V_k‖_F / ‖ΔW‖_F; the numerical
rank of ΔW. SVDs in float64, full up to m·n·min(m, n) = FULL_SVD_MAX_WORK, else randomized
(torch.svd_lowrank, q = k + max(k, 10), 6 power iterations, one sketch for W and W'). On
SmolLM2-135M's 49152×576 embedding (full: a few seconds) randomized top-16 singular values are
~2e-2 off and its drift metrics 10–35% off for barely less time, so all SmolLM2 matrices go full.

**RELEX** (Wei et al. 2026, arXiv 2605.21468, "You Only Need Minimal RLVR Training:
Extrapolating LLMs via Rank-1 Trajectories"), per tensor: d_s = θ_s − θ₀ as the rows of D; u =
the top right-singular vector of D (from the T×T Gram matrix D Dᵀ); a_s = d_s·u; a least-squares
line a(t) = α + βt; θ(T) = θ₀ + a(T)·u. Confirmed in the official code (github.com/weizhepei/RELEX,
scripts/svd_extrapolation.py, precompute_deltas.py): per parameter tensor (1-D norms included, a
tied lm_head skipped), u from the Gram matrix of the whole history, the line on its last W
coefficients (--window). It fits against the checkpoint index (checkpoints every step, or every
2nd rescaled by --target_step_scaling_factor); here against the steps themselves: the same for
evenly spaced checkpoints, and right for uneven ones.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

FULL_SVD_MAX_WORK = 2**35  # m·n·min(m, n) ≈ 3.4e10 flops; 49152×576 is 1.6e10
RANDOMIZED_POWER_ITERATIONS = 6
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def default_tolerance(*dtypes: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) = (eps/2, smallest subnormal/2) of the coarsest of `dtypes`: u = 2^-24 for
    float32, 2^-8 for bfloat16."""
    infos = [torch.finfo(d) for d in dtypes]
    return max(i.eps for i in infos) / 2, max(i.tiny * i.eps for i in infos) / 2


def layer_of(name: str) -> int | None:
    """The transformer layer i of a tensor named like `model.layers.<i>.…`, else None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Sparsity:
    """`unchanged` of `total` entries are unchanged; `fraction` is the update sparsity."""

    unchanged: int
    total: int

    @property
    def fraction(self) -> float:
        return self.unchanged / self.total if self.total else math.nan

    def __add__(self, other: Sparsity) -> Sparsity:
        return Sparsity(self.unchanged + other.unchanged, self.total + other.total)


def unchanged_mask(base: Tensor, new: Tensor, rtol: float, atol: float) -> Tensor:
    """|w' − w| ≤ max(atol, rtol·min(|w|, |w'|)), elementwise (in float32, or float64 for float64)."""
    dtype = torch.promote_types(torch.promote_types(base.dtype, new.dtype), torch.float32)
    w, w_new = base.to(dtype), new.to(dtype)
    return (w_new - w).abs() <= (rtol * torch.minimum(w.abs(), w_new.abs())).clamp(min=atol)


def tensor_sparsity(
    base: Tensor,
    new: Tensor,
    rtol: float | None = None,
    atol: float | None = None,
    compare_dtype: torch.dtype | None = None,
) -> tuple[Sparsity, float, float]:
    """(Sparsity, rtol, atol used) of base → new; with `compare_dtype` both are rounded to it first.
    rtol / atol None: `default_tolerance` of base's, new's (and compare_dtype's) dtypes."""
    if base.shape != new.shape:
        raise ValueError(f"shapes differ: {tuple(base.shape)} and {tuple(new.shape)}")
    dtypes = [base.dtype, new.dtype]
    if compare_dtype is not None:
        base, new = base.to(compare_dtype), new.to(compare_dtype)
        dtypes.append(compare_dtype)
    default_rtol, default_atol = default_tolerance(*dtypes)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    return Sparsity(int(unchanged_mask(base, new, rtol, atol).sum()), base.numel()), rtol, atol


def group_by_layer(per_tensor: Mapping[str, Sparsity]) -> tuple[Sparsity, dict[int, Sparsity]]:
    """(overall, per layer) sums of per-tensor counts: parameter-weighted, not a mean of tensor
    fractions (the paper's script averages the fractions); tensors outside layers count overall."""
    overall = Sparsity(0, 0)
    layers: dict[int, Sparsity] = {}
    for name, counts in per_tensor.items():
        overall += counts
        if (layer := layer_of(name)) is not None:
            layers[layer] = layers.get(layer, Sparsity(0, 0)) + counts
    return overall, dict(sorted(layers.items()))


def svd_method(shape: Sequence[int]) -> str:
    """'full' if m·n·min(m, n) ≤ FULL_SVD_MAX_WORK, else 'randomized'."""
    m, n = shape
    return "full" if m * n * min(m, n) <= FULL_SVD_MAX_WORK else "randomized"


def top_svd(matrix: Tensor, k: int, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """(U_k (m, k), σ_1..σ_k, V_k (n, k)) of a float matrix, by 'full' or 'randomized' SVD."""
    if method == "full":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].mT
    if method != "randomized":
        raise ValueError(f"unknown SVD method '{method}' (full, randomized)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same sketch for W and W'
        u, s, v = torch.svd_lowrank(matrix, q=min(k + max(k, 10), *matrix.shape), niter=RANDOMIZED_POWER_ITERATIONS)
    return u[:, :k], s[:k], v[:, :k]


def largest_principal_angle(basis: Tensor, other: Tensor) -> float:
    """Largest principal angle θ in degrees between the spans of two orthonormal bases (m, k):
    cos θ = the smallest singular value of basisᵀ·other, sin θ = the largest of the residual
    other − basis·basisᵀ·other; atan2 of the two keeps small angles exact, where arccos alone
    bottoms out near 1e-6 degrees in float64."""
    cross = basis.mT @ other
    cos = torch.linalg.svdvals(cross).min().item()
    sin = torch.linalg.matrix_norm(other - basis @ cross, ord=2).item()
    return math.degrees(math.atan2(sin, cos))


def numerical_rank(matrix: Tensor) -> int:
    """Number of singular values > σ_max·max(m, n)·eps(dtype): torch.linalg.matrix_rank's default."""
    s = torch.linalg.svdvals(matrix)
    return int((s > s[0] * max(matrix.shape) * torch.finfo(matrix.dtype).eps).sum()) if s[0] > 0 else 0


def spectral_drift(base: Tensor, new: Tensor, top_k: int, method: str = "auto") -> dict:
    """Spectral drift of a 2-D weight W → W' (see the module docstring), a JSON-able dict: method
    ('auto' picks by `svd_method`), k, sigma_rel_change (k values; NaN where σ_i = 0) and its max,
    rotation_left_deg / rotation_right_deg, alignment (None when ΔW = 0), delta_rank (in float32,
    as the sparsity paper) and delta_rank_fraction = delta_rank / min(m, n)."""
    if base.ndim != 2 or base.shape != new.shape:
        raise ValueError(f"need two matrices of one shape, got {tuple(base.shape)} and {tuple(new.shape)}")
    method = svd_method(base.shape) if method == "auto" else method
    k = min(top_k, *base.shape)
    w, w_new = base.double(), new.double()
    delta = w_new - w
    u, s, v = top_svd(w, k, method)
    u_new, s_new, v_new = top_svd(w_new, k, method)
    rel = torch.where(s > 0, (s_new - s).abs() / s, math.nan)
    defined = rel[~rel.isnan()]
    delta_norm = torch.linalg.matrix_norm(delta).item()
    alignment = (torch.linalg.matrix_norm(u.mT @ delta @ v).item() / delta_norm) if delta_norm > 0 else None
    rank = numerical_rank(new.float() - base.float())
    return {
        "method": method,
        "k": k,
        "sigma_rel_change": rel.tolist(),
        "sigma_rel_change_max": defined.max().item() if len(defined) else None,
        "rotation_left_deg": largest_principal_angle(u, u_new),
        "rotation_right_deg": largest_principal_angle(v, v_new),
        "alignment": alignment,
        "delta_rank": rank,
        "delta_rank_fraction": rank / min(base.shape),
    }


@dataclass(frozen=True)
class LinearFit:
    """a(t) = alpha + beta·t by least squares; r2 = 1 − SS_res/SS_tot (None when SS_tot = 0)."""

    alpha: float
    beta: float
    r2: float | None

    def __call__(self, t: float) -> float:
        return self.alpha + self.beta * t


def linear_fit(steps: Sequence[float], values: Tensor) -> LinearFit:
    """Least-squares line through (steps[i], values[i]); needs two distinct steps."""
    t = torch.as_tensor(steps, dtype=torch.float64)
    y = values.to(torch.float64)
    if len(t) != len(y):
        raise ValueError(f"{len(t)} steps but {len(y)} values")
    if len(set(t.tolist())) < 2:
        raise ValueError(f"a line needs at least 2 distinct steps, got {t.tolist()}")
    tc, yc = t - t.mean(), y - y.mean()
    beta = (tc @ yc / (tc @ tc)).item()
    alpha = (y.mean() - beta * t.mean()).item()
    ss_res = ((y - alpha - beta * t) ** 2).sum().item()
    ss_tot = (yc @ yc).item()
    return LinearFit(alpha, beta, 1.0 - ss_res / ss_tot if ss_tot > 0 else None)


@dataclass(frozen=True)
class Rank1Trajectory:
    """u (unit, flattened; zero when D = 0), a_s = d_s·u (sign: a_last ≥ 0), and ‖D‖_F²."""

    direction: Tensor
    coefficients: Tensor
    delta_energy: float

    @property
    def energy(self) -> float | None:
        """Fraction σ₁²/‖D‖_F² = ‖a‖²/‖D‖_F² of the deltas' energy along u (None when D = 0)."""
        if self.delta_energy == 0:
            return None
        return min(1.0, (self.coefficients @ self.coefficients).item() / self.delta_energy)


def rank1_trajectory(deltas: Tensor) -> Rank1Trajectory:
    """Top right-singular direction of D (T, d) from the eigenvectors of the Gram matrix D Dᵀ,
    as RELEX does (T ≪ d): u = Dᵀv/σ₁, a = D u = σ₁ v."""
    deltas = deltas.to(torch.float64)
    evals, evecs = torch.linalg.eigh(deltas @ deltas.mT)
    total = (deltas**2).sum().item()
    if evals[-1] <= 0 or total == 0:
        return Rank1Trajectory(
            torch.zeros(deltas.shape[1], dtype=torch.float64), torch.zeros(deltas.shape[0], dtype=torch.float64), total
        )
    sigma = evals[-1].sqrt()
    v = evecs[:, -1] * (1.0 if evecs[-1, -1] >= 0 else -1.0)
    return Rank1Trajectory(deltas.mT @ v / sigma, sigma * v, total)


@dataclass(frozen=True)
class RelexFit:
    """A tensor's rank-1 trajectory and the line a(t) fitted on the last `fit_steps`."""

    trajectory: Rank1Trajectory
    line: LinearFit
    fit_steps: list[int]

    def at(self, base: Tensor, step: float) -> Tensor:
        """θ(step) = θ₀ + a(step)·u, in float64."""
        return base.to(torch.float64) + self.line(step) * self.trajectory.direction.view(base.shape)


def relex_fit(base: Tensor, checkpoints: Sequence[Tensor], steps: Sequence[int], window: int | None = None) -> RelexFit:
    """RELEX for one tensor: u from all `checkpoints` (steps increasing), the line a(t) on the
    last `window` of them (default all)."""
    if len(checkpoints) != len(steps):
        raise ValueError(f"{len(checkpoints)} checkpoints but {len(steps)} steps")
    if len(checkpoints) < 2:
        raise ValueError(f"RELEX needs at least 2 checkpoints, got {len(checkpoints)}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"checkpoint steps must increase, got {list(steps)}")
    window = len(steps) if window is None else window
    if window < 2:
        raise ValueError(f"the RELEX line needs a window of at least 2 checkpoints, got {window}")
    flat = base.to(torch.float64).flatten()
    deltas = torch.stack([c.to(torch.float64).flatten() - flat for c in checkpoints])
    trajectory = rank1_trajectory(deltas)
    fit_steps = list(steps[-window:])
    return RelexFit(trajectory, linear_fit(fit_steps, trajectory.coefficients[-window:]), fit_steps)
