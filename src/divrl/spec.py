"""The objective as data: a policy-gradient term and divergence terms, parsed and validated.

A training objective (design.md §1) is

    L = Σ_t a_t · ( w_t m_t ℓ_PG(t)  +  Σ_k c_k · w_kt m_kt · D_k(πθ(·|s_t), q_k(·|s_t)) )

with a_t the aggregation weight of token t (`loss_aggregation`). This module turns the config
keys that choose it into an immutable `ObjectiveSpec`, checking every name and parameter before
any model loads; every error names its key path (``terms[1].divergence: unknown 'revers_kl'; did
you mean 'reverse_kl'?``). `divrl.objectives` computes the loss from a spec.

A **target** q is a model — ``reference`` (frozen initial weights), ``teacher``, ``old`` (the
behaviour policy that sampled the batch), ``self`` (the current policy, detached) — or a function
of `divrl.targets` applied to targets, written ``{function: {argument: value, ...}}``, e.g.
``{extrapolate: {ref: reference, teacher: teacher, lam: 1.25}}`` or ``{tilt: {base: old, beta:
0.1}}`` (tilt's advantage is supplied: the completion's advantage on the sampled token, 0 on the
other tokens; so is reward_power's reward: the completion's).

Estimators and placements (C6 of methods.md; y ~ πθ, r = log q(y) − log πθ(y)):

===========  =========  =====================================  ===========================
estimator    placement  gradient of the term                   here
===========  =========  =====================================  ===========================
exact        loss       ∇D exactly, any divergence             allowed
k2           loss       ∇KL(p‖q)                               allowed (reverse_kl only)
k1_st, k3_st loss       ∇KL(p‖q), value of k1 / k3             allowed (reverse_kl only)
k3           loss       ∇KL(q‖p): the *forward* KL's gradient  allowed with a warning
k1           loss       0 in expectation (noise only)          refused
k1           reward     ∇KL(p‖q) by the score function         allowed (reverse_kl only)
k1           token_rew. −c·k1(y_t) in token t's advantage only    allowed (reverse_kl only)
k2, k3, st   reward     not ∇KL (score function of ½r², …)     refused
exact        reward     a loss term, not a return              refused
sequence     loss       ∇χ²(πθ‖q) over whole completions       allowed (chi2 only)
stored       loss       ∇D(πθ‖q) on stored samples of q        allowed (pointwise D, q = reference)
===========  =========  =====================================  ===========================

The per-token sampled estimators estimate KL(πθ‖q) from the sampled token only, so they are
defined for ``reverse_kl`` alone. ``sequence`` estimates Pearson χ² between the completion
distributions, E_πθ[w] − 1 with w = Π_t πθ(y_t|s_t)/q(y_t|s_t) (ORPO's occupancy-measure χ²,
Laidlaw et al.). ``stored`` estimates any pointwise D = Σ_v q_v f(p_v/q_v) from responses sampled
once from the initial policy q and stored with their log-probs (DPH-RL): f(u) − f′(1)(u − 1) at
u = πθ(y)/q(y), unbiased in value and gradient (`divrl.objectives.stored_estimate`). In the loss with ``inner_iterations > 1`` they are multiplied by the
detached ratio πθ(y)/πold(y), which keeps the gradients above for samples of πold.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from divrl import divergences, surrogates, targets, weights

TARGET_MODELS = ("reference", "teacher", "old", "self")
# Distribution-valued arguments of each target function; `tilt`'s advantage is supplied.
TARGET_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "tilt": ("base",),
    "extrapolate": ("ref", "teacher"),
    "mix": ("a", "b"),
    "filter": ("p",),
    "temperature": ("p",),
    "reward_power": ("p",),
    "uniform": ("p",),
    "sampled_token": (),
}
SUPPLIED_ARGUMENTS = {"tilt": ("advantage",), "reward_power": ("reward",), "sampled_token": ("token",)}
ESTIMATORS = ("exact", "k1", "k2", "k3", "k1_st", "k3_st", "sequence", "stored")
PLACEMENTS = ("loss", "reward", "token_reward")
ADVANTAGES = ("group_norm", "mean_only", "signed", "none")
ADVANTAGE_STDS = ("sample", "population")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
TERM_KEYS = (
    "divergence",
    "params",
    "target",
    "coef",
    "estimator",
    "placement",
    "mask",
    "weight",
    "mask_mean",
    "prompt_positions",
    "anneal",
)


class SpecError(ValueError):
    """An objective that cannot run; the message starts with the key path."""


def _unknown(path: str, kind: str, name: Any, valid) -> SpecError:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return SpecError(f"{path}: unknown {kind} {name!r}{hint} Valid: {', '.join(valid)}")


def _number(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SpecError(f"{path}: must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise SpecError(f"{path}: must be a number, got {value!r}") from None


@dataclass(frozen=True)
class Target:
    """A target distribution: a model (``op`` in TARGET_MODELS, no args) or a `divrl.targets`
    function applied to targets and numbers (``args``: (name, Target | number) pairs)."""

    op: str
    args: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """For metrics: the model, or the outermost function's name."""
        return self.op

    @property
    def is_model(self) -> bool:
        return self.op in TARGET_MODELS

    def models(self) -> frozenset[str]:
        """The models whose distributions the target is built from."""
        if self.is_model:
            return frozenset({self.op})
        return frozenset().union(*(v.models() for _, v in self.args if isinstance(v, Target)))

    def evaluate(
        self,
        logprobs: Mapping[str, torch.Tensor],
        advantage: torch.Tensor | None = None,
        reward: torch.Tensor | None = None,
        token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log q from the models' normalized log-probs (…, V); ``advantage`` (…, V) feeds `tilt`,
        ``reward`` (…, 1) `reward_power`, ``token`` (…, V) bool `sampled_token`."""
        if self.is_model:
            return logprobs[self.op]
        kwargs = {
            k: v.evaluate(logprobs, advantage, reward, token) if isinstance(v, Target) else v for k, v in self.args
        }
        supplied = {"advantage": advantage, "reward": reward, "token": token}
        kwargs.update((name, supplied[name]) for name in SUPPLIED_ARGUMENTS.get(self.op, ()))
        return getattr(targets, self.op)(**kwargs)

    @property
    def supplied(self) -> frozenset[str]:
        """The supplied arguments (advantage, reward, token) some function of the target reads."""
        return frozenset(SUPPLIED_ARGUMENTS.get(self.op, ())).union(
            *(v.supplied for _, v in self.args if isinstance(v, Target))
        )

    @property
    def is_normalized(self) -> bool:
        """False when some function is asked for unnormalized log-values (extrapolate's
        ``normalized: false``)."""
        return all(v is not False for k, v in self.args if k == "normalized") and all(
            v.is_normalized for _, v in self.args if isinstance(v, Target)
        )

    def describe(self) -> str:
        if self.is_model:
            return self.op
        inner = ", ".join(f"{k}={v.describe() if isinstance(v, Target) else v}" for k, v in self.args)
        return f"{self.op}({inner})"


def parse_target(value: Any, path: str) -> Target:
    """A Target from its config form (a model name, or ``{function: {arg: value}}``)."""
    if isinstance(value, str):
        if value not in TARGET_MODELS:
            raise _unknown(path, "target", value, TARGET_MODELS + tuple(TARGET_FUNCTIONS))
        return Target(value)
    if not isinstance(value, Mapping) or len(value) != 1:
        raise SpecError(
            f"{path}: a target is a model name ({', '.join(TARGET_MODELS)}) or one "
            f"function applied to targets, e.g. {{filter: {{p: self, min_p: 0.02}}}}; "
            f"got {value!r}"
        )
    ((op, args),) = value.items()
    if op not in TARGET_FUNCTIONS:
        raise _unknown(path, "target function", op, TARGET_FUNCTIONS)
    if not isinstance(args, Mapping):
        raise SpecError(f"{path}.{op}: arguments must be a mapping, got {args!r}")
    signature = inspect.signature(getattr(targets, op))
    accepted = [p for p in signature.parameters if p not in SUPPLIED_ARGUMENTS.get(op, ())]
    for key in args:
        if key not in accepted:
            raise _unknown(f"{path}.{op}", "argument", key, accepted)
    parsed: list[tuple[str, Target | bool | float]] = []
    for key in accepted:
        where = f"{path}.{op}.{key}"
        required = signature.parameters[key].default is inspect.Parameter.empty
        if key not in args:
            if required:
                raise SpecError(f"{where}: missing (arguments: {', '.join(accepted)})")
            continue
        if key in TARGET_FUNCTIONS[op]:
            parsed.append((key, parse_target(args[key], where)))
        elif isinstance(args[key], bool):
            parsed.append((key, args[key]))
        else:
            parsed.append((key, _number(where, args[key])))
    target = Target(op, tuple(parsed))
    _try_on_a_toy(
        lambda: target.evaluate(_TOY_LOGPROBS, torch.zeros(3), torch.ones(1), torch.tensor([True, False, False])),
        f"{path}.{op}",
    )
    return _endpoint(target)


# At these parameter values a function returns one of its arguments itself (see divrl.targets).
_ENDPOINTS = {"extrapolate": ("lam", {0.0: "ref", 1.0: "teacher"}), "mix": ("alpha", {0.0: "a", 1.0: "b"})}


def _endpoint(target: Target) -> Target:
    """The argument a function returns unchanged at an endpoint (extrapolate at λ = 0 or 1, mix at
    α = 0 or 1), so e.g. G-OPD at λ = 1 is OPD to the teacher exactly, and loads no reference."""
    if target.op not in _ENDPOINTS:
        return target
    key, returns = _ENDPOINTS[target.op]
    args = dict(target.args)
    return args[returns[args[key]]] if args.get(key) in returns else target


_TOY_LOGPROBS = {name: torch.tensor([0.5, 0.3, 0.2]).log() for name in TARGET_MODELS}


def _refuse_nonfinite(path: str, params: Mapping[str, Any]) -> None:
    """SpecError naming a parameter that is .inf or .nan (every number must be finite)."""
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{path}.{key}: must be a finite number, got {value!r}")


def _try_on_a_toy(fn, path: str) -> None:
    """Run fn on a 3-token toy so a function's own parameter checks speak before any model loads."""
    try:
        fn()
    except (ValueError, TypeError) as err:
        raise SpecError(f"{path}: {err}") from None


def named_choices(
    value: Any, path: str, what: str, valid: list[str] | None = None, single: bool = False
) -> list[tuple[str, dict]]:
    """A config value that names registered things — ``name`` or ``{name: {params}, ...}`` — as
    [(name, params)]; `single` allows one name only; names outside `valid` (when given) are refused
    with a suggestion. Errors start with `path` (when not empty)."""
    where = f"{path}: " if path else ""
    if isinstance(value, str):
        value = {value: {}}
    if not isinstance(value, Mapping) or (single and len(value) != 1):
        shape = "one name" if single else "a name"
        raise SpecError(f"{where}must be {shape} of {what} or {{name: {{params}}}}, got {value!r}")
    choices = []
    for name, params in value.items():
        if not isinstance(name, str):
            raise SpecError(f"{where}a name of {what} must be a string, got {name!r}")
        if valid is not None and name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SpecError(f"{where}unknown {what} {name!r}{hint} Valid: {', '.join(valid)}")
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise SpecError(f"{path}.{name}: parameters must be a mapping, got {params!r}")
        choices.append((name, dict(params)))
    return choices


def _named_weights(value: Any, path: str) -> tuple[tuple[str, dict], ...]:
    """`mask`/`weight`: a registered name, or {name: {params}, ...} (their product)."""
    if value is None:
        return ()
    choices = named_choices(value, path, "divrl.weights")
    for name, params in choices:
        try:
            weights.check(name, params)
        except ValueError as err:
            raise SpecError(f"{path}.{name}: {err}") from None
    return tuple(choices)


def _refuse_weights(path: str, choices: tuple, refused: frozenset[str], why: str) -> None:
    """SpecError naming the first of `choices` among `refused` (a mask or weight whose input the
    objective does not have: `why`)."""
    for name, _ in choices:
        if name in refused:
            raise SpecError(f"{path}.{name}: {why}")


def _mask_mean(value: Any, path: str, mask: tuple) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{path}: must be true or false, got {value!r}")
    if value and not mask:
        raise SpecError(f"{path}: averages over the tokens a mask keeps; set a mask first")
    return value


@dataclass(frozen=True)
class TermSpec:
    """c · D(πθ, q) per token, exact or sampled, in the loss or subtracted from the return."""

    divergence: str
    params: tuple[tuple[str, Any], ...]
    target: Target
    coef: float
    estimator: str = "exact"
    placement: str = "loss"
    mask: tuple[tuple[str, dict], ...] = ()
    weight: tuple[tuple[str, dict], ...] = ()
    mask_mean: bool = False  # average over the tokens the mask keeps, not over all tokens
    prompt_positions: bool = False  # also at the positions that predict the prompt's tokens
    anneal: tuple[float, int, int] | None = None  # (to, steps, start): coef → `to` linearly

    def coef_at(self, step: int) -> float:
        """c_t: `coef` up to anneal's `start`, then linearly to its `to` over `steps` steps, e.g.
        KDRL's c_t = max(5e-3 − 5e-5·t, 1e-3) is coef 5e-3, anneal {to: 1e-3, steps: 80}; a stage
        switch at step k is {to: c, steps: 1, start: k}."""
        if self.anneal is None:
            return self.coef
        to, steps, start = self.anneal
        return self.coef + (to - self.coef) * min(max(step - start, 0), steps) / steps

    @property
    def name(self) -> str:
        """Metric name: ``<divergence>_to_<target>`` (a composed target by its function), with
        ``_sequence`` appended for the sequence-level estimator."""
        suffix = {"sequence": "_sequence", "stored": "_stored"}.get(self.estimator, "")
        return f"{self.divergence}_to_{self.target.name}{suffix}"

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


def parse_term(value: Any, path: str, teacher: bool) -> TermSpec:
    if not isinstance(value, Mapping):
        raise SpecError(f"{path}: a term is a mapping with keys {', '.join(TERM_KEYS)}; got {value!r}")
    for key in value:
        if key not in TERM_KEYS:
            raise _unknown(path, "key", key, TERM_KEYS)
    for key in ("divergence", "target"):
        if key not in value:
            raise SpecError(f"{path}.{key}: missing")
    name = value["divergence"]
    if not isinstance(name, str) or name not in divergences.names():
        raise _unknown(f"{path}.divergence", "divergence", name, divergences.names())
    params = value.get("params") or {}
    if not isinstance(params, Mapping):
        raise SpecError(f"{path}.params: must be a mapping, got {params!r}")
    _refuse_nonfinite(f"{path}.params", params)
    if "cost" in params and not (params["cost"] == "embedding" or isinstance(params["cost"], torch.Tensor)):
        raise SpecError(
            f"{path}.params.cost: from a config the only ground cost is 'embedding' "
            f"(cosine distance of the policy's output embeddings; the Python API also "
            f"takes a (V, V) tensor), got {params['cost']!r}"
        )
    toy_params = {**params, "cost": torch.ones(3, 3) - torch.eye(3)} if "cost" in params else params
    _try_on_a_toy(
        lambda: divergences.get(name)(_TOY_LOGPROBS["self"], _TOY_LOGPROBS["reference"], **toy_params), f"{path}.params"
    )
    target = parse_target(value["target"], f"{path}.target")
    if "teacher" in target.models() and not teacher:
        raise SpecError(
            f"{path}.target: {target.describe()} needs a teacher model; set 'teacher' "
            f"(default, tiny, a local model directory or a hub id)"
        )
    coef = _number(f"{path}.coef", value.get("coef", 1.0))
    if not coef >= 0 or math.isinf(coef):
        raise SpecError(f"{path}.coef: must be a finite number ≥ 0, got {value.get('coef')!r}")
    estimator = value.get("estimator", "exact")
    if estimator not in ESTIMATORS:
        raise _unknown(f"{path}.estimator", "estimator", estimator, ESTIMATORS)
    placement = value.get("placement", "loss")
    if placement not in PLACEMENTS:
        raise _unknown(f"{path}.placement", "placement", placement, PLACEMENTS)
    _check_estimator(path, name, estimator, placement)
    if not target.is_normalized and not (estimator == "k1" and placement in ("reward", "token_reward")):
        raise SpecError(
            f"{path}.target: an unnormalized target (normalized: false) is only a log-ratio "
            f"reward, for estimator k1 with placement reward or token_reward; got "
            f"{estimator} in the {placement}"
        )
    if estimator == "stored" and target.op != "reference":
        raise SpecError(
            f"{path}.target: the stored estimator reads responses sampled once from the "
            f"initial policy with their log-probs, so its target is reference, got "
            f"{target.describe()}"
        )
    for key in ("mask", "weight", "mask_mean"):
        if placement != "loss" and value.get(key):
            raise SpecError(
                f"{path}.{key}: masks and weights scale a loss term per token; a term with "
                f"placement {placement} enters the return unscaled, so {key} would change only its "
                f"metric; drop it or use placement: loss"
            )
    mask = _named_weights(value.get("mask"), f"{path}.mask")
    weight = _named_weights(value.get("weight"), f"{path}.weight")
    for key, choices in (("mask", mask), ("weight", weight)):
        if estimator in ("exact", "stored"):
            _refuse_weights(
                f"{path}.{key}",
                choices,
                weights.READ_TARGET,
                f"reads the target's log-prob at the sampled token, which only a sampled "
                f"estimator's term has, not estimator {estimator}",
            )
        if estimator == "stored":
            _refuse_weights(
                f"{path}.{key}",
                choices,
                weights.READ_BATCH | weights.READ_REFERENCE,
                "reads the online batch's groups, pass rate, diversity or the reference model, "
                "which the stored responses do not have",
            )
    prompt_positions = value.get("prompt_positions", False)
    if not isinstance(prompt_positions, bool):
        raise SpecError(f"{path}.prompt_positions: must be true or false, got {prompt_positions!r}")
    if prompt_positions and not (estimator == "exact" and target.op in ("reference", "teacher")):
        raise SpecError(
            f"{path}.prompt_positions: the prompt's positions have no sampled token of the "
            f"policy, so they take an exact divergence to a model (reference or teacher), got "
            f"estimator {estimator} and target {target.describe()}"
        )
    if prompt_positions and not divergences.is_pointwise(name):
        raise SpecError(
            f"{path}.prompt_positions: takes a divergence that is a sum over the vocabulary of a "
            f"pointwise term, got {name}"
        )
    return TermSpec(
        name,
        tuple(params.items()),
        target,
        coef,
        estimator,
        placement,
        mask,
        weight,
        _mask_mean(value.get("mask_mean", False), f"{path}.mask_mean", mask),
        prompt_positions,
        _anneal(value.get("anneal"), f"{path}.anneal"),
    )


def _anneal(value: Any, path: str) -> tuple[float, int, int] | None:
    """`anneal: {to: c_end, steps: S, start: 0}` of a term (null: constant)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not {"to", "steps"} <= set(value) <= {"to", "steps", "start"}:
        raise SpecError(
            f"{path}: must be {{to: <coef at the end>, steps: <steps to get there>, start: "
            f"<step the change begins, default 0>}}, got {value!r}"
        )
    to, steps = _number(f"{path}.to", value["to"]), _number(f"{path}.steps", value["steps"])
    start = _number(f"{path}.start", value.get("start", 0))
    if not 0 <= to < math.inf:
        raise SpecError(f"{path}.to: must be a finite number ≥ 0, got {value['to']!r}")
    for key, number, low in (("steps", steps, 1), ("start", start, 0)):
        if not (number >= low and float(number).is_integer()):
            raise SpecError(f"{path}.{key}: must be an integer ≥ {low}, got {value[key]!r}")
    return to, int(steps), int(start)


def _check_estimator(path: str, name: str, estimator: str, placement: str) -> None:
    rewardlike = placement in ("reward", "token_reward")
    if estimator == "exact":
        if rewardlike:
            raise SpecError(
                f"{path}.placement: the exact divergence is a loss term; in the reward use "
                f"the sampled estimator k1 (whose score-function gradient is ∇KL(p‖q))"
            )
        return
    if estimator == "stored":
        if not divergences.is_pointwise(name) or placement != "loss":
            raise SpecError(
                f"{path}.estimator: the stored estimator needs a divergence that is a sum "
                f"over the vocabulary and placement: loss, got {name} in the {placement}"
            )
        return
    if estimator == "sequence":
        if name != "chi2" or placement != "loss":
            raise SpecError(
                f"{path}.estimator: the sequence estimator is the χ² of whole completions "
                f"(divergence: chi2, placement: loss), got {name} in the {placement}"
            )
        return
    if name != "reverse_kl":
        raise SpecError(
            f"{path}.estimator: sampled estimators ({estimator}) estimate KL(πθ‖q) from "
            f"the sampled token and exist for reverse_kl only; use estimator: exact for "
            f"{name}"
        )
    if placement == "loss" and estimator == "k1":
        raise SpecError(
            f"{path}.estimator: k1 as a loss has zero expected gradient (∇k1 = ∇log "
            f"πθ(y)); use k2, k1_st or k3_st in the loss, or k1 with placement: reward"
        )
    if rewardlike and estimator != "k1":
        raise SpecError(
            f"{path}.estimator: in the reward only k1 gives ∇KL(p‖q) (score function); "
            f"{estimator} does not. Use k1 there, or put {estimator} in the loss"
        )


def term_warnings(term: TermSpec) -> list[str]:
    if term.estimator == "k3" and term.placement == "loss":
        return [
            f"{term.name}: k3 in the loss descends KL(q‖πθ) (forward KL) in expectation, not the "
            f"reverse KL its value estimates (methods.md C6); use k2 or k3_st for ∇KL(πθ‖q)"
        ]
    return []


@dataclass(frozen=True)
class EntropyAnchorSpec:
    """SIREN's anchored entropy regularizer c·(H̄ − H₀)² (`divrl.objectives.entropy_anchor`)."""

    coef: float = 0.005
    top_p: float = 0.8
    top_k: int = 10000
    quantile: float = 0.8


def _parse_entropy_anchor(value: Any) -> EntropyAnchorSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise SpecError(f"entropy_anchor: a mapping {{coef, top_p, top_k, quantile}} or null, got {value!r}")
    fields = ("coef", "top_p", "top_k", "quantile")
    for key in value:
        if key not in fields:
            raise _unknown("entropy_anchor", "key", key, fields)
    defaults = EntropyAnchorSpec()
    numbers = {k: float(getattr(defaults, k)) for k in fields}
    numbers.update((k, _number(f"entropy_anchor.{k}", v)) for k, v in value.items())
    coef, top_p, top_k, quantile = (numbers[k] for k in fields)
    checks = (
        ("coef", coef >= 0 and math.isfinite(coef), "a finite number ≥ 0"),
        ("top_p", 0 < top_p <= 1, "in (0, 1]"),
        ("top_k", top_k >= 1 and float(top_k).is_integer(), "an integer ≥ 1"),
        ("quantile", 0 <= quantile < 1, "in [0, 1)"),
    )
    for key, ok, allowed in checks:
        if not ok:
            raise SpecError(f"entropy_anchor.{key}: must be {allowed}, got {numbers[key]!r}")
    return EntropyAnchorSpec(coef, top_p, int(top_k), quantile)


@dataclass(frozen=True)
class TDRegularizerSpec:
    """IRL imitation's temporal-difference regularizer λ·(z_{y_t} − γ·V(s_{t+1}))², V = logsumexp
    of the logits, V = 0 after a completion's last token (`divrl.objectives.td_residual`)."""

    coef: float = 0.01
    gamma: float = 0.99


def _parse_td_regularizer(value: Any) -> TDRegularizerSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise SpecError(f"td_regularizer: a mapping {{coef, gamma}} or null, got {value!r}")
    fields = ("coef", "gamma")
    for key in value:
        if key not in fields:
            raise _unknown("td_regularizer", "key", key, fields)
    defaults = TDRegularizerSpec()
    numbers = {k: float(getattr(defaults, k)) for k in fields}
    numbers.update((k, _number(f"td_regularizer.{k}", v)) for k, v in value.items())
    if not (numbers["coef"] >= 0 and math.isfinite(numbers["coef"])):
        raise SpecError(f"td_regularizer.coef: must be a finite number ≥ 0, got {numbers['coef']!r}")
    if not 0 <= numbers["gamma"] <= 1:
        raise SpecError(f"td_regularizer.gamma: must be in [0, 1], got {numbers['gamma']!r}")
    return TDRegularizerSpec(numbers["coef"], numbers["gamma"])


@dataclass(frozen=True)
class ObjectiveSpec:
    """Everything that decides the loss; built by `parse_objective`."""

    policy_gradient: bool = True
    pg_loss: str = "clipped"
    pg_loss_params: tuple[tuple[str, Any], ...] = ()
    advantage: str = "group_norm"
    advantage_std: str = "sample"
    advantage_clip: float = 0.0  # |A| ≤ advantage_clip (0: no clip)
    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: str = "token_mean"
    normalizer: float = 1.0
    pg_mask: tuple[tuple[str, dict], ...] = ()
    pg_weight: tuple[tuple[str, dict], ...] = ()
    pg_mask_mean: bool = False
    terms: tuple[TermSpec, ...] = ()
    overlong_buffer: float = 0.0
    overlong_penalty: float = 1.0
    max_length: int = 1
    entropy_anchor: EntropyAnchorSpec | None = None
    td_regularizer: TDRegularizerSpec | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def models(self) -> frozenset[str]:
        """Models whose outputs the terms need, among reference, teacher, old and self (a stored
        term reads its target's log-probs from the stored responses instead); the reference also
        when a mask or weight reads it."""
        needed = frozenset().union(*(t.target.models() for t in self.terms if t.estimator != "stored"))
        needed |= {"teacher"} if self.policy_gradient and self.pg_loss in surrogates.READS_TEACHER else set()
        return needed | ({"reference"} if self.reads_reference else set())

    @property
    def reads_reference(self) -> bool:
        """Whether a mask or weight reads the reference model at each token (entropy, log-prob, KL)."""
        return any(self.uses_weight(name) for name in weights.READ_REFERENCE)

    def uses_weight(self, name: str) -> bool:
        """Whether some mask or weight of the objective is the registered weight `name`."""
        return any(
            n == name
            for choices in (self.pg_mask, self.pg_weight, *(c for t in self.terms for c in (t.mask, t.weight)))
            for n, _ in choices
        )

    @property
    def stored_terms(self) -> tuple[TermSpec, ...]:
        return tuple(t for t in self.terms if t.estimator == "stored")

    def describe(self) -> str:
        """One line, e.g. 'clipped PG (group_norm, ε 0.2/0.28) + 0.001·reverse_kl(πθ, reference)
        [exact, loss], aggregated token_mean'."""
        surrogate = (
            f"clipped PG ({self.advantage}, ε {self.clip_low:g}/{self.clip_high:g})"
            if self.pg_loss == "clipped"
            else f"{self.pg_loss} PG ({', '.join([self.advantage, *(f'{k}={v:g}' for k, v in self.pg_loss_params)])})"
        )
        parts = [surrogate] if self.policy_gradient else []
        for t in self.terms:
            params = "".join(f", {k}={v}" for k, v in t.params if not isinstance(v, torch.Tensor))
            coef = (
                f"{t.coef:g}"
                if t.anneal is None
                else f"({t.coef:g} → {t.anneal[0]:g} by step {t.anneal[2] + t.anneal[1]})"
            )
            parts.append(f"{coef}·{t.divergence}(πθ, {t.target.describe()}{params}) [{t.estimator}, {t.placement}]")
        if self.entropy_anchor:
            a = self.entropy_anchor
            parts.append(f"{a.coef:g}·(H̄_top-p{a.top_p:g} − H₀)²")
        if self.td_regularizer:
            td = self.td_regularizer
            parts.append(f"{td.coef:g}·(z_y − {td.gamma:g}·lse′)²")
        shaping = (
            f", overlong penalty ≤ {self.overlong_penalty:g} in the last {self.overlong_buffer:g} of the length budget"
            if self.overlong_buffer
            else ""
        )
        return f"{' + '.join(parts)}, aggregated {self.aggregation}{shaping}"

    @property
    def reads_prompt_positions(self) -> bool:
        """Whether a term also applies at the positions that predict the prompt's tokens."""
        return any(t.prompt_positions for t in self.terms)

    @property
    def reward_terms(self) -> tuple[TermSpec, ...]:
        return tuple(t for t in self.terms if t.placement == "reward")

    @property
    def token_reward_terms(self) -> tuple[TermSpec, ...]:
        return tuple(t for t in self.terms if t.placement == "token_reward")

    def at_step(self, step: int) -> ObjectiveSpec:
        """This objective with each annealed term's coefficient at training step `step` (0-based)."""
        if not any(t.anneal for t in self.terms):
            return self
        return dataclasses.replace(
            self,
            terms=tuple(
                dataclasses.replace(t, coef=t.coef_at(step), anneal=None) if t.anneal else t for t in self.terms
            ),
        )


def _parse_pg_loss(value: Any, clip_low: float, clip_high: float) -> tuple[str, tuple]:
    """`pg_loss`: a surrogate name or {name: {params}}; `clipped` takes clip_low/clip_high."""
    ((name, params),) = named_choices(value, "pg_loss", "pg_loss", surrogates.names(), single=True)
    if name == "clipped":
        if params:
            raise SpecError("pg_loss.clipped: set clip_low and clip_high instead of parameters")
        params = {"clip_low": clip_low, "clip_high": clip_high}
    _refuse_nonfinite(f"pg_loss.{name}", params)
    toy = surrogates.PolicyTokens(
        torch.zeros(2),
        torch.zeros(2),
        torch.ones(2),
        torch.tensor([True, False]),
        torch.full((2,), 0.5),
        torch.arange(2),
        torch.zeros(2),
    )
    _try_on_a_toy(lambda: surrogates.get(name)(toy, **params), f"pg_loss.{name}")
    return name, tuple(params.items())


def shorthand_term(kl_coef: float, kl_estimator: str, kl_in_reward: bool) -> dict | None:
    """`kl_coef`/`kl_estimator`/`kl_in_reward`: one reverse-KL-to-reference term (None if β = 0)."""
    if not kl_coef:
        return None
    return {
        "divergence": "reverse_kl",
        "target": "reference",
        "coef": kl_coef,
        "estimator": kl_estimator,
        "placement": "reward" if kl_in_reward else "loss",
    }


def parse_objective(config: Mapping[str, Any]) -> ObjectiveSpec:
    """The ObjectiveSpec of a (flat) training config mapping; raises SpecError naming the key.

    Keys read: policy_gradient, pg_loss, advantage, advantage_std, advantage_clip, clip_low, clip_high, loss_aggregation, loss_normalizer
    (default: max_new_tokens), pg_mask, pg_weight, pg_mask_mean, terms, teacher, overlong_buffer,
    overlong_penalty, max_new_tokens, entropy_anchor, td_regularizer, preference (only whether it is set), and the shorthand kl_coef, kl_estimator, kl_in_reward
    (appended as the last term).
    """
    get = config.get
    advantage = get("advantage", "group_norm")
    if advantage not in ADVANTAGES:
        raise _unknown("advantage", "advantage", advantage, ADVANTAGES)
    advantage_std = get("advantage_std", "sample")
    if advantage_std not in ADVANTAGE_STDS:
        raise _unknown("advantage_std", "standard deviation", advantage_std, ADVANTAGE_STDS)
    advantage_clip = _number("advantage_clip", get("advantage_clip", 0.0))
    if not 0.0 <= advantage_clip < math.inf:
        raise SpecError(f"advantage_clip: must be a finite number ≥ 0 (0: no clip), got {advantage_clip!r}")
    aggregation = get("loss_aggregation", "token_mean")
    if aggregation not in AGGREGATIONS:
        raise _unknown("loss_aggregation", "aggregation", aggregation, AGGREGATIONS)
    normalizer = get("loss_normalizer")
    normalizer = float(get("max_new_tokens", 1) if normalizer is None else normalizer)
    if not normalizer > 0:
        raise SpecError(f"loss_normalizer: must be > 0, got {normalizer!r}")
    raw_terms = get("terms") or []
    if not isinstance(raw_terms, list):
        raise SpecError(f"terms: must be a list of mappings, got {raw_terms!r}")
    teacher = bool(get("teacher")) or bool(get("stage1"))  # a first stage's model is a teacher
    shorthand = shorthand_term(get("kl_coef", 0.0), get("kl_estimator", "exact"), get("kl_in_reward", False))
    terms = [parse_term(t, f"terms[{i}]", teacher) for i, t in enumerate(raw_terms)]
    if shorthand is not None:
        try:
            terms.append(parse_term(shorthand, "kl_coef", teacher))
        except SpecError as err:  # name the shorthand keys, not an invisible term
            raise SpecError(
                str(err).replace("kl_coef.estimator", "kl_estimator").replace("kl_coef.placement", "kl_in_reward")
            ) from None
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(
            f"terms: two terms share the name {duplicates[0]} (same divergence and "
            f"target); merge them into one term with the summed coef"
        )
    overlong_buffer = _number("overlong_buffer", get("overlong_buffer", 0.0))
    if not 0.0 <= overlong_buffer <= 1.0:
        raise SpecError(f"overlong_buffer: must lie in [0, 1] (a fraction of max_new_tokens), got {overlong_buffer!r}")
    overlong_penalty = _number("overlong_penalty", get("overlong_penalty", 1.0))
    if not 0.0 <= overlong_penalty < math.inf:
        raise SpecError(f"overlong_penalty: must be a finite number ≥ 0, got {overlong_penalty!r}")
    policy_gradient = get("policy_gradient", True)
    if not policy_gradient and any(t.placement == "token_reward" for t in terms):
        raise SpecError(
            "policy_gradient: false drops the per-token advantage that token_reward terms "
            "enter; set policy_gradient: true"
        )
    if (
        not policy_gradient
        and not any(t.placement == "loss" for t in terms)
        and get("entropy_anchor") is None
        and get("td_regularizer") is None
        and not get("preference")  # a preference run on its pairs alone
    ):
        raise SpecError(
            "policy_gradient: false leaves no loss term; add a term with placement: loss (or a preference loss)"
        )
    pg_loss, pg_loss_params = _parse_pg_loss(
        get("pg_loss", "clipped"), float(get("clip_low", 0.2)), float(get("clip_high", 0.28))
    )
    if pg_loss in surrogates.READS_TEACHER and not teacher:
        raise SpecError(
            f"pg_loss.{pg_loss}: reads the teacher's log-probs of the sampled tokens; set "
            f"'teacher' (default, tiny, a local model directory or a hub id)"
        )
    pg_mask = _named_weights(get("pg_mask"), "pg_mask")
    pg_weight = _named_weights(get("pg_weight"), "pg_weight")
    for key, choices in (("pg_mask", pg_mask), ("pg_weight", pg_weight)):
        _refuse_weights(
            key,
            choices,
            weights.READ_TARGET,
            "reads a divergence term's target log-prob at the sampled token; the policy gradient has no target",
        )
    return ObjectiveSpec(
        policy_gradient=bool(policy_gradient),
        pg_loss=pg_loss,
        pg_loss_params=pg_loss_params,
        advantage=advantage,
        advantage_std=advantage_std,
        advantage_clip=advantage_clip,
        clip_low=float(get("clip_low", 0.2)),
        clip_high=float(get("clip_high", 0.28)),
        aggregation=aggregation,
        normalizer=normalizer,
        pg_mask=pg_mask,
        pg_weight=pg_weight,
        pg_mask_mean=_mask_mean(get("pg_mask_mean", False), "pg_mask_mean", pg_mask),
        terms=tuple(terms),
        overlong_buffer=overlong_buffer,
        overlong_penalty=overlong_penalty,
        max_length=int(get("max_new_tokens", 1)),
        entropy_anchor=_parse_entropy_anchor(get("entropy_anchor")),
        td_regularizer=_parse_td_regularizer(get("td_regularizer")),
        warnings=tuple(w for t in terms for w in term_warnings(t)),
    )
