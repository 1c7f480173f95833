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
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from divrl import chunked, divergences
from divrl.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from divrl.config import ConfigError, TrainConfig, save_config
from divrl.metrics import pass_at_k_over_prompts
from divrl.models import load_model
from divrl.objectives import clipped_policy_loss, group_advantages
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
    them, the tokens, and the row (sequence) each belongs to."""

    hidden: torch.Tensor  # (n, H)
    tokens: torch.Tensor  # (n,)
    rows: torch.Tensor  # (n,) index into the sequences given


def completion_hidden(model, sequences: list[list[int]], prompt_lens: list[int],
                      pad_token_id: int) -> TokenBatch:
    """Run the model body on right-padded sequences and keep only the hidden states that predict
    completion tokens; padding never reaches the vocabulary-sized output layer."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = torch.cat([torch.full((len(s) - p,), r) for r, (s, p) in
                      enumerate(zip(sequences, prompt_lens))])
    positions = torch.cat([torch.arange(p - 1, len(s) - 1) for s, p in zip(sequences, prompt_lens)])
    return TokenBatch(hidden[rows, positions], ids[rows, positions + 1], rows)


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
            order = list(range(n))
            random.Random(self.cfg.seed * 100_003 + epoch).shuffle(order)
            out.append(self.task.train[order[pos]])
        return out

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
    def _update(self, sequences: list[list[int]], prompt_lens: list[int], rewards: list[float]
                ) -> dict:
        cfg = self.cfg
        inv_t = 1.0 / cfg.temperature
        n_tokens = sum(len(s) - p for s, p in zip(sequences, prompt_lens))
        # Shortest first: micro-batches of similar lengths waste little padding.
        order = sorted(range(len(sequences)), key=lambda r: len(sequences[r]))
        micro = [order[i:i + cfg.micro_batch_size] for i in range(0, len(order), cfg.micro_batch_size)]

        def ref_and_old(rows):
            """Reference hidden/log-probs and the behaviour policy's log-probs, without gradient."""
            seqs, plens = [sequences[r] for r in rows], [prompt_lens[r] for r in rows]
            with torch.no_grad(), self.autocast():
                ref = completion_hidden(self.reference, seqs, plens, self.tokenizer.pad_token_id)
                ref_lp = None
                if cfg.kl_estimator != "exact":
                    ref_lp, _ = chunked.logprob_entropy(ref.hidden * inv_t,
                                                        output_weight(self.reference), ref.tokens)
                old_lp = None
                if cfg.inner_iterations > 1 or cfg.kl_in_reward:
                    cur = completion_hidden(self.model, seqs, plens, self.tokenizer.pad_token_id)
                    old_lp, _ = chunked.logprob_entropy(cur.hidden * inv_t, output_weight(self.model),
                                                        cur.tokens)
            return ref, ref_lp, old_lp

        cached = [ref_and_old(rows) for rows in micro]
        reward_t = torch.tensor(rewards)
        if cfg.kl_in_reward:  # β·Σ_t k(y_t) per sequence, subtracted from its reward
            estimator = divergences.get_estimator(cfg.kl_estimator)
            for rows, (_, ref_lp, old_lp) in zip(micro, cached):
                per_token = estimator(old_lp, ref_lp)
                seq_rows = torch.repeat_interleave(torch.tensor(rows),
                                                   torch.tensor([len(sequences[r]) - prompt_lens[r]
                                                                 for r in rows]))
                reward_t.index_add_(0, seq_rows, -cfg.kl_coef * per_token.float())
        advantages = group_advantages(reward_t, cfg.group_size,
                                      normalize=cfg.advantage == "group_norm")
        sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
        grad_norms = []
        for _ in range(cfg.inner_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for rows, (ref, ref_lp, old_lp) in zip(micro, cached):
                seqs, plens = [sequences[r] for r in rows], [prompt_lens[r] for r in rows]
                with self.autocast():
                    cur = completion_hidden(self.model, seqs, plens, self.tokenizer.pad_token_id)
                    hidden = cur.hidden * inv_t
                    logprobs, entropy = chunked.logprob_entropy(hidden, output_weight(self.model),
                                                                cur.tokens)
                    if cfg.kl_estimator == "exact":
                        kl = chunked.divergence("reverse_kl", hidden, output_weight(self.model),
                                                ref.hidden * inv_t, output_weight(self.reference))
                    else:
                        kl = divergences.get_estimator(cfg.kl_estimator)(logprobs, ref_lp)
                old = logprobs.detach() if old_lp is None else old_lp
                adv = advantages[torch.tensor(rows)][cur.rows]
                pg, clipped = clipped_policy_loss(logprobs.float(), old.float(), adv,
                                                  cfg.clip_low, cfg.clip_high)
                penalty = kl.float() if (cfg.kl_coef > 0 and not cfg.kl_in_reward) else 0.0
                loss = (pg + cfg.kl_coef * penalty).sum() / n_tokens
                loss.backward()
                sums["loss"] += loss.item()
                sums["pg_loss"] += pg.sum().item() / n_tokens
                sums["kl"] += kl.detach().float().sum().item() / n_tokens
                sums["entropy"] += entropy.detach().float().sum().item() / n_tokens
                sums["clip_fraction"] += clipped.float().sum().item() / n_tokens
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
        prompts = [rollout.prompt_ids[i // cfg.group_size] for i in range(len(rewards))]
        sequences = [p + c for p, c in zip(prompts, rollout.completion_ids)]
        t2 = time.perf_counter()
        stats = self._update(sequences, [len(p) for p in prompts], rewards)
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
            step, path = checkpoint_dirs(run_dir)[-1]
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
        from divrl.report import write_report

        summary = {"before": before, "after": after, "train_seconds": time.perf_counter() - wall0}
        write_report(run_dir, cfg, summary)
        self.log(f"wrote {run_dir / 'report.md'} and {run_dir / 'curves.png'}")
        return summary


def _fmt_eval(label: str, ev: dict) -> str:
    n = ev["eval_samples"]
    return (f"{label}: held-out pass@1 = {ev['eval_pass@1']:.3f} ± {ev['eval_pass@1_se']:.3f}, "
            f"pass@{n} = {ev[f'eval_pass@{n}']:.3f} ± {ev[f'eval_pass@{n}_se']:.3f} "
            f"({ev['eval_prompts']} prompts × {n} samples, ± = standard error)")
