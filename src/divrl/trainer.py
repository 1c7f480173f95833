"""The training loop: rollout → score → model outputs → objective → step → metrics/checkpoint.

One step samples G completions for each of P training prompts, scores them with the task's
verifier, computes the hidden states of the policy (with gradient) and of the models the
objective's targets need (reference = a frozen copy of the initial weights, teacher; without),
and takes `inner_iterations` AdamW steps on `divrl.objectives.objective_loss`. Which loss that
is — PG term, divergences, targets, estimators, masks — is the `ObjectiveSpec`'s business
(`divrl.spec`); the trainer only orchestrates. All token distributions are the temperature-T
distributions the samples were drawn from (as TRL does); with top_p < 1 the behaviour
log-probs of the PPO ratio are the sampler's own (nucleus-renormalized).

A sample *passes* when its reward is 1 (full score); `pass_rate` and pass@k count passes only,
while a partial-credit reward (reasoning-gym's, e.g. len(answer)/len(reply) for a reply that
contains the answer) is kept as the reward the objective and `reward` see. The verifier is called
through `divrl.guarded_verifier` (time limit, optional worker processes); its failures score 0.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from divrl import (
    attention,
    chunked,
    demos,
    distributed,
    diversity,
    heap,
    lora,
    objectives,
    precision,
    preferences,
    recompute,
    sharding,
    stored,
)
from divrl.atomic import write_text_atomically
from divrl.calibration import CalibrationSpec, transformed
from divrl.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_writes,
    save_checkpoint,
    set_aside_newer,
)
from divrl.chunked import Head
from divrl.config import ConfigError, TrainConfig, online_trains, save_config, stage1_config, uses_demonstrations
from divrl.evaluation import score_completions
from divrl.guarded_verifier import CRASH, TIMEOUT, GuardedVerifier
from divrl.hidden import TokenBatch, completion_hidden
from divrl.hints import HintSpec, Search, Subset, hinted_prompt, knowledge_points, subset_search
from divrl.metrics import pass_at_k_over_prompts
from divrl.mixture import MixtureTask, build_mixture_source
from divrl.models import (
    ModelLoadError,
    autocast_for,
    casts_kept,
    context_length,
    frozen_for,
    load_model,
    output_head,
    resolve_device,
    stop_token_ids,
)
from divrl.prefix_replay import PrefixSpec, TraceBuffer, choose_prefixes
from divrl.prompts import Group, build_source, split_groups
from divrl.recap import Reweighting, ReweightingSpec
from divrl.report import write_report
from divrl.rollout import sample
from divrl.rowwise import ModelOutputs
from divrl.runlog import MetricsLog, NullLog
from divrl.spec import ObjectiveSpec, parse_objective
from divrl.tasks import Example, Task, build_task, encode_prompt, fit_to_context
from divrl.vllm_rollout import VllmSampler


def passes(reward: float) -> bool:
    return reward >= objectives.PASS_THRESHOLD


def check_output_dir(cfg: TrainConfig) -> Path:
    """The run directory; refuses to overwrite an earlier run unless resuming it (one interrupted
    before its first checkpoint starts over), and a null output_dir (`divrl train` resolves it
    first: `divrl.run_dirs.resolve_output_dir`)."""
    if cfg.output_dir is None:
        raise ConfigError(
            "config key 'output_dir' is null: a Trainer needs a directory; "
            "divrl.run_dirs.resolve_output_dir makes a fresh one, as `divrl train` does"
        )
    run_dir = Path(cfg.output_dir)
    in_stage1 = bool(cfg.stage1) and (run_dir / "stage1").is_dir()  # a two-stage run's first stage
    has_run = (run_dir / "metrics.jsonl").exists() or bool(checkpoint_dirs(run_dir)) or in_stage1
    if has_run and not cfg.resume:
        raise ConfigError(
            f"config key 'output_dir': '{run_dir}' already holds a run; set "
            f"resume=true to continue it, or choose another output_dir"
        )
    if cfg.resume and not has_run:
        raise ConfigError(f"config key 'resume': '{run_dir}' holds no run to resume")
    return run_dir


class NonFiniteError(RuntimeError):
    """`max_skipped_steps` consecutive steps were skipped for a non-finite loss or gradient."""


def nonfinite_reason(outputs: list[tuple[ObjectiveSpec, objectives.ObjectiveOutput]], grad_norm: float) -> str | None:
    """Why an optimizer step must be skipped, from one pass's micro-batch outputs and global
    gradient norm; None when every value is finite.

    Named first, as the likelier causes: non-finite token weights (`<part> weight <names>`, read
    from `<part>_mean_weight`), then non-finite loss parts (`pg_loss`, `<term>_loss`: the metric
    names). Otherwise the gradient: its global norm is non-finite exactly when some element is inf
    or NaN, so this one number, computed for clipping anyway, checks every gradient."""
    found = []
    for spec, out in outputs:
        weighted = {"pg": spec.pg_weight, **{t.name: t.weight for t in spec.terms}}
        found += [
            f"{part} weight {'·'.join(name for name, _ in choices)}"
            for part, choices in weighted.items()
            if not math.isfinite(out.token_sums.get(f"{part}_mean_weight", 0.0))
        ]
        found += [f"{part}_loss" for part, value in out.loss_parts.items() if not math.isfinite(value)]
    if found:
        return "non-finite " + ", ".join(dict.fromkeys(found))
    if not math.isfinite(grad_norm):
        parts = ", ".join(sorted({f"{part}_loss" for _, out in outputs for part in out.loss_parts}))
        return f"non-finite gradient (norm {grad_norm}; loss parts finite: {parts or 'none'})"
    return None


@dataclass
class FrozenInputs:
    """What a micro-batch's objective needs that carries no gradient."""

    models: dict[str, ModelOutputs]  # reference / teacher / old
    old_logprobs: torch.Tensor | None  # behaviour log-probs of the sampled tokens (None: on-policy)
    current: TokenBatch | None  # the policy before the update, when computed (reward terms need it)
    prompt_models: dict[str, ModelOutputs]  # reference / teacher at the prompts' positions, if needed


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print, stage: int | None = None):
        self.cfg = cfg
        # Data-parallel (`divrl.distributed`): W = 1 unless launched by torchrun / accelerate.
        distributed.check_config(cfg, distributed.world())
        self.world = distributed.init(cfg.device)
        self.log = log if self.world.main else (lambda *_, **__: None)  # rank 0 alone speaks
        self.stage = 2 if cfg.stage1 else stage  # logged as `stage` in a two-stage run
        self.run_dir = check_output_dir(cfg)
        if self.world.parallel:  # every rank checked output_dir before rank 0 may write to it
            distributed.barrier()
        self.task: Task = build_task(cfg)
        self.verifier = GuardedVerifier.from_config(self.task, cfg)
        self.device = (
            distributed.device_for(cfg.device, self.world) if self.world.parallel else resolve_device(cfg.device)
        )
        if cfg.keep_freed_memory and self.device.type == "cpu":
            heap.keep_freed_memory()
        self.model, self.tokenizer = load_model(cfg.model, seed=cfg.seed, device=self.device)
        self.lora = lora.LoraSpec.parse(cfg.lora)
        if self.lora is not None:  # adapters injected in place; every other weight frozen
            try:
                lora.apply(self.model, self.lora, cfg.model, cfg.seed)
            except ImportError as err:
                raise ConfigError(str(err)) from None
            except ValueError as err:
                raise ConfigError(f"config key {err}") from None
        self.overlong_prompts = fit_to_context(self.task, self.tokenizer, cfg, context_length(self.model), self.log)
        self.model.eval()  # no dropout; gradients still flow
        if cfg.activation_checkpointing and (why := recompute.refusal(self.model)):
            raise ConfigError(f"config key 'activation_checkpointing': {why}")
        # before any frozen model loads (`frozen_for` stores it at this precision); every rank
        # times its own forward, and rank 0's choice holds, so that no two ranks train at different
        # precisions
        self.precision = distributed.broadcast_object(precision.resolve(cfg.dtype, self.model, self.log))
        self.attention_dtype = distributed.broadcast_object(
            precision.resolve_attention(cfg.attention_dtype, self.precision, self.model, self.log)
        )
        self._at_precision(self.model)
        self.autocast = autocast_for(self.precision, self.device)
        self.objective = cfg.objective
        self.preference = preferences.PreferenceSpec.parse(cfg.preference)
        self.online = online_trains(self.objective)  # False: a preference run on its pairs alone
        described = ([self.objective.describe()] if self.online else []) + (
            [preferences.describe(self.preference)] if self.preference is not None else []
        )
        self.log(f"objective: {' + '.join(described)}")
        for warning in self.objective.warnings:
            self.log(f"warning: {warning}")
        needs = self.objective.models()
        self.calibration = CalibrationSpec.parse(cfg.reward_calibration)
        self.reference_rewards: dict[str, list[float]] = {}  # calibration: sorted, per prompt text
        # pairs read a loaded reference; without one, their reference log-probs are the initial weights'
        pairs_read_reference = self.preference is not None and (
            self.preference.round_steps > 0 or cfg.reference is not None
        )
        monitor_kl = cfg.monitor_kl and self.online  # the `kl` metric of rollouts, when there are some
        self.reference = None
        if "reference" in needs or monitor_kl or self.calibration is not None or pairs_read_reference:
            if cfg.reference is not None:
                self.reference = self._load_frozen("reference", cfg.reference, cfg.seed + 2)
            elif self.lora is not None and not cfg.reference_refresh_every:  # the initial weights, shared
                self.reference = lora.AdaptersOff(self.model)
            else:  # a refreshed reference is a past policy, adapters included: a copy
                self.reference = frozen_for(self.precision, copy.deepcopy(self.model).requires_grad_(False))
        teacher_spec = self._run_stage1() if cfg.stage1 else cfg.teacher
        demos_from_teacher = (
            uses_demonstrations(cfg) and cfg.demonstrations is None and cfg.demonstrations_from == "teacher"
        )
        self.teacher = None
        if "teacher" in needs or demos_from_teacher:
            assert teacher_spec is not None  # the config check requires a teacher where one is read
            self.teacher = self._load_frozen("teacher", teacher_spec, cfg.seed + 1)
        self.diversity_bonus = diversity.parse_bonus(cfg.diversity_bonus)
        self.encoder = None if self.diversity_bonus is None else diversity.load_encoder(self.diversity_bonus.encoder)
        self.sharded = cfg.fsdp and self.world.parallel  # FSDP (`divrl.sharding`): the optimizer steps shards
        if cfg.fsdp and not self.world.parallel:
            self.log("fsdp: one process, nothing to shard; the model is trained whole")
        if self.sharded:
            try:
                sharding.shard(self.model, self.world.size)
            except ValueError as err:
                raise ConfigError(f"config key 'fsdp': {err}") from None
        self.optimizer = self._adamw(
            self.model.parameters() if self.lora is None else lora.trainable(self.model),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        if self.sharded:
            sharding.gather(self.model)
        self.generator = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed, self.world.rank))
        self.vllm = None  # rollout_backend vllm: the colocated engine the policy samples with
        if cfg.rollout_backend == "vllm":
            self.vllm = VllmSampler(self.model, context_length(self.model), cfg.seed, self.precision == "bf16")
            self.log("rollout backend: vLLM, colocated (weights pushed after every optimizer step)")
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        self._prompt_cache: dict[str, list[int]] = {}
        self.online_spec, self.stored_spec = objectives.online_and_stored(self.objective)
        self.stored_groups: list[stored.StoredGroup] = []
        self.offline_groups: list[stored.StoredGroup] = []
        online_examples = self.task.train
        if cfg.offline:
            self.offline_groups = self._offline_set()
        elif self.stored_spec is not None:
            self.stored_groups, solved = self._stored_responses()
            online_examples = [e for i, e in enumerate(self.task.train) if i not in solved]
            if not online_examples:
                raise ConfigError(
                    f"config key 'stored_prompts': the initial policy solves all "
                    f"{len(solved)} training prompts it answered, so none is left for "
                    f"the policy gradient; raise train_size above stored_prompts or "
                    f"stored_solved"
                )
            self.log(
                f"stored responses: {len(self.stored_groups)} of {cfg.stored_prompts} prompts solved by the "
                f"initial policy feed {', '.join(t.name for t in self.stored_spec.terms)}; "
                f"{len(online_examples)} prompts left for the policy gradient"
            )
        self.prompts = (
            build_mixture_source(cfg.prompt_sampler, online_examples, self.task, cfg.seed)
            if isinstance(self.task, MixtureTask)
            else build_source(cfg.prompt_sampler, online_examples, cfg.seed)
        )
        reweighting, self.reweighting = ReweightingSpec.parse(cfg.mixture_reweighting), None
        if reweighting is not None:  # RECAP
            assert isinstance(self.task, MixtureTask)  # the config check requires a mixture with it
            self.reweighting = Reweighting(reweighting, list(self.task.weights))
        self.prefix_spec = PrefixSpec.parse(cfg.prefix_replay)
        self.prefix_buffer = None if self.prefix_spec is None else TraceBuffer(self.prefix_spec.per_prompt)
        if self.prefix_spec is not None and self.prefix_spec.seed_prompts and not checkpoint_dirs(self.run_dir):
            self._seed_traces(self.prefix_spec.seed_prompts)
        self.hint_spec = HintSpec.parse(cfg.knowledge_hints)
        self.knowledge: dict[str, list[str]] = {}  # KnowRL: each training prompt's knowledge points
        self.hint_choice: dict[str, Subset] = {}  # … and the subset its search selected
        if self.hint_spec is not None:
            self.knowledge = self._knowledge_points(online_examples)
        self.entropy_anchor: float | None = None  # SIREN's H₀, set by the first update
        self.step = 0
        self.reward_errors = 0
        self.skipped_steps: list[tuple[int, str]] = []  # (step, reason) of the consecutive skipped updates
        self.pairs: list[preferences.Pair] = []
        self.pairs_round: int | None = None  # the round whose pairs `self.pairs` holds
        if cfg.behaviour_cloning_steps:
            self._behaviour_clone()
        if self.preference is not None and not self.preference.round_steps:
            self._preference_round(0)

    def _run_stage1(self) -> str:
        """Train the first stage (`stage1`'s keys over this config) in <output_dir>/stage1, or
        finish it on resume; its final checkpoint (kept) is this stage's teacher."""
        stage = stage1_config(self.cfg)
        assert stage.output_dir is not None  # this stage's is set (check_output_dir), so stage 1's is
        final = Path(stage.output_dir) / "checkpoints" / f"step-{stage.steps}"
        if not ((final / "config.json").is_file() or lora.is_adapter_dir(final)):
            resume = (Path(stage.output_dir) / "metrics.jsonl").exists() or bool(
                checkpoint_dirs(Path(stage.output_dir))
            )
            self.log(f"stage 1: {stage.steps} steps in {stage.output_dir}" + (" (resumed)" if resume else ""))
            Trainer(dataclasses.replace(stage, resume=resume), log=self.log, stage=1).run()
        self.log(f"stage 2: the teacher is stage 1's final model {final}")
        return str(final)

    def _behaviour_clone(self) -> None:
        """Demonstration-regularized RL's behaviour-cloned policy π_BC: `behaviour_cloning_steps`
        SFT steps (−log πθ of the demonstrations' tokens, token mean) of the initial weights; π_BC
        is then the starting policy and, frozen, the reference. Saved to
        <output_dir>/behaviour_cloned (from_pretrained) and read back on resume from a checkpoint."""
        cfg, path = self.cfg, self.run_dir / "behaviour_cloned"
        if checkpoint_dirs(self.run_dir) and (path / "config.json").is_file():
            self.reference = self._load_frozen("reference", str(path), cfg.seed)
            self.log(f"behaviour-cloned reference read back from {path}")
            return
        demonstrations = self._demonstrations()
        sft = parse_objective({"advantage": "signed", "pg_loss": "reinforce"})
        optimizer, self.optimizer = (
            self.optimizer,
            self._adamw(self.model.parameters(), lr=cfg.behaviour_cloning_lr),
        )
        reference, self.reference = self.reference, None
        bar = tqdm(
            range(cfg.behaviour_cloning_steps),
            desc="behaviour cloning",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for step in bar:
            chosen = stored.batch(demonstrations, step, cfg.prompts_per_step)
            prompt_ids = []
            for g in chosen:
                assert g.prompt is not None  # a demonstration carries its prompt's text (_demonstrations)
                prompt_ids.append(self._prompt_ids(Example(g.prompt, "")))
            stats = self._update(
                prompt_ids,
                [g.completions[0] for g in chosen],
                [1.0] * len(chosen),
                None,  # demonstrations: no sampler
                objective=sft,
            )
            bar.set_postfix(nll=f"{stats['pg_loss']:.3f}")
        self.optimizer = optimizer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.lora is None:
            self.model.save_pretrained(path)
        else:  # π_BC = base + adapters, merged: the reference read back on resume
            lora.save_merged(self.model, path)
        self.tokenizer.save_pretrained(path)
        # π_BC read back from the saved copy, as a resumed run reads it (LoRA: merged)
        self.reference = None if reference is None else self._load_frozen("reference", str(path), cfg.seed)
        self.log(
            f"behaviour cloning: {cfg.behaviour_cloning_steps} steps on {len(demonstrations)} "
            f"demonstrations, final NLL {stats['pg_loss']:.3f}; saved to {path}; it is the reference"
        )

    def _offline_set(self) -> list[stored.StoredGroup]:
        """The offline training set: the stored responses, selected (`stored.select_offline`), or
        the demonstrations."""
        cfg = self.cfg
        if cfg.offline_data == "demonstrations":
            return self._demonstrations()
        groups = stored.select_offline(
            self._sampled_once(), cfg.offline_keep, cfg.offline_shortest, objectives.PASS_THRESHOLD
        )
        if not groups:
            raise ConfigError(
                f"config key 'offline': none of the {cfg.stored_prompts} stored prompts "
                f"has responses that both pass and fail ({cfg.stored_samples} each), so "
                f"there is nothing to learn from offline; raise stored_prompts or "
                f"stored_samples, or use a task the model sometimes solves"
            )
        self.log(
            f"offline set: {len(groups)} of {cfg.stored_prompts} prompts kept, "
            f"{len(groups[0].completions)} of {cfg.stored_samples} responses each; no "
            f"generation during training"
        )
        return groups

    def _demonstrations(self) -> list[stored.StoredGroup]:
        """Demonstrations as one-completion groups with reward 1 (`divrl.demos`): from the file, or
        built from the task's answers or from the teacher's passing samples."""
        cfg = self.cfg
        if cfg.demonstrations is not None:
            rows, source = demos.read(cfg.demonstrations), f"file {cfg.demonstrations}"
        elif cfg.demonstrations_from == "answers":
            rows, source = demos.from_answers(self.task.train), "the task's reference answers"
        else:
            rows, source = self._teacher_demonstrations(), "the teacher's passing samples"
        if not rows:
            raise ConfigError(f"config key 'demonstrations_from': {source} gave no demonstration")
        groups = []
        for i, demo in enumerate(rows):
            ids = self._completion_ids(demo.completion)
            # a demonstration has no sampler: placeholder log-probs, never read (on policy instead)
            groups.append(stored.StoredGroup(i, [ids], [[0.0] * len(ids)], [1.0], demo.prompt))
        self.log(f"demonstrations: {len(groups)} from {source}")
        return groups

    def _completion_ids(self, text: str) -> list[int]:
        """A given completion's token ids as a sample would end: at most max_new_tokens − 1 tokens, then EOS."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.cfg.max_new_tokens - 1]
        return [*ids, self.tokenizer.eos_token_id]

    def _teacher_demonstrations(self) -> list[demos.Demo]:
        """The teacher's first passing sample of `stored_samples` for each of the first
        `stored_prompts` training prompts (rejection sampling)."""
        cfg, out = self.cfg, []
        groups = self._answer_once(
            self.task.train[: cfg.stored_prompts],
            cfg.temperature,
            cfg.top_p,
            torch.Generator().manual_seed(cfg.seed + 11),
            self.teacher,
            "teacher",
        )
        for g in groups:
            first = next((c for c, r in zip(g.completions, g.rewards) if passes(r)), None)
            if first is not None:
                out.append(demos.Demo(g.example.prompt, self.tokenizer.decode(first, skip_special_tokens=True)))
        return out

    def _seed_traces(self, n: int) -> None:
        """PrefixRL's off-policy traces: the initial policy's passing answers (`stored_samples` each) to
        the first `n` training prompts, rejection-sampled once at the start (a resumed run reads the
        buffer from its checkpoint)."""
        cfg, buffer = self.cfg, self.prefix_buffer
        assert buffer is not None  # seeded with prefix_replay only
        examples = self.task.train[:n]
        generator = torch.Generator().manual_seed(cfg.seed + 13)
        self._remember_traces(self._answer_once(examples, cfg.temperature, cfg.top_p, generator, self.model, "traces"))
        self.log(
            f"prefix replay: {len(buffer)} correct traces of {len(buffer.traces)} prompts from "
            f"{len(examples)} prompts × {cfg.stored_samples} answers of the initial policy"
        )

    def _knowledge_points(self, examples: list[Example]) -> dict[str, list[str]]:
        """KnowRL's knowledge points of each training prompt (`divrl.hints.knowledge_points`),
        refused up front if a row's `hints` is malformed."""
        found = {}
        for e in examples:
            try:
                found[e.prompt] = knowledge_points(e)
            except ValueError as err:
                raise ConfigError(
                    f"config key 'knowledge_hints': the training prompt {e.prompt[:60]!r}: {err}"
                ) from None
        with_kps = [kps for kps in found.values() if kps]
        self.log(
            f"knowledge hints: {len(with_kps)} of {len(found)} training prompts have knowledge points "
            f"({sum(map(len, with_kps))} in all)"
        )
        return found

    def _remember_traces(self, groups: list[Group]) -> None:
        """The passing completions of the unprefixed groups join the PrefixRL buffer."""
        assert self.prefix_buffer is not None
        for g in groups:
            if not g.prefix:
                for completion, reward in zip(g.completions, g.rewards):
                    if passes(reward):
                        self.prefix_buffer.add(g.example.prompt, completion)

    # ----- preference pairs -------------------------------------------------------------------
    def _preference_round(self, round_: int) -> None:
        """Round `round_`'s pairs (`divrl.preferences`): read back on resume, else made — from the
        file, or sampled from the policy (in round 0 the initial weights) on the round's prompts —
        with their summed reference log-probs (and INPO's π_t ones) computed once and saved."""
        spec, cfg = self.preference, self.cfg
        assert spec is not None  # called for a preference run only
        pairs = preferences.load(self.run_dir, round_) if cfg.resume else None
        if pairs is None:
            if spec.data is not None:
                pairs = [
                    preferences.Pair(p.prompt, self._completion_ids(p.chosen), self._completion_ids(p.rejected))
                    for p in preferences.read(spec.data)
                ]
                source = f"file {spec.data}"
                self._check_pair_prompts_fit(pairs, spec.data)
            else:
                train = self.task.train
                examples = [
                    train[(round_ * spec.prompts + i) % len(train)] for i in range(min(spec.prompts, len(train)))
                ]
                generator = torch.Generator().manual_seed(cfg.seed + 17 + round_)
                who = f"policy of round {round_}" if round_ else "initial policy"
                groups = self._answer_once(
                    examples, cfg.temperature, cfg.top_p, generator, self.model, who, samples=spec.samples
                )
                pairs = preferences.pairs_from_samples(
                    [g.example.prompt for g in groups],
                    [g.completions for g in groups],
                    [g.rewards for g in groups],
                    objectives.PASS_THRESHOLD,
                )
                source = f"{len(examples)} prompts × {spec.samples} samples of the {who}"
            if not pairs and not spec.round_steps:
                raise ConfigError(
                    f"config key 'preference.prompts': no prompt of {source} had both a passing and a "
                    f"failing sample, so there is no pair to train on; raise preference.prompts or "
                    f"preference.samples, or give preference.data"
                )
            reference = self.reference if self.reference is not None else self.model  # the initial weights
            with lora.forward_of(reference) as net:
                at_reference = self._pair_logprobs(net, pairs)
            at_anchor = self._pair_logprobs(self.model, pairs) if spec.loss == "inpo" else None
            for i, pair in enumerate(pairs):
                pair.reference = at_reference[i].tolist()
                pair.anchor = None if at_anchor is None else at_anchor[i].tolist()
            preferences.save(pairs, self.run_dir, round_)
            self.log(f"preference pairs, round {round_}: {len(pairs)} from {source}")
        self.pairs, self.pairs_round = pairs, round_

    def _check_pair_prompts_fit(self, pairs: list[preferences.Pair], path: str) -> None:
        """Refuse, naming the pair, a file's prompt longer than the model's context less
        max_new_tokens (the task's prompts are fitted by `overlong_prompts`; a file's are not)."""
        context, budget = context_length(self.model), self.cfg.max_new_tokens
        if context is None:  # the model names no limit
            return
        for number, pair in enumerate(pairs, 1):
            length = len(self._prompt_ids(Example(pair.prompt, "")))
            if length + budget > context:
                raise ConfigError(
                    f"config key 'preference.data': pair {number} of {path} has a prompt of {length} "
                    f"tokens, over the model's context of {context} less max_new_tokens {budget}; "
                    f"shorten it or drop the pair"
                )

    def _pair_chunks(self, pairs: list[preferences.Pair]) -> list[list[preferences.Pair]]:
        """Micro-batches of pairs: micro_batch_size completions (two per pair) each."""
        size = max(1, self.cfg.micro_batch_size // 2)
        return [pairs[i : i + size] for i in range(0, len(pairs), size)]

    def _sequence_logprobs(self, model, pairs: list[preferences.Pair]) -> torch.Tensor:
        """(P, 2) summed log-probs at temperature 1 of each pair's chosen and rejected completion."""
        prompts = [self._prompt_ids(Example(p.prompt, "")) for p in pairs]
        completions = [c for p in pairs for c in (p.chosen, p.rejected)]
        out = completion_hidden(model, prompts, completions, self.tokenizer.pad_token_id)
        logprobs = chunked.logprob_entropy(out.hidden, output_head(model), out.tokens)[0]
        sums = torch.zeros(len(completions), dtype=torch.float32, device=logprobs.device)
        return sums.index_add(0, out.rows, logprobs.float()).view(-1, 2)

    @torch.no_grad()
    def _pair_logprobs(self, model, pairs: list[preferences.Pair]) -> torch.Tensor:
        """`_sequence_logprobs` of every pair, without gradient, on the CPU."""
        with self.autocast():
            parts = [self._sequence_logprobs(model, chunk).cpu() for chunk in self._pair_chunks(pairs)]
        return torch.cat(parts) if parts else torch.zeros(0, 2)

    def _preference_backward(self, step: int) -> dict[str, float]:
        """Backpropagate coef × the mean pairwise loss over step `step`'s pairs (cycling through
        the round's set); its metrics: `preference_loss` (the mean, before coef),
        `preference_accuracy` (share of pairs with log πθ/π_ref higher on the chosen completion),
        `chosen_logratio`, `rejected_logratio` (mean summed log πθ/π_ref), `preference_pairs`."""
        spec = self.preference
        assert spec is not None  # called for a preference run only
        pairs = preferences.batch(self.pairs, step, spec.pairs_per_step)
        sums: defaultdict[str, float] = defaultdict(float)
        for chunk in self._pair_chunks(pairs):
            with self._forward_with_grad():
                policy = self._sequence_logprobs(self.model, chunk)
            device = policy.device
            reference = torch.tensor([p.reference for p in chunk], device=device)
            anchor = torch.tensor([p.anchor for p in chunk], device=device) if spec.loss == "inpo" else None
            lengths = torch.tensor([[len(p.chosen), len(p.rejected)] for p in chunk], device=device)
            losses = preferences.pair_loss(spec, policy, reference, anchor, lengths)
            (spec.coef * losses.sum() / len(pairs)).backward()
            ratio = policy.detach() - reference
            sums["preference_loss"] += float(losses.detach().sum())
            sums["preference_accuracy"] += float((ratio[:, 0] > ratio[:, 1]).sum())
            sums["chosen_logratio"] += float(ratio[:, 0].sum())
            sums["rejected_logratio"] += float(ratio[:, 1].sum())
        return {**{k: v / len(pairs) for k, v in sums.items()}, "preference_pairs": len(self.pairs)}

    def _preference_update(self, step: int) -> dict:
        """A step on the pairs alone (no online objective trains: no rollouts)."""
        assert self.preference is not None  # called for a preference run only
        clock = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        stats: dict[str, Any] = self._preference_backward(step)
        reason = None if math.isfinite(stats["preference_loss"]) else "non-finite preference_loss"
        seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        reason, norm = self._optimizer_step(reason, [])
        stats.update(
            loss=self.preference.coef * stats["preference_loss"],
            grad_norm=math.nan if norm is None else norm,
            skipped_step=int(reason is not None),
            time_forward_backward=seconds,
            time_optimizer=time.perf_counter() - clock,
            reward_errors=0,
        )
        if reason is not None:
            stats["skip_reason"] = reason
        return stats

    def _stored_responses(self) -> tuple[list[stored.StoredGroup], set[int]]:
        """The stored responses split by pass rate (DPH-RL)."""
        return stored.split(self._sampled_once(), self.cfg.stored_solved, objectives.PASS_THRESHOLD)

    def _sampled_once(self) -> list[stored.StoredGroup]:
        """The initial policy's responses to the first `stored_prompts` training prompts, sampled
        once (at stored_temperature/stored_top_p) or read back from the run directory."""
        cfg = self.cfg
        groups = stored.load(self.run_dir) if cfg.resume else None
        if groups is None:
            answered = self._answer_once(
                self.task.train[: cfg.stored_prompts],
                cfg.stored_temperature or cfg.temperature,
                cfg.stored_top_p or cfg.top_p,
                torch.Generator().manual_seed(cfg.seed + 7),
                self.model,
                "initial policy",
            )
            groups = [stored.StoredGroup(i, g.completions, g.logprobs, g.rewards) for i, g in enumerate(answered)]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            stored.save(groups, self.run_dir)
        return groups

    def _answer_once(
        self,
        examples: list[Example],
        temperature: float,
        top_p: float,
        generator: torch.Generator,
        model,
        who: str,
        chunk: int = 16,
        samples: int | None = None,
    ) -> list[Group]:
        """`samples` (default stored_samples) scored answers of `model` to each example, `chunk`
        prompts at a time, with a progress bar (minutes on the default model)."""
        n, groups = samples or self.cfg.stored_samples, []
        starts = range(0, len(examples), chunk)
        for start in tqdm(
            starts,
            desc=f"{who}: {n} answers × {len(examples)} prompts",
            unit="chunk",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=len(starts) < 2,
        ):
            part = examples[start : start + chunk]
            rollout = self._sample(part, n, temperature, generator, top_p, model)
            rewards, _ = self._score(part, rollout.completion_ids, n)
            groups += split_groups(part, rollout, rewards)
        return groups

    def _load_frozen(self, key: str, spec: str, seed: int):
        """A frozen model from config key `key` (teacher, reference), stored and computing at the
        run's precision (`frozen_for`, `attention.use`); refused if its vocabulary differs from the policy's."""
        try:
            model, _ = load_model(spec, seed=seed, device=self.device)
        except ModelLoadError as err:
            raise ConfigError(f"config key '{key}': {err}") from None
        model.eval().requires_grad_(False)
        vocab, other = output_head(self.model).vocab_size, output_head(model).vocab_size
        if vocab != other:
            raise ConfigError(
                f"config key '{key}': '{spec}' has a vocabulary of {other} tokens, the "
                f"policy '{self.cfg.model}' {vocab}; a per-token divergence needs the "
                f"same vocabulary"
            )
        return self._at_precision(frozen_for(self.precision, model))

    def _adamw(self, params, **hyperparameters) -> torch.optim.AdamW:
        """AdamW with its fused kernel (one pass over every tensor, TRL's default
        `adamw_torch_fused`) on a CPU or CUDA device: a GRPO step of SmolLM2-135M on a 2-core
        AVX512-BF16 EPYC spent 0.035 s in it against 0.30 s in the per-tensor loop. FSDP's
        sharded weights keep the loop."""
        fused = self.device.type in ("cpu", "cuda") and not self.sharded
        return torch.optim.AdamW(params, fused=fused or None, **hyperparameters)

    def _at_precision(self, model: PreTrainedModel) -> PreTrainedModel:
        """`model` (in place) with its attention in the run's attention dtype under bf16 autocast
        (`divrl.attention`); at float32 there is no autocast, and SDPA is float32 as it is."""
        return attention.use(model, self.attention_dtype) if self.precision == "bf16" else model

    # ----- data -------------------------------------------------------------------------------
    def _prompt_ids(self, example: Example) -> list[int]:
        if example.prompt not in self._prompt_cache:
            self._prompt_cache[example.prompt] = encode_prompt(self.tokenizer, example.prompt, self.cfg.system_prompt)
        return self._prompt_cache[example.prompt]

    def _sample(
        self,
        examples: list[Example],
        group_size: int,
        temperature: float,
        generator: torch.Generator,
        top_p: float | None = None,
        model=None,
        prefixes: list[list[int]] | None = None,
    ):
        """G completions of each example; after its prompt's `prefixes` tokens (PrefixRL) if given."""
        prompts = [self._prompt_ids(e) for e in examples]
        if prefixes is not None:
            prompts = [p + prefix for p, prefix in zip(prompts, prefixes)]
        top_p = self.cfg.top_p if top_p is None else top_p
        if self.vllm is not None and (model is None or model is self.model):  # the policy's, from its engine
            return self.vllm.sample(
                prompts,
                group_size=group_size,
                max_new_tokens=self.cfg.max_new_tokens,
                stop_token_ids=self.stop_ids,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
            )
        with self.autocast():
            return sample(
                self.model if model is None else model,
                prompts,
                group_size=group_size,
                max_new_tokens=self.cfg.max_new_tokens,
                stop_token_ids=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
            )

    def _score(
        self, examples: list[Example], completions: list[list[int]], group_size: int
    ) -> tuple[list[float], Counter[str]]:
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return score_completions(self.verifier, texts, examples, group_size)

    # ----- the update -------------------------------------------------------------------------
    def _policy_weights(self) -> dict[str, torch.Tensor]:
        """The policy's state dict, full (a collective under FSDP: call on every rank)."""
        if not self.sharded:
            return self.model.state_dict()
        weights = sharding.full_weights(self.model)
        sharding.gather(self.model)
        return weights

    def _forward_with_grad(self) -> ExitStack:
        """The context of a policy forward a backward follows: the precision's autocast and, with
        `activation_checkpointing`, the blocks' activations recomputed in the backward."""
        stack = ExitStack()
        stack.enter_context(self.autocast())
        if self.cfg.activation_checkpointing:
            stack.enter_context(recompute.recomputed_activations(self.model))
        return stack

    def _head(self, model) -> Head:
        """The model's output head at the sampling temperature (every distribution of the
        objective is the temperature-T one the samples were drawn from, as TRL does)."""
        return output_head(model).at_temperature(self.cfg.temperature)

    def _frozen_inputs(
        self, prompts, completions, behaviour_logprobs, old_head, spec, monitor_kl: bool
    ) -> FrozenInputs:
        """Outputs of the models that carry no gradient, computed once per rollout batch: those
        `spec` reads, and the reference for the `kl` metric when `monitor_kl`."""
        cfg, pad = self.cfg, self.tokenizer.pad_token_id
        models, prompt_models, old_logprobs, cur = {}, {}, None, None
        read_at_tokens = objectives.models_read_at_tokens(spec)
        with_prompt = spec.reads_prompt_positions
        with torch.no_grad(), self.autocast():
            for name, model in (("reference", self.reference), ("teacher", self.teacher)):
                if model is not None and (name in spec.models() or (name == "reference" and monitor_kl)):
                    with lora.forward_of(model) as net:  # a LoRA policy's reference: its adapters off
                        out, head = completion_hidden(net, prompts, completions, pad, with_prompt), self._head(net)
                    at_tokens = (
                        chunked.logprob_entropy(out.hidden, head, out.tokens)
                        if name in read_at_tokens
                        else (None, None)
                    )
                    models[name] = ModelOutputs(out.hidden, head, *at_tokens)
                    if with_prompt:
                        assert out.prompt is not None  # computed with_prompt
                        prompt_models[name] = ModelOutputs(out.prompt.hidden, head)
            if behaviour_logprobs is not None and (cfg.top_p < 1.0 or cfg.offline):  # the sampler's log-probs
                old_logprobs = torch.tensor([lp for row in behaviour_logprobs for lp in row], device=self.device)
            # Without the sampler's log-probs, πold of inner iterations 2.. is the first iteration's
            # πθ, kept by `_update`; a forward here only when the targets or rewards need πold now.
            # (reward terms always: they are evaluated on this forward, even with the sampler's log-probs)
            if old_head is not None or spec.reward_terms:
                cur = completion_hidden(self.model, prompts, completions, pad)
                if old_logprobs is None:
                    old_logprobs = chunked.logprob_entropy(cur.hidden, self._head(self.model), cur.tokens)[0]
                if old_head is not None:
                    models["old"] = ModelOutputs(cur.hidden, old_head)
        return FrozenInputs(models, old_logprobs, cur, prompt_models)

    def _stored_inputs(self, groups: list[stored.StoredGroup], spec) -> list:
        """Micro-batches (prompts, completions, ObjectiveInputs without the policy) of stored groups."""
        cfg, per_micro = self.cfg, max(1, self.cfg.micro_batch_size // self.cfg.stored_samples)
        lengths = [len(c) for g in groups for c in g.completions]
        scale = objectives.token_scale(spec, lengths)
        out, first_token = [], 0
        for start in range(0, len(groups), per_micro):
            chunk = groups[start : start + per_micro]
            completions = [c for g in chunk for c in g.completions]
            n_tokens = sum(len(c) for c in completions)
            rewards = torch.tensor([r for g in chunk for r in g.rewards])
            passed = objectives.passed(rewards)
            fields = dict(
                advantages=torch.zeros(len(completions)),
                rewards=rewards,
                passed=passed,
                group_pass_rate=objectives.group_pass_rate(passed, cfg.stored_samples),
                token_scale=scale[first_token : first_token + n_tokens],
                stored_logprobs=torch.tensor([lp for g in chunk for row in g.logprobs for lp in row]),
            )
            fields = {key: value.to(self.device) for key, value in fields.items()}
            out.append(([self._prompt_ids(self.task.train[g.index]) for g in chunk], completions, fields))
            first_token += n_tokens
        return out

    def _update(
        self,
        prompts: list[list[int]],
        completions: list[list[int]],
        rewards: list[float],
        behaviour_logprobs: list[list[float]] | None,
        stored_groups: Sequence[stored.StoredGroup] = (),
        step: int = 0,
        objective=None,
        record: list[str] | None = None,
        reference_rewards: list[list[float]] | None = None,
        advantage_scale: list[float] | None = None,
    ) -> dict:
        """`inner_iterations` optimizer steps on the objective of one rollout batch (and of this
        step's stored responses, for stored terms), with annealed coefficients at `step`; another
        `objective` (behaviour cloning's) replaces the run's online one. `record` (the prompts'
        texts) writes the batch's per-token record for `divrl inspect` before the update;
        `behaviour_logprobs` are the sampler's (None: demonstrations', which have no sampler);
        `reference_rewards` (sorted, per prompt) calibrates and transforms the task reward;
        `advantage_scale` (per completion: RECAP's weight of its task) multiplies the advantages.

        A pass whose loss or gradient is non-finite takes no optimizer step, and the batch's later
        passes are dropped: `skipped_step` is 1 and `skip_reason` says what (`nonfinite_reason`)."""
        cfg, pad = self.cfg, self.tokenizer.pad_token_id
        spec = (objective or self.online_spec).at_step(step)
        stored_spec = None if self.stored_spec is None else self.stored_spec.at_step(step)
        group = len(completions) // len(prompts)
        lengths = [len(c) for c in completions]
        starts = [0, *itertools.accumulate(lengths)]
        scale = batch_scale = objectives.token_scale(spec, lengths)
        passed = objectives.passed(torch.tensor(rewards))  # the task's verdict, before any shaping
        pass_rate = objectives.group_pass_rate(passed, group)
        batch_pass_rate = float(passed.float().mean())
        n_batch, n_tokens_all = len(completions), sum(lengths)  # the whole batch's (all ranks')
        if self.world.parallel:  # data-parallel: normalizers and batch statistics over every rank's share
            everyone = distributed.all_gather_object((lengths, rewards))
            all_lengths = [n for ls, _ in everyone for n in ls]
            earlier = sum(len(ls) for ls, _ in everyone[: self.world.rank])  # completions of ranks < this one
            first_token = sum(all_lengths[:earlier])
            batch_scale = objectives.token_scale(spec, all_lengths)
            scale = batch_scale[first_token : first_token + sum(lengths)]
            batch_pass_rate = float(
                objectives.passed(torch.tensor([r for _, rs in everyone for r in rs])).float().mean()
            )
            n_batch, n_tokens_all = len(all_lengths), sum(all_lengths)
        shaping = objectives.overlong_penalty(spec, torch.tensor(lengths))
        task_reward = torch.tensor(rewards)
        if reference_rewards is not None:  # InfAlign-CTRL: exp(t · calibrated reward)
            assert self.calibration is not None  # reference rewards are sampled for a calibration only
            task_reward = transformed(task_reward, reference_rewards, self.calibration.t)
        reward_t = task_reward + shaping  # the return: task reward + overlong shaping (0 when off)
        spread = None
        if self.diversity_bonus is not None:  # DSDR: passing completions earn their clipped diversity
            spread = self._diversity(completions, group).clamp(0.0, self.diversity_bonus.clip)
            reward_t = reward_t + self.diversity_bonus.coef * spread * passed
        # Micro-batches of whole groups (a prompt's KV is computed once for its G completions).
        per_micro = cfg.micro_batch_size // group
        micro = []
        for first in range(0, len(prompts), per_micro):
            prompt_range = range(first, min(first + per_micro, len(prompts)))
            rows = torch.arange(prompt_range.start * group, prompt_range.stop * group)
            micro.append(
                (
                    [prompts[i] for i in prompt_range],
                    [completions[r] for r in rows],
                    rows,
                    slice(starts[rows[0]], starts[rows[-1] + 1]),
                )
            )
        # The behaviour policy as a distribution, when a target names it and the weights move
        # between inner iterations: a snapshot of the head (hidden states are cached below).
        old_head = None
        if "old" in spec.models() and cfg.inner_iterations > 1:
            head = self._head(self.model)
            old_head = dataclasses.replace(
                head,
                weight=head.weight.detach().clone(),
                bias=None if head.bias is None else head.bias.detach().clone(),
            )
        monitor_kl = step == 0 or (step + 1) % cfg.monitor_kl_every == 0  # `kl` when no term computes it
        clock = time.perf_counter()
        frozen = [
            self._frozen_inputs(
                ps,
                cs,
                None if behaviour_logprobs is None else [behaviour_logprobs[r] for r in rows],
                old_head,
                spec,
                monitor_kl,
            )
            for ps, cs, rows, _ in micro
        ]

        def inputs(
            m, hidden, tokens, token_rows, advantages, prompt: TokenBatch | None = None
        ) -> objectives.ObjectiveInputs:
            _, _, rows, tokens_slice = micro[m]
            device = hidden.device  # the per-completion bookkeeping lives on the CPU

            def of_rows(values: torch.Tensor) -> torch.Tensor:
                return values[rows].to(device)

            at_prompt = (
                None
                if prompt is None
                else objectives.PromptPositions(
                    ModelOutputs(prompt.hidden, self._head(self.model)),
                    frozen[m].prompt_models,
                    torch.full((len(prompt.tokens),), group, device=device),
                    float(batch_scale.mean()),
                )
            )
            return objectives.ObjectiveInputs(
                policy=ModelOutputs(hidden, self._head(self.model)),
                tokens=tokens,
                rows=token_rows,
                advantages=of_rows(advantages),
                rewards=of_rows(reward_t),
                group_pass_rate=of_rows(pass_rate),
                token_scale=scale[tokens_slice].to(device),
                old_logprobs=frozen[m].old_logprobs,
                models=frozen[m].models,
                batch_pass_rate=batch_pass_rate,
                passed=of_rows(passed),
                groups=(rows // group).to(device),
                entropy_anchor=self.entropy_anchor,
                batch_fraction=len(rows) / n_batch,
                diversity=None if spread is None else of_rows(spread),
                prompt=at_prompt,
                monitor_kl=monitor_kl,
            )

        penalty = None
        if spec.reward_terms:  # returns minus the reward-placed terms, at the behaviour policy
            penalty = torch.zeros(len(completions))
            zero = torch.zeros(len(completions))
            for m, (_, _, rows, _) in enumerate(micro):
                cur = frozen[m].current
                assert cur is not None  # _frozen_inputs computes it for reward terms
                with self.autocast():
                    penalty[rows] = objectives.reward_penalty(
                        spec, inputs(m, cur.hidden, cur.tokens, cur.rows, zero)
                    ).cpu()
        advantages = objectives.advantages(spec, reward_t, penalty, group, verdict=passed)
        if advantage_scale is not None:
            advantages = advantages * torch.tensor(advantage_scale, dtype=advantages.dtype)
        if record is not None:
            self._record_tokens(step + 1, record, prompts, completions, reward_t, advantages, passed)

        stored_micro = self._stored_inputs(list(stored_groups), stored_spec) if stored_groups else []
        sources: list[tuple[defaultdict[str, float], defaultdict[str, float]]] = [
            (defaultdict(float), defaultdict(float)) for _ in range(2)
        ]  # online, stored
        grad_norms = []
        seconds = {"time_frozen": time.perf_counter() - clock, "time_forward_backward": 0.0, "time_optimizer": 0.0}

        def accumulate(source, out):
            for sums, new in zip(source, (out.token_sums, out.loss_parts)):
                for key, value in new.items():
                    sums[key] += value

        reason, passes, preference_stats = None, 0, {}
        while reason is None and passes < cfg.inner_iterations:
            clock, passes, outputs = time.perf_counter(), passes + 1, []
            self.optimizer.zero_grad(set_to_none=True)
            try:
                with casts_kept():  # each weight cast once per pass, not once per micro-batch
                    for m, (ps, cs, _, _) in enumerate(micro):
                        with self._forward_with_grad():
                            cur = completion_hidden(self.model, ps, cs, pad, spec.reads_prompt_positions)
                            out = objectives.objective_loss(
                                spec, inputs(m, cur.hidden, cur.tokens, cur.rows, advantages, cur.prompt)
                            )
                        out.loss.backward()
                        accumulate(sources[0], out)
                        outputs.append((spec, out))
                        if frozen[m].old_logprobs is None and cfg.inner_iterations > 1:  # πold: πθ before the update
                            frozen[m].old_logprobs = out.logprobs
                    for ps, cs, fields in stored_micro:
                        assert stored_spec is not None  # stored groups exist only with stored terms
                        with self._forward_with_grad():
                            cur = completion_hidden(self.model, ps, cs, pad)
                            out = objectives.objective_loss(
                                stored_spec,
                                objectives.ObjectiveInputs(
                                    policy=ModelOutputs(cur.hidden, self._head(self.model)),
                                    tokens=cur.tokens,
                                    rows=cur.rows,
                                    **fields,
                                ),
                            )
                        out.loss.backward()
                        accumulate(sources[1], out)
                        outputs.append((stored_spec, out))
                    if self.pairs:  # a preference loss beside the online objective (HyPO)
                        preference_stats = self._preference_backward(step)
                        if not math.isfinite(preference_stats["preference_loss"]):
                            reason = "non-finite preference_loss"
            except objectives.NaNObjectiveError as err:  # NaN inputs: skipped like a +inf loss
                reason = str(err)
            seconds["time_forward_backward"] += time.perf_counter() - clock
            clock = time.perf_counter()
            reason, norm = self._optimizer_step(reason, outputs)
            if norm is not None:
                grad_norms.append(norm)
            seconds["time_optimizer"] += time.perf_counter() - clock
        n_stored = sum(len(c) for _, cs, _ in stored_micro for c in cs)
        online: tuple[dict[str, float], dict[str, float], int] = (sources[0][0], sources[0][1], sum(lengths))
        if self.world.parallel:  # the objective's sums over every rank's tokens
            shares = distributed.all_gather_object((dict(sources[0][0]), dict(sources[0][1])))
            online = (
                distributed.sum_dicts([token_sums for token_sums, _ in shares]),
                distributed.sum_dicts([loss_parts for _, loss_parts in shares]),
                n_tokens_all,
            )
        stats: dict[str, Any] = objectives.summarize([online, (*sources[1], n_stored)], passes)
        if preference_stats:
            assert self.preference is not None  # pairs exist in a preference run only
            stats.update(preference_stats)
            stats["loss"] = stats.get("loss", 0.0) + self.preference.coef * preference_stats["preference_loss"]
        stats["skipped_step"] = int(reason is not None)
        if reason is not None:
            stats["skip_reason"] = reason
        if spec.overlong_buffer:
            stats["overlong_penalty"] = float(shaping.mean())
            if self.world.parallel:
                stats["overlong_penalty"] = float(objectives.overlong_penalty(spec, torch.tensor(all_lengths)).mean())
        if reference_rewards is not None:
            stats["transformed_reward"] = float(task_reward.mean())
        if spread is not None:
            if self.world.parallel:
                spreads = distributed.all_gather_object((spread.tolist(), passed.tolist()))
                spread = torch.tensor([d for ds, _ in spreads for d in ds])
                passed = torch.tensor([p for _, ps in spreads for p in ps])
            stats["diversity"] = float(spread.mean())
            stats["diversity_of_passes"] = float(spread[passed].mean()) if passed.any() else math.nan
        stats["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        stats.update(seconds)
        stats.update((f"{t.name}_coef", t.coef_at(step)) for t in self.objective.terms if t.anneal)
        if spec.entropy_anchor is not None:
            if self.entropy_anchor is None and reason is None:  # H₀: the first good batch's, then fixed
                self.entropy_anchor = stats["top_p_entropy"]
            stats["entropy_anchor_h0"] = self.entropy_anchor
        return stats

    def _optimizer_step(
        self, reason: str | None, outputs: list[tuple[ObjectiveSpec, objectives.ObjectiveOutput]]
    ) -> tuple[str | None, float | None]:
        """Clip and apply the accumulated gradients, or skip the step: `reason` (a non-finite loss
        found already), or one `nonfinite_reason` finds; returns (reason, gradient norm if computed).
        Data-parallel: every rank skips, or none does; the gradients are summed first."""
        if self.world.parallel:
            reason = distributed.agree(reason)
            if self.sharded:  # always: it also clears the gradients a skipped step leaves behind
                sharding.reduce_gradients(self.model)
            elif reason is None:
                distributed.all_reduce_grads(self.model)
        norm = None
        if reason is None:
            norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.cfg.max_grad_norm or float("inf")
            ).item()
            reason = nonfinite_reason(outputs, norm)
            if self.world.parallel:
                reason = distributed.agree(reason)
        if reason is None:
            self.optimizer.step()
            if self.vllm is not None:
                self.vllm.stale = True
        # The gradients are spent either way (a skipped step takes no later pass): freed, so the
        # rollout and frozen passes before the next backward do not hold a model-sized buffer.
        self.optimizer.zero_grad(set_to_none=True)
        if self.sharded:
            sharding.gather(self.model)
        return reason, norm

    def _reference_rewards(self, examples: list[Example]) -> list[list[float]]:
        """Each prompt's K reference rewards, sorted (InfAlign's calibration set): sampled from the
        reference at the training temperature the first time the prompt is seen, then reused."""
        new = [e for e in dict.fromkeys(e.prompt for e in examples) if e not in self.reference_rewards]
        if new:
            fresh = [next(e for e in examples if e.prompt == p) for p in new]
            assert self.calibration is not None  # called for a reward calibration only
            k = self.calibration.samples
            with lora.forward_of(self.reference) as reference:
                rollout = self._sample(fresh, k, self.cfg.temperature, self.generator, model=reference)
            rewards, _ = self._score(fresh, rollout.completion_ids, k)
            for i, e in enumerate(fresh):
                self.reference_rewards[e.prompt] = sorted(rewards[i * k : (i + 1) * k])
        return [self.reference_rewards[e.prompt] for e in examples]

    @torch.no_grad()
    def _record_tokens(
        self,
        step: int,
        prompt_texts: list[str],
        prompts: list[list[int]],
        completions: list[list[int]],
        rewards: torch.Tensor,
        advantages: torch.Tensor,
        passed: torch.Tensor,
    ) -> None:
        """inspect/step-N.json: each completion of the batch with, per token, its text, the entropy
        of the sampling distribution and the exact KL(πθ ‖ π_ref) (π_T without a reference), at
        the temperature-T distributions of the objective, by the policy that sampled it."""
        pad, group = self.tokenizer.pad_token_id, len(completions) // len(prompts)
        other, label = (
            (self.reference, "KL(πθ ‖ π_ref)")
            if self.reference is not None
            else (self.teacher, "KL(πθ ‖ π_T)")
            if self.teacher is not None
            else (None, None)
        )
        with self.autocast():
            policy = completion_hidden(self.model, prompts, completions, pad)
            head = self._head(self.model)
            _, entropy = chunked.logprob_entropy(policy.hidden, head, policy.tokens)
            divergence = None
            if other is not None:
                with lora.forward_of(other) as net:
                    target = completion_hidden(net, prompts, completions, pad)
                    divergence = chunked.divergence("reverse_kl", policy.hidden, head, target.hidden, self._head(net))
        starts = [0, *itertools.accumulate(len(c) for c in completions)]
        per_row = lambda values, r: [round(float(v), 5) for v in values[starts[r] : starts[r + 1]]]  # noqa: E731
        samples = [
            {
                "prompt": prompt_texts[r // group],
                "completion": self.tokenizer.decode(c, skip_special_tokens=True),
                "reward": float(rewards[r]),
                "passed": bool(passed[r]),
                "advantage": float(advantages[r]),
                "tokens": [self.tokenizer.decode([t]) for t in c],
                "entropy": per_row(entropy, r),
                "divergence": None if divergence is None else per_row(divergence, r),
            }
            for r, c in enumerate(completions)
        ]
        write_text_atomically(
            self.run_dir / "inspect" / f"step-{step}.json",
            json.dumps({"step": step, "divergence": label, "samples": samples}),
        )

    def _diversity(self, completions: list[list[int]], group: int) -> torch.Tensor:
        """DSDR's global diversity d (B,) of each completion within its group (`divrl.diversity`)."""
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        assert self.encoder is not None  # loaded with the diversity bonus, which alone calls this
        embeddings = self.encoder.embed(texts)
        return torch.cat(
            [
                diversity.diversity_scores(texts[i : i + group], embeddings[i : i + group])
                for i in range(0, len(texts), group)
            ]
        ).float()

    # ----- evaluation -------------------------------------------------------------------------
    def evaluate(self, chunk: int = 16) -> dict:
        """Held-out pass@1 and pass@n (n = eval_samples) with standard errors over prompts, and a
        mixture's pass@1 per task (eval_pass@1/<task>, eval_pass@1_se/<task>). The same sampling seed each time, so
        before/after differences are not sampling noise."""
        cfg, n = self.cfg, self.cfg.eval_samples
        generator = torch.Generator().manual_seed(cfg.eval_seed)
        counts = []
        for start in range(0, len(self.task.eval), chunk):
            examples = self.task.eval[start : start + chunk]
            rollout = self._sample(examples, n, cfg.eval_temperature, generator)
            rewards, _ = self._score(examples, rollout.completion_ids, n)
            counts += [sum(passes(r) for r in rewards[i * n : (i + 1) * n]) for i in range(len(examples))]
        p1, p1_se = pass_at_k_over_prompts(counts, n, 1)
        pk, pk_se = pass_at_k_over_prompts(counts, n, n)
        members: dict[str, list[int]] = defaultdict(list)  # a mixture's pass counts per task
        for example, count in zip(self.task.eval, counts):
            if example.task is not None:
                members[example.task].append(count)
        return {
            "eval_pass@1": p1,
            "eval_pass@1_se": p1_se,
            f"eval_pass@{n}": pk,
            f"eval_pass@{n}_se": pk_se,
            "eval_prompts": len(counts),
            "eval_samples": n,
            **{
                key: value
                for name, c in members.items()
                for key, value in zip(
                    (f"eval_pass@1/{name}", f"eval_pass@1_se/{name}"), pass_at_k_over_prompts(c, n, 1)
                )
            },
        }

    # ----- the loop ---------------------------------------------------------------------------
    def _unsolved_greedily(self, examples: list[Example]) -> list[Example]:
        """`prompt_filter: greedy_unsolved` (SELF, "The Reasoning Boundary Paradox", arXiv
        2510.02230; official code mail-research/SELF-llm-interference, `RayMaxPPOTrainer.fit`):
        the current policy answers each prompt once greedily, and only the prompts it gets wrong
        are trained on — the low-likelihood problems, whose correct solutions the greedy (most
        likely) answer misses. `none` keeps every prompt."""
        if self.cfg.prompt_filter == "none" or not examples:
            return examples
        rollout = self._sample(examples, 1, 0.0, self.generator)  # greedy: draws no random numbers
        rewards, _ = self._score(examples, rollout.completion_ids, 1)
        return [e for e, r in zip(examples, rewards) if not passes(r)]

    def _collect(self, step: int) -> tuple[list[Group], dict]:
        """Sample and score the step's prompts (those `prompt_filter` keeps; after an off-policy
        prefix or with hints, `_rollout_groups`); with dynamic sampling, drop the groups with equal
        rewards and refill with fresh prompts (at most `max_refills` extra rounds). A KnowRL search's
        groups other than the selected subset's are left out of `reward` and `pass_rate`."""
        cfg = self.cfg
        offered = self.prompts.batch(step, cfg.prompts_per_step)
        if self.world.parallel:
            return self._collect_shard(offered)
        examples = self._unsolved_greedily(offered)
        kept, sampled, every, refills, n_offered = [], [], [], 0, len(offered)
        errors: Counter[str] = Counter()
        while True:
            if examples:
                groups, searched, round_errors = self._rollout_groups(examples, f"{cfg.seed}:{step}:{refills}")
                errors += round_errors
                sampled += groups
                every += searched
                kept += [g for g in groups if g.informative or not cfg.dynamic_sampling]
            if len(kept) >= cfg.prompts_per_step or not cfg.dynamic_sampling or refills == cfg.max_refills:
                break
            refills += 1
            offered = self.prompts.refill(step, refills, cfg.prompts_per_step - len(kept))
            examples, n_offered = self._unsolved_greedily(offered), n_offered + len(offered)
        self.prompts.observe(
            [g.example for g in sampled], [sum(passes(r) for r in g.rewards) / len(g.rewards) for g in sampled]
        )
        stats = _rollout_stats(sampled, errors)
        if self.prefix_buffer is not None:
            stats.update(_prefix_stats(sampled, self.prefix_buffer))
        if self.hint_spec is not None:
            stats.update(_hint_stats(sampled, every, self.knowledge, self.hint_choice))
        if cfg.dynamic_sampling:  # refills ask for the missing count only: kept ≤ prompts_per_step
            stats.update(refills=refills, dropped_groups=len(sampled) - len(kept), trained_groups=len(kept))
        if cfg.prompt_filter != "none":
            stats.update(filtered_prompts=n_offered - len(sampled), trained_prompts=len(kept))
        return kept, stats

    def _rollout_groups(self, examples: list[Example], key: str) -> tuple[list[Group], list[Group], Counter[str]]:
        """(a group of G scored completions for each example, every group sampled, the verifier's
        failures). PrefixRL: some continue an off-policy prefix of a correct trace (drawn from the
        stream seeded by `key`) and are scored as prefix + continuation; the unprefixed groups'
        passing completions then join the buffer. KnowRL: `_hinted_groups`."""
        if self.hint_spec is not None:
            return self._hinted_groups(examples)
        cfg, g = self.cfg, self.cfg.group_size
        prefixes = (
            [[] for _ in examples]
            if self.prefix_spec is None or self.prefix_buffer is None
            else choose_prefixes(self.prefix_spec, self.prefix_buffer, [e.prompt for e in examples], f"{key}:prefix")
        )
        rollout = self._sample(examples, g, cfg.temperature, self.generator, prefixes=prefixes)
        answers = [prefixes[i // g] + c for i, c in enumerate(rollout.completion_ids)]
        rewards, errors = self._score(examples, answers, g)
        groups = split_groups(examples, rollout, rewards, prefixes)
        if self.prefix_buffer is not None:
            self._remember_traces(groups)
        return groups, groups, errors

    def _hinted_groups(self, examples: list[Example]) -> tuple[list[Group], list[Group], Counter[str]]:
        """KnowRL: each example sampled with its selected knowledge points. A prompt drawn for the
        first time is searched (`divrl.hints.subset_search`; every prompt's requests of a round are
        sampled in one batch) and its group of the selected subset is the one returned; the search's
        other groups are returned as sampled only."""
        assert self.hint_spec is not None
        cfg, g = self.cfg, self.cfg.group_size
        searches: dict[int, Search] = {}
        requests: dict[int, list[Subset]] = {}
        selected: dict[int, Subset] = {}
        for i, e in enumerate(examples):
            if e.prompt in self.hint_choice:
                selected[i] = self.hint_choice[e.prompt]
                requests[i] = [selected[i]]
            else:
                searches[i] = subset_search(len(self.knowledge[e.prompt]), self.hint_spec.joint_evaluations)
                requests[i] = next(searches[i])
        latest: dict[tuple[int, Subset], Group] = {}
        sampled: list[Group] = []
        errors: Counter[str] = Counter()
        while requests:
            pairs = [(i, subset) for i, subsets in requests.items() for subset in subsets]
            hinted = [
                dataclasses.replace(
                    examples[i],
                    prompt=hinted_prompt(examples[i].prompt, [self.knowledge[examples[i].prompt][k] for k in subset]),
                )
                for i, subset in pairs
            ]
            rollout = self._sample(hinted, g, cfg.temperature, self.generator)
            rewards, round_errors = self._score(hinted, rollout.completion_ids, g)
            errors += round_errors
            rates: defaultdict[int, list[float]] = defaultdict(list)
            for (i, subset), group in zip(pairs, split_groups([examples[i] for i, _ in pairs], rollout, rewards)):
                group.hints = subset
                latest[i, subset] = group
                sampled.append(group)
                rates[i].append(_pass_rate([group]))
            pending = {}
            for i in requests:
                if i in searches:
                    try:
                        pending[i] = searches[i].send(rates[i])
                    except StopIteration as done:
                        selected[i] = self.hint_choice[examples[i].prompt] = done.value
            requests = pending
        return [latest[i, selected[i]] for i in range(len(examples))], sampled, errors

    def _collect_shard(self, offered: list[Example]) -> tuple[list[Group], dict]:
        """Data-parallel `_collect` (`divrl.distributed`): this rank samples and scores its
        contiguous block of the step's prompts; the prompt source observes every group's pass rate
        and the statistics describe the whole batch (gathered from all ranks, in batch order)."""
        cfg = self.cfg
        examples = distributed.shard(offered, self.world)
        rollout = self._sample(examples, cfg.group_size, cfg.temperature, self.generator)
        rewards, errors = self._score(examples, rollout.completion_ids, cfg.group_size)
        groups = split_groups(examples, rollout, rewards)
        mine = [(g.rewards, [len(c) for c in g.completions], g.finished) for g in groups]
        gathered = distributed.all_gather_object((mine, dict(errors)))
        everyone = [
            Group(e, [], [[0] * n for n in lengths], [], finished, rewards)
            for e, (rewards, lengths, finished) in zip(offered, (g for part, _ in gathered for g in part))
        ]
        self.prompts.observe(offered, [sum(passes(r) for r in g.rewards) / len(g.rewards) for g in everyone])
        return groups, _rollout_stats(everyone, sum((Counter(e) for _, e in gathered), Counter()))

    def _offline_batch(self, step: int) -> tuple[list[Group], dict]:
        """Step `step`'s stored groups (offline: in turn, no generation)."""
        chosen = stored.batch(self.offline_groups, step, self.cfg.prompts_per_step)
        examples = [self.task.train[g.index] if g.prompt is None else Example(g.prompt, "") for g in chosen]
        groups = [
            Group(
                example=e,
                prompt_ids=self._prompt_ids(e),
                completions=g.completions,
                logprobs=g.logprobs,
                finished=[],
                rewards=g.rewards,
            )
            for e, g in zip(examples, chosen)
        ]
        rewards = [r for g in chosen for r in g.rewards]
        lengths = [len(c) for g in chosen for c in g.completions]
        return groups, {
            "reward": sum(rewards) / len(rewards),
            "pass_rate": sum(passes(r) for r in rewards) / len(rewards),
            "completion_length": sum(lengths) / len(lengths),
            "reward_errors": 0,
        }

    def train_step(self, step: int) -> dict:
        """One step; `reward`, `pass_rate` and lengths describe every sampled completion (with
        dynamic sampling, the dropped groups too)."""
        t0 = time.perf_counter()
        spec = self.preference
        if spec is not None and spec.round_steps and self.pairs_round != step // spec.round_steps:
            self._preference_round(step // spec.round_steps)  # INPO: the round's pairs, from π_t
        pairs_only = spec is not None and not self.online  # no online objective: no rollouts
        groups: list[Group] = []
        stats: dict[str, Any] = {"reward_errors": 0}
        if not pairs_only:
            groups, stats = self._offline_batch(step) if self.cfg.offline else self._collect(step)
        self.reward_errors += stats["reward_errors"]
        scale = None
        if self.reweighting is not None:  # RECAP: this step's rewards in the series, then λ
            names = [n for n in self.reweighting.series if f"reward/{n}" in stats]
            weights = self.reweighting.observe({n: stats[f"reward/{n}"] for n in names})
            stats.update((f"recap_weight/{n}", w) for n, w in weights.items())
            scale = [weights[str(g.example.task)] for g in groups for _ in g.completions]
        t1 = time.perf_counter()
        if pairs_only and self.pairs:
            stats.update(self._preference_update(step))
            self._count_skipped(step, stats)
        elif pairs_only:
            self.log(f"step {step + 1}: round {self.pairs_round} has no preference pair; update skipped")
        elif groups:
            every = self.cfg.inspect_every
            demonstrations = self.cfg.offline and self.cfg.offline_data == "demonstrations"  # no sampler
            record = [g.example.prompt for g in groups] if every and (step + 1) % every == 0 else None
            record = record if self.world.main else None  # data-parallel: rank 0's share is recorded
            calibration = None if self.calibration is None else self._reference_rewards([g.example for g in groups])
            stats.update(
                self._update(
                    [g.prompt_ids for g in groups],
                    [c for g in groups for c in g.completions],
                    [r for g in groups for r in g.rewards],
                    None if demonstrations else [lp for g in groups for lp in g.logprobs],
                    stored.batch(self.stored_groups, step, self.cfg.stored_per_step),
                    step,
                    record=record,
                    reference_rewards=calibration,
                    advantage_scale=scale,
                )
            )
            self._count_skipped(step, stats)
        else:  # nothing to learn from: every prompt filtered out, or equal rewards after the refills
            self.log(
                f"step {step + 1}: no prompt left to train on ({', '.join(f'{k} {stats[k]}' for k in ('refills', 'filtered_prompts') if k in stats)}); update skipped"
            )
        t2 = time.perf_counter()
        if self.stage is not None:
            stats["stage"] = self.stage
        return {
            **stats,
            "reward_errors_total": self.reward_errors,
            "time_rollout": t1 - t0,
            "time_update": t2 - t1,
            "time_step": t2 - t0,
        }

    def _resume(self) -> tuple[int, dict | None]:
        """Restore the newest intact checkpoint (`divrl.checkpoint.latest_checkpoint`: newer broken
        ones are skipped with a warning naming them, leftovers of interrupted writes removed);
        returns its step and the before-training evaluation, or (0, None) where the run has no
        checkpoint yet (it starts over; a two-stage run may stop in its first stage)."""
        cfg, run_dir = self.cfg, self.run_dir
        found, problem = None, None
        if self.world.main:  # data-parallel: rank 0 cleans up and chooses; every rank loads its choice
            for partial in remove_partial_writes(run_dir):
                self.log(f"removed {partial}: an interrupted checkpoint write (never loaded)")
            found = latest_checkpoint(run_dir, warn=lambda message: self.log(f"warning: {message}"))
            for broken in [] if found is None else set_aside_newer(run_dir, found[0]):
                self.log(f"set aside {broken}: not intact, so never loaded, pruned or overwritten")
            if found is None and checkpoint_dirs(run_dir):
                problem = (
                    f"config key 'resume': no checkpoint in {run_dir / 'checkpoints'} is intact "
                    f"(each skipped above); choose another output_dir to start over"
                )
        if self.world.parallel:
            found, problem = distributed.broadcast_object((found, problem))
        if problem is not None:
            raise ConfigError(problem)
        if found is None:
            self.log(f"{run_dir} has no checkpoint yet: starting over")
            return 0, None
        _, path = found
        state = load_checkpoint(path, self.model, self.optimizer, self.generator)
        if self.sharded:
            sharding.gather(self.model)
        if self.vllm is not None:
            self.vllm.stale = True
        self.step = state["step"]
        if not self.world.main:  # rank R's own sampling stream, else a fresh one (another world size)
            rank_rng = path / f"rng-rank-{self.world.rank}.pt"
            if rank_rng.is_file():
                self.generator.set_state(torch.load(rank_rng, weights_only=True))
            else:
                self.generator.manual_seed(distributed.rank_seed(cfg.seed, self.world.rank, self.step))
        if cfg.reference_refresh_every and self.step < cfg.steps:  # a finished run reads no reference
            if self.step % cfg.reference_refresh_every:
                raise ConfigError(
                    f"config key 'reference_refresh_every': the checkpoint {path} (step "
                    f"{self.step}) is not at a refresh of the reference (every "
                    f"{cfg.reference_refresh_every} steps); resume from one that is"
                )
            if self.reference is not None:  # none is loaded when nothing reads it
                self.reference.load_state_dict(self._policy_weights())
        self.prompts.load_state_dict(state["prompt_source"])
        self.entropy_anchor = state["entropy_anchor"]
        self.reference_rewards = state["reference_rewards"]
        self.reward_errors = state["reward_errors"]
        self.skipped_steps = [(step, reason) for step, reason in state["skipped_steps"]]
        if self.reweighting is not None and state.get("reweighting"):  # absent: a run without it
            self.reweighting.load_state_dict(state["reweighting"])
        if self.prefix_buffer is not None:  # absent from a checkpoint of a run without PrefixRL
            self.prefix_buffer.load_state_dict(state.get("prefix_buffer") or {})
        self.hint_choice = {prompt: tuple(s) for prompt, s in (state.get("hint_selections") or {}).items()}
        self.log(f"resumed from {path} (step {self.step})")
        return self.step, state["before"]

    def _trainer_state(self, before: dict) -> dict:
        """What a checkpoint holds beyond weights, optimizer and RNGs (JSON-able): everything else
        the next steps' metrics depend on, so a resumed run repeats an uninterrupted one."""
        return {
            "prompt_source": self.prompts.state_dict(),
            "entropy_anchor": self.entropy_anchor,
            "reference_rewards": self.reference_rewards,
            "reward_errors": self.reward_errors,
            "skipped_steps": self.skipped_steps,
            "reweighting": None if self.reweighting is None else self.reweighting.state_dict(),
            "prefix_buffer": None if self.prefix_buffer is None else self.prefix_buffer.state_dict(),
            "hint_selections": {prompt: list(subset) for prompt, subset in self.hint_choice.items()},
            "before": before,
        }

    def _count_skipped(self, step: int, stats: dict) -> None:
        """Log a skipped update (`_update`) and raise NonFiniteError at `max_skipped_steps` in a row;
        a good step resets the count. A skipped optimizer step changes neither weights nor optimizer
        state, and `run` writes a checkpoint only after a step returns, so every checkpoint holds the
        result of finite updates only."""
        if not stats["skipped_step"]:
            self.skipped_steps.clear()
            return
        self.skipped_steps.append((step + 1, stats["skip_reason"]))
        limit = self.cfg.max_skipped_steps
        self.log(
            f"step {step + 1}: optimizer step skipped, {stats['skip_reason']}; it changed no weight "
            f"or optimizer state ({len(self.skipped_steps)} in a row; max_skipped_steps {limit})"
        )
        if len(self.skipped_steps) < limit:
            return
        found = checkpoint_dirs(self.run_dir)
        where = (
            f"the last checkpoint, {found[-1][1]}, is intact and holds the weights of finite updates "
            f"only (a skipped step changes none)"
            if found
            else "no checkpoint was written yet"
        )
        raise NonFiniteError(
            f"{limit} consecutive steps (max_skipped_steps) had a non-finite loss or gradient and were "
            f"skipped: {'; '.join(f'step {s}: {r}' for s, r in self.skipped_steps)}. Training stopped; "
            f"{where}. Fix the named part (its target, weight or coef; or lower lr), then continue "
            f"with --set resume=true"
        )

    def run(self) -> dict:
        cfg, run_dir, main = self.cfg, self.run_dir, self.world.main
        if main:  # data-parallel: rank 0 alone writes to output_dir (`divrl.distributed`)
            run_dir.mkdir(parents=True, exist_ok=True)
        start_step, before = self._resume() if cfg.resume else (0, None)
        if main:
            save_config(cfg, run_dir / "config.yaml")
        log = MetricsLog(run_dir, resume_step=start_step if cfg.resume else None) if main else NullLog()
        wall0 = time.perf_counter()
        try:
            if before is None:
                if main:  # data-parallel: evaluations run on rank 0, the others wait
                    self.log(f"evaluating before training on {len(self.task.eval)} held-out prompts …")
                    before = self.evaluate()
                    log.log(0, {**before, "overlong_prompts": self.overlong_prompts})
                    self.log(_fmt_eval("before", before))
                if self.world.parallel:
                    before = distributed.broadcast_object(before)
            bar = tqdm(
                range(start_step, cfg.steps),
                initial=start_step,
                total=cfg.steps,
                desc="train",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                disable=not main,
            )
            for step in bar:
                metrics = self.train_step(step)
                self.step = step + 1
                refresh = cfg.reference_refresh_every and self.step % cfg.reference_refresh_every == 0
                if refresh and self.reference is not None:  # none is loaded when nothing reads it
                    self.reference.load_state_dict(self._policy_weights())  # the "previous epoch"
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps and main:
                    metrics.update(self.evaluate())
                log.log(self.step, metrics)
                bar.set_postfix(
                    reward=f"{metrics.get('reward', math.nan):.3f}",
                    kl=f"{metrics.get('kl', math.nan):.4f}",
                    ent=f"{metrics.get('entropy', math.nan):.3f}",
                    s=f"{metrics['time_step']:.1f}",
                )
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    # data-parallel: written once, by rank 0, with every rank's sampling generator
                    rank_generators = (
                        distributed.all_gather_object(self.generator.get_state())[1:] if self.world.parallel else []
                    )
                    full_state = None
                    if self.sharded:  # FSDP: every rank gathers the full tensors, rank 0 writes them
                        full_state = (
                            sharding.full_weights(self.model),
                            sharding.full_optimizer_state(self.optimizer),
                        )
                        sharding.gather(self.model)
                    if main:
                        assert before is not None  # rank 0 evaluated (or resumed) it above
                        save_checkpoint(
                            run_dir,
                            self.step,
                            self.model,
                            self.tokenizer,
                            self.optimizer,
                            self.generator,
                            cfg.keep_checkpoints,
                            self._trainer_state(before),
                            rank_generators=rank_generators,
                            full_state=full_state,
                        )
            bar.close()
            after = self.evaluate() if main else {}
            if self.world.parallel:
                after = distributed.broadcast_object(after)
            log.log(cfg.steps, after)
            self.log(_fmt_eval("after", after))
        except KeyboardInterrupt:
            done = checkpoint_dirs(run_dir)
            where = f"the last checkpoint is {done[-1][1]}" if done else "no checkpoint was written yet"
            self.log(f"\ninterrupted at step {self.step}; {where}; continue with --set resume=true")
            raise
        finally:
            log.close()
            self.verifier.close()  # its worker processes, if any
        summary = {"before": before, "after": after, "train_seconds": time.perf_counter() - wall0}
        if main:
            write_report(run_dir, cfg, summary)
            self.log(f"wrote {run_dir / 'report.md'} and {run_dir / 'curves.png'}")
        return summary


def _rollout_stats(sampled: list[Group], errors: Counter[str]) -> dict:
    """Reward, pass rate, completion length, truncated fraction and verifier failures of a step's
    sampled groups; in a mixture also reward/<task> and pass_rate/<task> of each member sampled."""
    rewards = [r for g in sampled for r in g.rewards]
    lengths = [len(c) for g in sampled for c in g.completions]
    finished = [f for g in sampled for f in g.finished]
    mean = (lambda xs: sum(xs) / len(xs)) if rewards else (lambda xs: math.nan)
    stats = {
        "reward": mean(rewards),
        "pass_rate": mean([float(passes(r)) for r in rewards]),
        "completion_length": mean(lengths),
        "truncated_fraction": 1 - mean(finished),
        "reward_errors": errors.total(),
        "reward_timeouts": errors[TIMEOUT],
        "reward_crashes": errors[CRASH],
    }
    for name in dict.fromkeys(g.example.task for g in sampled if g.example.task is not None):
        mine = [r for g in sampled if g.example.task == name for r in g.rewards]
        stats[f"reward/{name}"] = sum(mine) / len(mine)
        stats[f"pass_rate/{name}"] = sum(map(passes, mine)) / len(mine)
    return stats


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _pass_rate(groups: list[Group]) -> float:
    """The share of the groups' completions that pass (NaN for none)."""
    return _mean([float(passes(r)) for g in groups for r in g.rewards])


def _prefix_stats(sampled: list[Group], buffer: TraceBuffer) -> dict:
    """PrefixRL's moving parts over a step's sampled groups: the share prefixed, the prefix's mean
    length (tokens) and share of the scored answer (prefix + continuation), the pass rates with and
    without a prefix, and the buffer's size after the step."""
    prefixed = [g for g in sampled if g.prefix]
    return {
        "prefixed_groups": _mean([float(bool(g.prefix)) for g in sampled]),
        "prefix_length": _mean([len(g.prefix) for g in prefixed]),
        "prefix_fraction": _mean([len(g.prefix) / (len(g.prefix) + len(c)) for g in prefixed for c in g.completions]),
        "pass_rate_prefixed": _pass_rate(prefixed),
        "pass_rate_unprefixed": _pass_rate([g for g in sampled if not g.prefix]),
        "prefix_buffer_traces": len(buffer),
        "prefix_buffer_prompts": len(buffer.traces),
    }


def _hint_stats(
    trained: list[Group], sampled: list[Group], knowledge: dict[str, list[str]], choices: dict[str, Subset]
) -> dict:
    """KnowRL's moving parts: KPs selected and available per trained prompt, the share of trained
    groups with hints, the pass rates of every group sampled this step without and with hints
    (searches included), the extra groups the searches sampled and the prompts selected so far."""
    return {
        "hints_per_prompt": _mean([len(g.hints) for g in trained]),
        "knowledge_points": _mean([len(knowledge[g.example.prompt]) for g in trained]),
        "hinted_groups": _mean([float(bool(g.hints)) for g in trained]),
        "pass_rate_without_hints": _pass_rate([g for g in sampled if not g.hints]),
        "pass_rate_with_hints": _pass_rate([g for g in sampled if g.hints]),
        "hint_search_groups": len(sampled) - len(trained),
        "hint_selections": len(choices),
    }


def _fmt_eval(label: str, ev: dict) -> str:
    n = ev["eval_samples"]
    return (
        f"{label}: held-out pass@1 = {ev['eval_pass@1']:.3f} ± {ev['eval_pass@1_se']:.3f}, "
        f"pass@{n} = {ev[f'eval_pass@{n}']:.3f} ± {ev[f'eval_pass@{n}_se']:.3f} "
        f"({ev['eval_prompts']} prompts × {n} samples, ± = standard error)"
    )
