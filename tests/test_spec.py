"""The objective spec: config keys → ObjectiveSpec, every bad input refused before any model
loads with its key path; the kl_* shorthand; recipes and key-path overrides."""

import pytest

from divrl import recipes
from divrl.cli import main
from divrl.config import ConfigError, build_config
from divrl.spec import Target, parse_objective


def test_shorthand_is_one_reverse_kl_term_to_the_reference():
    short = build_config(None, ["kl_coef=0.01", "kl_estimator=k2"]).objective
    explicit = build_config(
        None, ["terms=[{divergence: reverse_kl, target: reference, coef: 0.01, estimator: k2}]"]
    ).objective
    assert short == explicit
    (term,) = short.terms
    assert (term.name, term.coef, term.estimator, term.placement) == ("reverse_kl_to_reference", 0.01, "k2", "loss")
    assert (
        build_config(None, ["kl_coef=0.01", "kl_estimator=k1", "kl_in_reward=true"]).objective.terms[0].placement
        == "reward"
    )
    assert build_config(None, ["kl_coef=0"]).objective.terms == ()


def test_a_composed_target_parses_to_a_tree_and_names_its_function():
    spec = build_config(
        None,
        [
            "teacher=tiny",
            "terms=[{divergence: jsd, params: {beta: 0.5}, coef: 0.2, "
            "target: {extrapolate: {ref: reference, teacher: {temperature: {p: teacher, "
            "T: 2}}, lam: 1.25}}, mask: {entropy_quantile: {top: 0.2}}, weight: pass_rate}]",
        ],
    ).objective
    (term,) = spec.terms
    assert term.name == "jsd_to_extrapolate" and term.kwargs == {"beta": 0.5}
    assert term.target == Target(
        "extrapolate",
        (
            ("ref", Target("reference")),
            ("teacher", Target("temperature", (("p", Target("teacher")), ("T", 2.0)))),
            ("lam", 1.25),
        ),
    )
    assert spec.models() == {"reference", "teacher"}
    assert term.mask == (("entropy_quantile", {"top": 0.2}),) and term.weight == (("pass_rate", {}),)


def test_k3_in_the_loss_warns_that_its_gradient_is_the_forward_kl():
    (warning,) = build_config(None, ["kl_coef=0.1", "kl_estimator=k3"]).objective.warnings
    assert "forward KL" in warning


def test_aggregation_normalizer_defaults_to_the_generation_budget():
    spec = build_config(None, ["loss_aggregation=seq_mean_token_sum_norm", "max_new_tokens=48"]).objective
    assert (spec.aggregation, spec.normalizer) == ("seq_mean_token_sum_norm", 48.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["terms=[{divergence: revers_kl, target: reference}]"],
            "terms[0].divergence: unknown divergence 'revers_kl'; did you mean 'reverse_kl'?",
        ),
        (
            ["terms=[{divergence: forward_kl, target: refrence}]"],
            "terms[0].target: unknown target 'refrence'; did you mean 'reference'?",
        ),
        (
            ["terms=[{divergence: forward_kl, target: {extrapolat: {}}}]"],
            "terms[0].target: unknown target function 'extrapolat'; did you mean 'extrapolate'?",
        ),
        (
            ["terms=[{divergence: forward_kl, target: {mix: {a: reference, b: self, alfa: 0.1}}}]"],
            "terms[0].target.mix: unknown argument 'alfa'; did you mean 'alpha'?",
        ),
        (
            ["terms=[{divergence: forward_kl, target: {mix: {a: reference, b: self}}}]"],
            "terms[0].target.mix.alpha: missing",
        ),
        (
            ["terms=[{divergence: forward_kl, target: {tilt: {base: old, beta: -1}}}]"],
            "terms[0].target.tilt: tilt: beta must be > 0",
        ),
        (
            ["terms=[{divergence: forward_kl, target: reference, estimator: k9}]"],
            "terms[0].estimator: unknown estimator 'k9'",
        ),
        (
            ["terms=[{divergence: forward_kl, target: reference, estimator: k3}]"],
            "terms[0].estimator: sampled estimators (k3) estimate KL(πθ‖q) from the sampled token and exist for reverse_kl only",
        ),
        (
            ["terms=[{divergence: reverse_kl, target: reference, estimator: k1}]"],
            "terms[0].estimator: k1 as a loss has zero expected gradient",
        ),
        (
            ["terms=[{divergence: reverse_kl, target: reference, estimator: k3, placement: reward}]"],
            "terms[0].estimator: in the reward only k1 gives",
        ),
        (
            ["terms=[{divergence: reverse_kl, target: reference, placement: reward}]"],
            "terms[0].placement: the exact divergence is a loss term",
        ),
        (
            ["terms=[{divergence: reverse_kl, target: teacher}]"],
            "terms[0].target: teacher needs a teacher model; set 'teacher'",
        ),
        (
            ["terms=[{divergence: reverse_kl, target: reference, coef: -0.1}]"],
            "terms[0].coef: must be a finite number ≥ 0",
        ),
        (
            ["terms=[{divergence: jsd, params: {beta: 1.5}, target: reference}]"],
            "terms[0].params: jsd: beta must lie in [0, 1]",
        ),
        (["terms=[{divergence: jsd, params: {bta: 0.5}, target: reference}]"], "terms[0].params:"),
        (
            ["terms=[{divergence: jsd, target: reference, coeff: 1}]"],
            "terms[0]: unknown key 'coeff'; did you mean 'coef'?",
        ),
        (
            ["terms=[{divergence: reverse_kl, target: reference, mask: entropy_quantil}]"],
            "terms[0].mask.entropy_quantil:",
        ),
        (["pg_weight={pass_rate: {a: -1}}"], "pg_weight.pass_rate:"),
        (
            ["kl_coef=0.1", "terms=[{divergence: reverse_kl, target: reference}]"],
            "two terms share the name reverse_kl_to_reference",
        ),
        (["policy_gradient=false"], "policy_gradient: false leaves no loss term"),
        (["kl_coef=0.1", "kl_estimator=k1"], "kl_estimator: k1 as a loss has zero expected gradient"),
        (["kl_coef=0.1", "kl_estimator=k3", "top_p=0.9"], "'top_p' < 1 samples from the renormalized nucleus"),
        (["micro_batch_size=4", "group_size=8"], "'micro_batch_size' must be ≥ group_size (8)"),
        (["loss_aggregation=seq_mean"], "loss_aggregation: unknown aggregation 'seq_mean'; did you mean"),
        (["advantage=mean"], "advantage: unknown advantage 'mean'; did you mean 'mean_only'?"),
        (["terms[1].coef=0.1"], "'terms' has no item 1"),
        (
            [
                "terms=[{divergence: reverse_kl, target: reference, estimator: k1, placement: token_reward, "
                "weight: {asymmetric: {positive: 0.0}}}]"
            ],
            "terms[0].weight: masks and weights scale a loss term per token; a term with placement token_reward",
        ),
        (
            ["terms=[{divergence: reverse_kl, target: reference, estimator: k1, placement: reward, mask: failed}]"],
            "terms[0].mask: masks and weights scale a loss term per token; a term with placement reward",
        ),
        (
            ["terms=[{divergence: reverse_kl, target: reference, estimator: k1, placement: reward, mask_mean: true}]"],
            "terms[0].mask_mean: masks and weights scale a loss term per token",
        ),
        (
            ["pg_mask=low_probability_negatives"],
            "pg_mask.low_probability_negatives: reads a divergence term's target log-prob at the sampled token",
        ),
        (
            ["terms=[{divergence: reverse_kl, target: reference, mask: low_probability_negatives}]"],
            "terms[0].mask.low_probability_negatives: reads the target's log-prob at the sampled token, which "
            "only a sampled estimator's term has, not estimator exact",
        ),
        (
            ["terms=[{divergence: alpha, params: {alpha: .nan}, target: reference}]"],
            "terms[0].params.alpha: must be a finite number, got nan",
        ),
        (
            ["terms=[{divergence: jsd, params: {beta: .inf}, target: reference}]"],
            "terms[0].params.beta: must be a finite number, got inf",
        ),
        (["pg_loss={nft: {negative_weight: .inf}}"], "pg_loss.nft.negative_weight: must be a finite number, got inf"),
        (["pg_mask={1: {}}"], "pg_mask: a name of divrl.weights must be a string, got 1"),
        (
            ["terms=[{divergence: reverse_kl, target: reference, weight: {2: {}}}]"],
            "terms[0].weight: a name of divrl.weights must be a string, got 2",
        ),
    ],
)
def test_bad_objective_is_refused_with_its_key_path(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert message in str(err.value)


def test_key_path_overrides_reach_into_terms():
    cfg = build_config(
        None, ["terms=[{divergence: jsd, target: reference}]", "terms[0].coef=0.3", "terms[0].params.beta=0.9"]
    )
    assert cfg.terms == [{"divergence": "jsd", "target": "reference", "coef": 0.3, "params": {"beta": 0.9}}]


def test_recipes_are_listed_loaded_and_overridden(tmp_path, capsys):
    assert {"grpo", "opd"} <= set(recipes.names())
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("grpo ") for line in lines) and any(line.startswith("opd ") for line in lines)
    assert all("(" in line for line in lines)  # every line cites its paper
    opd = build_config(None, ["teacher=tiny"], recipe="opd").objective
    assert not opd.policy_gradient and [t.name for t in opd.terms] == ["reverse_kl_to_teacher"]
    config = tmp_path / "c.yaml"
    config.write_text("kl_coef: 0.05\n")
    grpo = build_config(config, ["clip_high=0.3"], recipe="grpo")
    assert (grpo.kl_coef, grpo.clip_high, grpo.policy_gradient) == (0.05, 0.3, True)
    assert build_config(None, [], recipe="grpo").objective == build_config(None, ["kl_coef=0.001"]).objective


def test_bad_recipes_name_the_valid_ones_and_the_key():
    with pytest.raises(ConfigError, match="unknown recipe 'gpro'; did you mean 'grpo'"):
        build_config(None, [], recipe="gpro")
    with pytest.raises(ConfigError, match=r"terms\[0\]\.target: teacher needs a teacher model"):
        build_config(None, [], recipe="opd")
    with pytest.raises(ConfigError, match=r"terms\[0\]\.divergence: unknown divergence 'kl'"):
        build_config(None, ["teacher=tiny", "terms[0].divergence=kl"], recipe="opd")


def test_cli_reports_a_bad_recipe_and_exits_2(capsys):
    assert main(["train", "--recipe", "nope"]) == 2
    assert "Valid recipes:" in capsys.readouterr().err


def test_parse_objective_reads_a_plain_mapping():
    spec = parse_objective({"policy_gradient": False, "terms": [{"divergence": "chi2", "target": "reference"}]})
    assert spec.models() == {"reference"} and all(t.placement == "loss" for t in spec.terms) and not spec.reward_terms


def test_prompt_positions_take_an_exact_divergence_to_a_model():
    from divrl.spec import SpecError, parse_objective

    ok = parse_objective({"terms": [{"divergence": "forward_kl", "target": "reference", "prompt_positions": True}]})
    assert ok.reads_prompt_positions
    with pytest.raises(SpecError, match=r"terms\[0\]\.prompt_positions: .*exact divergence to a model"):
        parse_objective(
            {
                "terms": [
                    {"divergence": "reverse_kl", "target": "reference", "estimator": "k2", "prompt_positions": True}
                ]
            }
        )
    with pytest.raises(SpecError, match=r"terms\[0\]\.prompt_positions: .*target self"):
        parse_objective({"terms": [{"divergence": "reverse_kl", "target": "self", "prompt_positions": True}]})
    with pytest.raises(SpecError, match=r"terms\[0\]\.mask_mean: averages over the tokens a mask keeps"):
        parse_objective({"terms": [{"divergence": "reverse_kl", "target": "reference", "mask_mean": True}]})
    sinkhorn = {"divergence": "sinkhorn_topk", "params": {"cost": "embedding"}, "target": "teacher"}
    with pytest.raises(SpecError, match=r"terms\[0\]\.prompt_positions: takes a divergence that is a sum over"):
        parse_objective({"teacher": "tiny", "terms": [{**sinkhorn, "prompt_positions": True}]})


@pytest.mark.parametrize(
    "weight",
    [
        "accuracy_tanh",
        "stcr",
        "success_adaptive",
        "resrl",
        "confidence_shift",
        "reference_entropy_above",
        "reference_kl_quantile",
    ],
)
def test_a_stored_term_refuses_weights_that_read_the_online_batch(weight):
    with pytest.raises(ConfigError) as err:
        build_config(None, [f"terms[0].weight={weight}"], recipe="dph-rl")
    assert f"terms[0].weight.{weight}: reads the online batch's groups, pass rate, diversity or the reference" in str(
        err.value
    )


def test_a_stored_term_takes_weights_of_its_own_responses_but_no_target_mask():
    with pytest.raises(ConfigError, match=r"terms\[0\]\.mask\.low_probability_negatives: .*not estimator stored"):
        build_config(None, ["terms[0].mask=low_probability_negatives"], recipe="dph-rl")
    assert build_config(None, ["terms[0].weight=failed"], recipe="dph-rl").objective.terms[0].weight == (
        ("failed", {}),
    )


@pytest.mark.parametrize("key", ["td_regularizer", "entropy_anchor"])
def test_an_empty_regularizer_mapping_is_its_defaults_and_trains_alone(key):
    spec = parse_objective({"policy_gradient": False, key: {}})
    assert getattr(spec, key).coef == {"td_regularizer": 0.01, "entropy_anchor": 0.005}[key]
