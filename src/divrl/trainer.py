"""The GRPO loop: rollout → score → advantages → clipped PG + divergence penalty → step.

One step samples G completions for each of P training prompts, scores them with the task's
verifier, and takes `inner_iterations` AdamW steps on the token-mean objective of
`divrl.objectives`. The penalty to the reference (a frozen copy of the initial weights) is the exact
reverse KL over the vocabulary (`divrl.chunked`, never building token × vocabulary logits) or a
sampled estimator (`divrl.divergences`), in the loss or subtracted from the reward. All token
distributions are the temperature-T distributions the samples were drawn from (as TRL does).

A sample *passes* when its reward is 1 (full score); pass@k uses that.
"""

from __future__ import annotations

import copy
import functools
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from divrl import chunked, divergences
from divrl.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from divrl.config import ConfigError, TrainConfig, save_config
from divrl.metrics import pass_at_k_over_prompts
from divrl.models import load_model
from divrl.objectives import clipped_policy_loss, group_advantages
from divrl.report import write_report
from divrl.rollout import sample
from divrl.runlog import MetricsLog, read_metrics
from divrl.tasks import Example, Task, build_task, encode_prompt, safe_score


def passes(reward: float) -> bool:
    return reward >= 1.0 - 1e-9


def native_bf16() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX512-BF16 or AMX); without them bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_output_dir(cfg: TrainConfig) -> Path:
    """The run directory; refuses to overwrite an earlier run unless resuming it."""
    run_dir = Path(cfg.output_dir)
    has_run = (run_dir / "metrics.jsonl").exists() or checkpoint_dirs(run_dir)
    if has_run and not cfg.resume:
        raise ConfigError(f"config key 'output_dir': '{run_dir}' already holds a run; set "
                          f"resume=true to continue it, or choose another output_dir")
    if cfg.resume and not checkpoint_dirs(run_dir):
        raise ConfigError(f"config key 'resume': '{run_dir}' has no checkpoint to resume from")
    return run_dir


@dataclass
class TokenBatch:
    """Completion tokens of some sequences, flattened (design §4): hidden states that predict
    them, the tokens, and the completion (row) each belongs to."""

    hidden: torch.Tensor  # (n, H)
    tokens: torch.Tensor  # (n,)
    rows: torch.Tensor  # (n,) index into the completions given


def completion_hidden(model, prompts: list[list[int]], completions: list[list[int]],
                      pad_token_id: int) -> TokenBatch:
    """Hidden states that predict each completion token, computing every prompt once.

    `completions` are group-major: G = len(completions) / len(prompts) per prompt. The prompts
    (left-padded) run first and their KV cache is repeated G times — differentiably, so gradients
    reach the prompt positions — then the completions (right-padded) run on top of it. The G
    copies of a prompt cost one forward/backward instead of G. Padding never reaches the
    vocabulary-sized output layer: only the hidden states of real completion tokens are kept.
    """
    group = len(completions) // len(prompts)
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for row, prompt in enumerate(prompts):
        prompt_ids[row, width - len(prompt):] = torch.tensor(prompt)
        prompt_mask[row, width - len(prompt):] = 1
    cache = DynamicCache(config=model.config)
    body = model.base_model
    prompt_hidden = body(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0), cache=cache,
                         use_cache=True).last_hidden_state[:, -1]
    cache.batch_repeat_interleave(group)

    lengths = torch.tensor([len(c) for c in completions])
    comp_width = int(lengths.max())
    comp_ids = torch.full((len(completions), comp_width), pad_token_id, dtype=torch.long)
    for row, completion in enumerate(completions):
        comp_ids[row, :len(completion)] = torch.tensor(completion)
    comp_mask = (torch.arange(comp_width)[None, :] < lengths[:, None]).long()
    prompt_lens = prompt_mask.sum(1).repeat_interleave(group)
    comp_hidden = body(input_ids=comp_ids,
                       attention_mask=torch.cat([prompt_mask.repeat_interleave(group, 0),
                                                 comp_mask], 1),
                       position_ids=prompt_lens[:, None] + torch.arange(comp_width)[None, :],
                       cache=cache, use_cache=True).last_hidden_state
    # Token j of a completion is predicted by the hidden state before it: the prompt's last one
    # for j = 0, the completion's (j − 1)-th otherwise.
    predictors = torch.cat([prompt_hidden.repeat_interleave(group, 0)[:, None], comp_hidden[:, :-1]], 1)
    rows = torch.repeat_interleave(torch.arange(len(completions)), lengths)
    cols = torch.cat([torch.arange(int(n)) for n in lengths])
    return TokenBatch(predictors[rows, cols], comp_ids[rows, cols], rows)


def output_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.run_dir = check_output_dir(cfg)
        self.task: Task = build_task(cfg)
        self.model, self.tokenizer = load_model(cfg.model, seed=cfg.seed)
        self.model.eval()  # no dropout; gradients still flow
        self.reference = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and native_bf16())
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if use_bf16 \
            else nullcontext
        self.stop_ids = sorted({self.tokenizer.eos_token_id, self.tokenizer.pad_token_id})
        self._prompt_cache: dict[str, list[int]] = {}
        self.step = 0
        self.reward_errors = 0

    # ----- data -------------------------------------------------------------------------------
    def _prompt_ids(self, example: Example) -> list[int]:
        if example.prompt not in self._prompt_cache:
            self._prompt_cache[example.prompt] = encode_prompt(self.tokenizer, example.prompt,
                                                               self.cfg.system_prompt)
        return self._prompt_cache[example.prompt]

    def _train_examples(self, step: int) -> list[Example]:
        """Prompts of `step` (0-based): consecutive slices of per-epoch shuffles, so a resumed run
        sees the same data as an uninterrupted one."""
        n, per = len(self.task.train), self.cfg.prompts_per_step
        out = []
        for i in range(step * per, (step + 1) * per):
            epoch, pos = divmod(i, n)
            out.append(self.task.train[self._epoch_order(epoch)[pos]])
        return out

    @functools.lru_cache(maxsize=2)
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.task.train)))
        random.Random(self.cfg.seed * 100_003 + epoch).shuffle(order)
        return order

    def _sample(self, examples: list[Example], group_size: int, temperature: float,
                generator: torch.Generator):
        with self.autocast():
            return sample(self.model, [self._prompt_ids(e) for e in examples],
                          group_size=group_size, max_new_tokens=self.cfg.max_new_tokens,
                          stop_token_ids=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                          temperature=temperature, top_p=self.cfg.top_p, generator=generator)

    def _score(self, examples: list[Example], completions: list[list[int]], group_size: int
               ) -> tuple[list[float], int]:
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards, errors = [], 0
        for i, text in enumerate(texts):
            reward, ok = safe_score(self.task, text, examples[i // group_size])
            rewards.append(reward)
            errors += not ok
        return rewards, errors

    # ----- the update -------------------------------------------------------------------------
    def _update(self, prompts: list[list[int]], completions: list[list[int]],
                rewards: list[float]) -> dict:
        """`inner_iterations` optimizer steps on the token-mean objective of one rollout batch."""
        cfg, pad = self.cfg, self.tokenizer.pad_token_id
        inv_t, group = 1.0 / cfg.temperature, cfg.group_size
        n_tokens = sum(len(c) for c in completions)
        # Micro-batches of whole groups (a prompt's KV is computed once for its G completions).
        per_micro = max(1, cfg.micro_batch_size // group)
        micro = [range(i, min(i + per_micro, len(prompts))) for i in range(0, len(prompts), per_micro)]

        def inputs(prompt_range):
            rows = [r for i in prompt_range for r in range(i * group, (i + 1) * group)]
            return [prompts[i] for i in prompt_range], [completions[r] for r in rows], rows

        def ref_and_old(prompt_range):
            """Reference hidden/log-probs and the behaviour policy's log-probs, without gradient."""
            ps, cs, _ = inputs(prompt_range)
            with torch.no_grad(), self.autocast():
                ref = completion_hidden(self.reference, ps, cs, pad)
                ref_lp = old_lp = None
                if cfg.kl_estimator != "exact":
                    ref_lp, _ = chunked.logprob_entropy(ref.hidden * inv_t,
                                                        output_weight(self.reference), ref.tokens)
                if cfg.inner_iterations > 1 or cfg.kl_in_reward:
                    cur = completion_hidden(self.model, ps, cs, pad)
                    old_lp, _ = chunked.logprob_entropy(cur.hidden * inv_t,
                                                        output_weight(self.model), cur.tokens)
            return ref, ref_lp, old_lp

        cached = [ref_and_old(m) for m in micro]
        reward_t = torch.tensor(rewards)
        if cfg.kl_in_reward:  # β·Σ_t k(y_t) per completion, subtracted from its reward
            estimator = divergences.get_estimator(cfg.kl_estimator)
            for m, (ref, ref_lp, old_lp) in zip(micro, cached):
                rows = torch.tensor(inputs(m)[2])
                reward_t.index_add_(0, rows[ref.rows], -cfg.kl_coef * estimator(old_lp, ref_lp).float())
        advantages = group_advantages(reward_t, group, normalize=cfg.advantage == "group_norm")

        kl_in_loss = cfg.kl_coef > 0 and not cfg.kl_in_reward
        sums = dict.fromkeys(("loss", "pg_loss", "kl", "entropy", "clip_fraction"), 0.0)
        grad_norms = []
        for _ in range(cfg.inner_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for m, (ref, ref_lp, old_lp) in zip(micro, cached):
                ps, cs, rows = inputs(m)
                with self.autocast():
                    cur = completion_hidden(self.model, ps, cs, pad)
                    hidden, weight = cur.hidden * inv_t, output_weight(self.model)
                    logprobs, entropy = chunked.logprob_entropy(hidden, weight, cur.tokens)
                    if cfg.kl_estimator == "exact" and kl_in_loss:
                        # The loss weighs every token's KL alike, so `token_weights` lets the
                        # gradient be formed in the forward pass (4 tile matmuls instead of 6).
                        kl = chunked.divergence("reverse_kl", hidden, weight, ref.hidden * inv_t,
                                                output_weight(self.reference),
                                                token_weights=torch.ones(len(cur.tokens)))
                    elif cfg.kl_estimator == "exact":  # logged only: no graph, no backward
                        kl = chunked.divergence("reverse_kl", hidden.detach(), weight.detach(),
                                                ref.hidden * inv_t, output_weight(self.reference))
                    else:
                        kl = divergences.get_estimator(cfg.kl_estimator)(logprobs, ref_lp)
                old = logprobs.detach() if old_lp is None else old_lp
                adv = advantages[torch.tensor(rows)][cur.rows]
                pg, clipped = clipped_policy_loss(logprobs.float(), old.float(), adv,
                                                  cfg.clip_low, cfg.clip_high)
                penalty = kl.float() if kl_in_loss else 0.0
                loss = (pg + cfg.kl_coef * penalty).sum() / n_tokens
                loss.backward()
                for key, value in (("loss", loss * n_tokens), ("pg_loss", pg), ("kl", kl),
                                   ("entropy", entropy), ("clip_fraction", clipped)):
                    sums[key] += value.detach().float().sum().item() / n_tokens
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                  cfg.max_grad_norm or float("inf"))
            grad_norms.append(norm.item())
            self.optimizer.step()
        stats = {k: v / cfg.inner_iterations for k, v in sums.items()}
        stats["grad_norm"] = sum(grad_norms) / len(grad_norms)
        return stats

    # ----- evaluation -------------------------------------------------------------------------
    def evaluate(self, chunk: int = 16) -> dict:
        """Held-out pass@1 and pass@n (n = eval_samples) with standard errors over prompts. The
        same sampling seed each time, so before/after differences are not sampling noise."""
        cfg, n = self.cfg, self.cfg.eval_samples
        generator = torch.Generator().manual_seed(cfg.eval_seed)
        counts = []
        for start in range(0, len(self.task.eval), chunk):
            examples = self.task.eval[start:start + chunk]
            rollout = self._sample(examples, n, cfg.eval_temperature, generator)
            rewards, _ = self._score(examples, rollout.completion_ids, n)
            counts += [sum(passes(r) for r in rewards[i * n:(i + 1) * n]) for i in range(len(examples))]
        p1, p1_se = pass_at_k_over_prompts(counts, n, 1)
        pk, pk_se = pass_at_k_over_prompts(counts, n, n)
        return {"eval_pass@1": p1, "eval_pass@1_se": p1_se, f"eval_pass@{n}": pk,
                f"eval_pass@{n}_se": pk_se, "eval_prompts": len(counts), "eval_samples": n}

    # ----- the loop ---------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        examples = self._train_examples(step)
        rollout = self._sample(examples, cfg.group_size, cfg.temperature, self.generator)
        t1 = time.perf_counter()
        rewards, errors = self._score(examples, rollout.completion_ids, cfg.group_size)
        self.reward_errors += errors
        t2 = time.perf_counter()
        stats = self._update(rollout.prompt_ids, rollout.completion_ids, rewards)
        t3 = time.perf_counter()
        lengths = [len(c) for c in rollout.completion_ids]
        return {"reward": sum(rewards) / len(rewards),
                "pass_rate": sum(passes(r) for r in rewards) / len(rewards),
                **stats,
                "completion_length": sum(lengths) / len(lengths),
                "truncated_fraction": 1 - sum(rollout.finished) / len(rollout.finished),
                "reward_errors": errors, "reward_errors_total": self.reward_errors,
                "time_rollout": t1 - t0, "time_update": t3 - t2, "time_step": t3 - t0}

    def run(self) -> dict:
        cfg, run_dir = self.cfg, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        start_step, before = 0, None
        if cfg.resume:
            _, path = checkpoint_dirs(run_dir)[-1]
            start_step = load_checkpoint(path, self.model, self.optimizer, self.generator)
            self.log(f"resumed from {path} (step {start_step})")
            rows = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
            before = next((r for r in rows if r["step"] == 0 and "eval_pass@1" in r), None)
            self.reward_errors = max((r.get("reward_errors_total", 0) for r in rows
                                      if r["step"] <= start_step), default=0)
        save_config(cfg, run_dir / "config.yaml")
        log = MetricsLog(run_dir, resume_step=start_step if cfg.resume else None)
        wall0 = time.perf_counter()
        try:
            if before is None:
                self.log(f"evaluating before training on {len(self.task.eval)} held-out prompts …")
                before = self.evaluate()
                log.log(0, before)
                self.log(_fmt_eval("before", before))
            bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
                       desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
            for step in bar:
                metrics = self.train_step(step)
                self.step = step + 1
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    metrics.update(self.evaluate())
                log.log(self.step, metrics)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}",
                                ent=f"{metrics['entropy']:.3f}", s=f"{metrics['time_step']:.1f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    save_checkpoint(run_dir, self.step, self.model, self.tokenizer,
                                    self.optimizer, self.generator, cfg.keep_checkpoints)
            bar.close()
            after = self.evaluate()
            log.log(cfg.steps, after)
            self.log(_fmt_eval("after", after))
        except KeyboardInterrupt:
            done = checkpoint_dirs(run_dir)
            where = f"the last checkpoint is {done[-1][1]}" if done else "no checkpoint was written yet"
            self.log(f"\ninterrupted at step {self.step}; {where}; continue with "
                     f"--set resume=true")
            raise
        finally:
            log.close()
        summary = {"before": before, "after": after, "train_seconds": time.perf_counter() - wall0}
        write_report(run_dir, cfg, summary)
        self.log(f"wrote {run_dir / 'report.md'} and {run_dir / 'curves.png'}")
        return summary


def _fmt_eval(label: str, ev: dict) -> str:
    n = ev["eval_samples"]
    return (f"{label}: held-out pass@1 = {ev['eval_pass@1']:.3f} ± {ev['eval_pass@1_se']:.3f}, "
            f"pass@{n} = {ev[f'eval_pass@{n}']:.3f} ± {ev[f'eval_pass@{n}_se']:.3f} "
            f"({ev['eval_prompts']} prompts × {n} samples, ± = standard error)")
