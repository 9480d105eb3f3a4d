"""PPO against the gated reward with a KL penalty to a frozen reference (Llama 2 §3.2.3).

Scope: the PPO stage of a round. Start from a policy checkpoint, sample responses
to the train prompts, score them with the gated scorer, and take clipped PPO
steps on the policy and a token-level value model; evaluate held-out prompts
every ``eval_every`` iterations, stop early, and save the best policy as a
standalone checkpoint. TRL dropped its PPOTrainer after 1.12, so the loop is
ours; the math (KL, GAE, losses, whitening) lives in :mod:`iterative_rlhf.rlmath`
and is only called from here.

One iteration, in the order this file reads (CleanRL's order):

1. **rollout** -- one response per prompt from the live policy (HF ``generate``
   on the in-memory model) or from vLLM after a weight sync; packed into a
   ``(B, P + R)`` batch: left-padded prompt | right-padded response.
2. **score** -- ``reward = WHITEN(LOGIT(R_c))`` of the gated scorer (eq. 3-4).
3. **token rewards** -- ``-kl_coef * (log pi - log pi_ref)`` on every response
   token, the score added on the last one (``rlmath.token_rewards``, eq. 4).
4. **GAE** -- ``rlmath.gae`` with the rollout values; advantages whitened over the batch.
5. **update** -- ``ppo_epochs`` passes over random mini-batches, one clipped
   policy step and one clipped value step per mini-batch (AdamW, grad clipping);
   a mini-batch runs in micro-batches of ``ppo.micro_batch_size`` with
   token-weighted gradient accumulation, optionally with gradient checkpointing.
6. **log** -- ``out_dir/metrics.jsonl`` and the console; eval, early stopping, resumable state.

Choices the paper leaves open (each one is where it is used):

* Log-probs are taken on ``logits / temperature`` (the distribution sampled
  from), for the policy and the reference alike, as TRL did.
* Rollout ("old") log-probs come from the engine when it can give them
  (``ppo.rollout_logprobs="engine"``, the default): HF ``generate``'s own logits
  (``output_logits``) of the sampled tokens, saving one forward pass of the
  policy per iteration. They are the same model on the same tokens, computed
  incrementally with the KV cache: in float32 they agree with a forward pass
  to ~3e-6 (tests/test_ppo.py checks 1e-4), so the first PPO ratio is 1 up to
  that. Rows whose ids lost a token (a sampled pad token) and vLLM rollouts
  (its kernels and logprob modes differ from the training forward) are
  recomputed by a forward pass; ``"forward"`` recomputes every row.
* ``ppo.mixed_precision="bf16"`` runs every forward pass of the stage
  (sampling, both reward models, reference, value, the update's passes)
  under bfloat16 autocast; weights, gradients and AdamW states stay float32.
  Log-probs then differ from float32 by ~1e-3 on average (up to ~0.05 on
  rare tokens): noise well inside the 0.2 clip range, and engine and update
  log-probs disagree by that much too.
* Rollouts are scored with ``GatedScorer.score(raw=False)``: the helpfulness
  RM runs only on rollouts the gate sends to it (not safety-tagged, safety
  probability at or above the threshold), so the logged ``helpful`` mean is
  over those rollouts; evaluations score both RMs on every prompt.
* Dropout is switched off in the policy and the value model (TRL and OpenRLHF
  do the same) so that rollout and update log-probs agree and the first ratio is 1.
* The reference is the stage's starting checkpoint: a second frozen copy for
  full fine-tuning; with LoRA the same model with its adapter disabled
  (peft's ``disable_adapter()``), so no second copy is held.
* The value model reads every position: a token-classification model with one
  label whose ``score`` head is the helpfulness RM's own head
  (``value_init="reward"``, checked at load), or the policy with a zero-initialised
  head (``value_init="policy"``). ``V(s_t)`` is read at the position before response token t.
* Whitening statistics are fixed for the stage: given by the caller or fitted
  on one sample of the starting policy per train prompt (at most 512 prompts).
* Early stopping: held-out prompts are sampled (one response each, the rollout
  temperature, the same seed every time so evaluations differ only by the
  policy) at iteration 0, every ``eval_every`` iterations and at the last one.
  The returned checkpoint is the best evaluated policy, so it is never worse on
  held-out reward than the starting one.
* With a quantised policy, or in several processes, PPO samples with HF
  ``generate`` even when ``generation.engine=vllm`` (one log line says so);
  rejection sampling keeps vLLM.
* Resume: every ``save_every`` iterations ``out_dir/state/`` is replaced
  atomically. Prompts, sampling seeds and mini-batch orders are functions of
  (seed, iteration), so a resumed run repeats an uninterrupted one exactly.
* The saved policy is standalone: LoRA merged; with QLoRA the adapter is merged
  into the full-precision base weights, not into the 4/8-bit ones.

Runs under ``accelerate``: one process on a CPU, ``accelerate launch`` on GPUs
(each process samples and scores its share of the batch; metrics are averaged
across processes; only the main process writes files and logs). Several CPU
processes work too (``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 ...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ._quiet import reset_mixed_precision
from .checkpoint import (
    DTYPES,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    quantization_config,
    resolve_model_path,
    save_checkpoint,
)
from .config import PPOConfig, Recipe
from .console import log, progress, warn
from .errors import NumericalError, UserError
from .generation import Completion, HFEngine, VLLMEngine, chat_prompts, truncate_prompts
from .io import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, commit_dir
from .rlmath import (
    WhitenStats,
    entropy_from_logits,
    explained_variance,
    gae,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

__all__ = [
    "Advantages",
    "Models",
    "RolloutBatch",
    "Scorer",
    "compute_advantages",
    "enable_gradient_checkpointing",
    "engine_logprobs",
    "evaluate",
    "iteration_prompts",
    "load_models",
    "load_state",
    "load_value_model",
    "pad_rollouts",
    "policy_logits",
    "policy_weights_for_inference",
    "ppo_update",
    "rollout",
    "rollout_forward",
    "run_ppo",
    "save_state",
    "truncate_prompts",
    "value_predictions",
]

#: At most this many train prompts are sampled to fit the whitening statistics.
WHITEN_FIT_PROMPTS = 512


class Scorer(Protocol):
    """What PPO needs of a scorer (:class:`iterative_rlhf.scorer.GatedScorer` is one).

    ``score`` returns an object with (N,) tensors ``reward``, ``helpful`` and ``safety``.
    """

    def score(self, prompts: Sequence[str], responses: Sequence[str], is_safety: Sequence[bool]) -> Any: ...

    def set_whitening(self, stats: WhitenStats | None) -> None: ...

    def close(self) -> None: ...


# =========================================================================== 1. rollout


@dataclass
class RolloutBatch:
    """Prompts and sampled responses as tensors: ``[left-padded prompt | right-padded response]``.

    With this layout every response starts at column P, so the logits that
    predict response token t sit at column ``P - 1 + t`` of the full sequence
    for every row, and one slice serves the whole batch.
    """

    query: Tensor  # (B, P) int64 prompt ids, left padded
    query_mask: Tensor  # (B, P) 1 on prompt tokens, 0 on padding
    response: Tensor  # (B, R) int64 response ids (EOS last when finished), right padded
    response_mask: Tensor  # (B, R) 1 on response tokens, 0 on padding

    def __len__(self) -> int:
        return int(self.query.shape[0])

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query, self.response], dim=1)  # (B, P + R)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)  # (B, P + R)

    def to(self, device: torch.device | str) -> RolloutBatch:
        return RolloutBatch(*(t.to(device) for t in dataclasses.astuple(self)))

    def select(self, idx: Tensor) -> RolloutBatch:
        """Rows ``idx``, trimmed to their own longest prompt and response (less padding to compute on).

        The response keeps its first columns, so per-token tensors of the full
        batch line up with ``x[idx, : sub.response.shape[1]]``.
        """
        qm, rm = self.query_mask[idx], self.response_mask[idx]  # (b, P), (b, R)
        p = max(int(qm.sum(dim=1).max()), 1)
        r = max(int(rm.sum(dim=1).max()), 1)
        return RolloutBatch(self.query[idx][:, -p:], qm[:, -p:], self.response[idx][:, :r], rm[:, :r])


def pad_rollouts(queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> RolloutBatch:
    """Pack token-id lists into a :class:`RolloutBatch` (prompts left padded, responses right padded).

    Args:
        queries: B prompt token-id lists (chat template applied), each non-empty.
        responses: B response token-id lists as sampled (EOS last when finished).
        pad_id: padding token id.

    Returns:
        RolloutBatch with P = longest prompt and R = longest response (at least 1).
    """
    if len(queries) != len(responses):
        raise ValueError(f"got {len(queries)} prompts but {len(responses)} responses")
    B = len(queries)
    P = max([len(q) for q in queries] + [1])
    R = max([len(r) for r in responses] + [1])
    query = torch.full((B, P), pad_id, dtype=torch.long)  # (B, P)
    query_mask = torch.zeros((B, P), dtype=torch.long)  # (B, P)
    response = torch.full((B, R), pad_id, dtype=torch.long)  # (B, R)
    response_mask = torch.zeros((B, R), dtype=torch.long)  # (B, R)
    for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
        if q:
            query[i, P - len(q):] = torch.tensor(q, dtype=torch.long)
            query_mask[i, P - len(q):] = 1
        if r:
            response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            response_mask[i, : len(r)] = 1
    return RolloutBatch(query, query_mask, response, response_mask)


def iteration_prompts(n_prompts: int, batch_size: int, iteration: int, seed: int) -> list[int]:
    """Indices of the prompts of ``iteration`` (1-based): seeded permutations (epochs) read in order.

    A pure function of its arguments, so a resumed run draws the same prompts.
    """
    if n_prompts < 1:
        raise UserError("PPO needs at least one train prompt")
    out: list[int] = []
    pos = (iteration - 1) * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos + len(out), n_prompts)
        perm = list(range(n_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.extend(perm[offset: offset + batch_size - len(out)])
    return out


def rollout(engine, tokenizer, prompts: Sequence[str], *, temperature: float,  # noqa: ANN001
            max_new_tokens: int, seed: int, engine_logprobs: bool = False) -> tuple[RolloutBatch, list[Completion]]:
    """Sample one response per prompt and pack prompts and responses into a :class:`RolloutBatch`.

    Prompt ids are the chat template's rendering tokenised without extra special
    tokens, as :class:`iterative_rlhf.generation.HFEngine` feeds them to ``generate``.
    ``engine_logprobs`` asks an HF engine for the sampled tokens' log-probs
    (:attr:`Completion.logprobs`, read by :func:`engine_logprobs`); other engines ignore it.
    """
    kw = {"return_logprobs": True} if engine_logprobs and isinstance(engine, HFEngine) else {}
    comps = [c[0] for c in engine.generate(list(prompts), 1, temperature, max_new_tokens, seed, **kw)]
    texts = chat_prompts(tokenizer, list(prompts))
    queries = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return pad_rollouts(queries, [c.token_ids for c in comps], tokenizer.pad_token_id), comps


def engine_logprobs(comps: Sequence[Completion], batch: RolloutBatch) -> tuple[Tensor, Tensor]:
    """The engine's log-probs of the sampled tokens laid out like ``batch.response``.

    Returns:
        ``(logprobs, have)``: (B, R) float32, 0 on padding and on rows without
        engine log-probs; (B,) bool, True on rows that have them.
    """
    B, R = batch.response.shape
    logprobs = torch.zeros(B, R)  # (B, R)
    have = torch.zeros(B, dtype=torch.bool)  # (B,)
    for i, c in enumerate(comps):
        if c.logprobs is not None and len(c.logprobs) == len(c.token_ids):
            logprobs[i, : len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
            have[i] = True
    return logprobs.to(batch.response.device), have.to(batch.response.device)


# =========================================================================== forward passes


def _position_ids(attention_mask: Tensor) -> Tensor:
    # Positions count real tokens only, as generate() numbers them under left padding.
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)


def policy_logits(model, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:  # noqa: ANN001
    """Logits that predict each response token, divided by the sampling temperature.

    Returns:
        (B, R, V) float32: row b, column t is the distribution of ``batch.response[b, t]``.
    """
    R = batch.response.shape[1]
    attn = batch.attention_mask
    out = model(input_ids=batch.input_ids, attention_mask=attn, position_ids=_position_ids(attn),
                use_cache=False, logits_to_keep=R + 1)  # the LM head runs on the last R + 1 positions only
    return out.logits[:, :-1].float() / temperature  # (B, R, V)


def value_predictions(model, batch: RolloutBatch) -> Tensor:  # noqa: ANN001
    """Token-level values ``V(s_t)``, read at the position before response token t.

    Returns:
        (B, R) float32.
    """
    P = batch.query.shape[1]
    attn = batch.attention_mask
    out = model(input_ids=batch.input_ids, attention_mask=attn, position_ids=_position_ids(attn), use_cache=False)
    return out.logits[:, P - 1: -1, 0].float()  # (B, R)


def _chunks_by_length(batch: RolloutBatch, size: int) -> Iterator[Tensor]:
    """Row indices in chunks of similar total length: at most ``size`` rows, little padding.

    Rows are sorted by prompt + response length and a chunk is cut where padding
    would exceed ~10% (:func:`iterative_rlhf.scorer.length_buckets`).
    """
    from .scorer import length_buckets

    lengths = batch.query_mask.sum(1) + batch.response_mask.sum(1)  # (B,)
    order = torch.argsort(lengths, descending=True, stable=True)  # (B,)
    for chunk in length_buckets(lengths[order].tolist(), size):
        yield order[torch.tensor(chunk, dtype=torch.long, device=order.device)]


@torch.no_grad()
def rollout_forward(models: Models, batch: RolloutBatch, temperature: float, chunk_size: int,
                    logprobs: Tensor | None = None, have: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs of the sampled tokens under the policy and the reference, and the values, at rollout.

    Args:
        logprobs, have: the engine's log-probs (B, R) and the (B,) rows that have
            them (:func:`engine_logprobs`); the policy's forward pass runs only on
            the other rows. None = all rows by a forward pass.

    Returns:
        ``(logprobs, ref_logprobs, values)``, each (B, R) float32 and 0 on padding.
    """
    B, R = batch.response.shape
    dev = batch.response.device
    have = torch.zeros(B, dtype=torch.bool, device=dev) if have is None else have.to(dev)  # (B,)
    logprobs = torch.zeros(B, R, device=dev) if logprobs is None else logprobs.to(dev).clone()  # (B, R)
    ref_logprobs = torch.zeros(B, R, device=dev)  # (B, R)
    values = torch.zeros_like(ref_logprobs)  # (B, R)
    policy = models.unwrapped_policy()
    value = models.unwrapped_value()
    # eval mode: gradient checkpointing (ppo.gradient_checkpointing) acts in training mode only; dropout is off anyway
    modes = policy.training, value.training
    policy.eval()
    value.eval()
    for idx in _chunks_by_length(batch, chunk_size):
        sub = batch.select(idx)
        r = sub.response.shape[1]
        todo = idx[~have[idx]]  # rows without the engine's log-probs
        if len(todo) == len(idx):
            logprobs[idx, :r] = logprobs_from_logits(policy_logits(policy, sub, temperature), sub.response)
        elif len(todo):
            s2 = batch.select(todo)
            logprobs[todo, : s2.response.shape[1]] = logprobs_from_logits(policy_logits(policy, s2, temperature),
                                                                          s2.response)
        with models.reference_model() as ref:
            ref_logprobs[idx, :r] = logprobs_from_logits(policy_logits(ref, sub, temperature), sub.response)
        values[idx, :r] = value_predictions(value, sub)
    policy.train(modes[0])
    value.train(modes[1])
    m = batch.response_mask.bool()
    zero = torch.zeros((), device=logprobs.device)
    return (torch.where(m, logprobs, zero), torch.where(m, ref_logprobs, zero), torch.where(m, values, zero))


# =========================================================================== 3-4. rewards and advantages


@dataclass
class Advantages:
    """Per-token quantities of one batch, all (B, R) and 0 on padding."""

    rewards: Tensor  # KL-penalised token rewards, score on the last token
    kl: Tensor  # k1 estimate log pi - log pi_ref at rollout
    advantages: Tensor  # GAE advantages, whitened over the batch's response tokens
    returns: Tensor  # value targets (un-whitened advantages + values)


@torch.no_grad()
def compute_advantages(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, mask: Tensor,
                       cfg: PPOConfig) -> Advantages:
    """Token rewards (Llama 2 eq. 4, InstructGPT's per-token KL) and GAE advantages.

    Args:
        scores: (B,) sequence rewards ``WHITEN(LOGIT(R_c))``.
        logprobs: (B, R) rollout-policy log-probs of the sampled tokens.
        ref_logprobs: (B, R) reference log-probs of the same tokens.
        values: (B, R) rollout values.
        mask: (B, R) 1 on response tokens.
        cfg: kl_coef (beta), gamma and lam are read.

    Returns:
        :class:`Advantages`.
    """
    rewards, kl = token_rewards(scores, logprobs, ref_logprobs, mask, cfg.kl_coef)  # (B, R) each
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)  # (B, R) each
    advantages = masked_whiten(advantages, mask)  # (B, R) whitened over the batch (TRL, OpenRLHF)
    return Advantages(rewards, kl, advantages, returns)


# =========================================================================== 5. update


def _finite(x: Tensor, what: str, iteration: int) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NumericalError(f"PPO iteration {iteration}: {what} is NaN or inf; lower ppo.learning_rate or "
                             "ppo.value_learning_rate, or check the reward models (the last saved state in "
                             "out_dir/state is kept)")


def _micro_batches(idx: Tensor, micro_batch_size: int) -> list[Tensor]:
    """``idx`` cut into consecutive parts of ``micro_batch_size`` rows (0 = one part)."""
    size = micro_batch_size if 0 < micro_batch_size < len(idx) else len(idx)
    return [idx[i: i + size] for i in range(0, len(idx), size)]


def _accumulating(acc, model, last: bool) -> contextlib.AbstractContextManager:  # noqa: ANN001
    """DDP: no gradient all-reduce until the last micro-batch of a step (FSDP and one process: a no-op).

    FSDP's ``no_sync`` would hold unsharded gradients, the memory micro-batching is there to save.
    """
    if last or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return acc.no_sync(model)


def ppo_update(models: Models, batch: RolloutBatch, old_logprobs: Tensor, old_values: Tensor, adv: Advantages,
               cfg: PPOConfig, *, mini_batch_size: int, generator: torch.Generator,
               iteration: int) -> dict[str, float]:
    """``cfg.ppo_epochs`` passes over random mini-batches: one policy step and one value step each (AdamW).

    A mini-batch goes through the models in micro-batches of ``cfg.micro_batch_size``
    rows (0 = all at once) whose gradients accumulate before the step. The losses
    are masked means over the *mini-batch's* response tokens, so micro-batch j's
    masked mean is weighted by ``n_j / N`` (its response tokens over the
    mini-batch's): ``sum_j (S_j / n_j) (n_j / N) = S / N``, the same loss, gradient,
    clipped step and diagnostics as one pass (up to float rounding). Weighting
    each micro-batch equally instead would be a mean of means, which weights the
    tokens of short micro-batches more.

    Args:
        models: policy, value model, optimisers and accelerator.
        batch: this process's rollouts.
        old_logprobs: (B, R) rollout log-probs.
        old_values: (B, R) rollout values.
        adv: advantages and returns of ``batch``.
        cfg: clip ranges, max_grad_norm, epochs, micro_batch_size.
        mini_batch_size: rollouts per gradient step on this process.
        generator: CPU generator of the mini-batch order.
        iteration: named in a NumericalError.

    Returns:
        Means over the mini-batches of pg_loss, vf_loss, clipfrac, approx_kl,
        vf_clipfrac, entropy (each that of the whole mini-batch), grad_norm and value_grad_norm.
    """
    acc = models.accelerator
    models.policy.train()
    models.value.train()
    sums: dict[str, float] = {}
    steps = 0
    B = len(batch)
    for _epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator).to(batch.response.device)
        for start in range(0, B, mini_batch_size):
            idx = perm[start: start + mini_batch_size]
            parts = _micro_batches(idx, cfg.micro_batch_size)
            n_tokens = batch.response_mask[idx].sum().clamp(min=1).float()  # () N: masked means divide by it
            row: dict[str, Tensor] = {}  # diagnostics of the mini-batch: sums of n_j / N-weighted masked means

            def add(k: str, v: Tensor, weight: Tensor) -> None:
                row[k] = row.get(k, 0.0) + v.detach() * weight  # noqa: B023 - row is this mini-batch's

            # Policy, then value: separate backward passes free the policy's activations before the value
            # forward (one backward of pg_loss + vf_loss gave the same gradients at a higher peak memory).
            for j, sub in enumerate(parts):
                mb = batch.select(sub)
                r = mb.response.shape[1]
                w = mb.response_mask.sum().float() / n_tokens  # () n_j / N
                with models.autocast():
                    logits = policy_logits(models.policy, mb, models.temperature)  # (b, r, V) float32
                new_logprobs = logprobs_from_logits(logits, mb.response)  # (b, r)
                pg_loss, pg_diag = policy_loss(new_logprobs, old_logprobs[sub, :r], adv.advantages[sub, :r],
                                               mb.response_mask, cfg.clip_range)
                _finite(pg_loss, "the policy loss", iteration)
                with torch.no_grad():
                    add("entropy", masked_mean(entropy_from_logits(logits), mb.response_mask), w)
                del logits  # (b, r, V) can be large: not kept through the backward pass
                with _accumulating(acc, models.policy, last=j == len(parts) - 1):
                    acc.backward(pg_loss * w)
                add("pg_loss", pg_loss, w)
                for k, v in pg_diag.items():
                    add(k, v, w)
                del pg_loss, new_logprobs
            grad_norm = acc.clip_grad_norm_(models.policy.parameters(), cfg.max_grad_norm)
            _finite(torch.as_tensor(grad_norm), "the policy gradient norm", iteration)
            models.policy_opt.step()
            models.policy_opt.zero_grad(set_to_none=True)

            for j, sub in enumerate(parts):
                mb = batch.select(sub)
                r = mb.response.shape[1]
                w = mb.response_mask.sum().float() / n_tokens  # () n_j / N
                with models.autocast():
                    new_values = value_predictions(models.value, mb)  # (b, r) float32
                vf_loss, vf_diag = value_loss(new_values, old_values[sub, :r], adv.returns[sub, :r],
                                              mb.response_mask, cfg.value_clip_range)
                _finite(vf_loss, "the value loss", iteration)
                with _accumulating(acc, models.value, last=j == len(parts) - 1):
                    acc.backward(vf_loss * w)
                add("vf_loss", vf_loss, w)
                for k, v in vf_diag.items():
                    add(k, v, w)
                del vf_loss, new_values
            value_grad_norm = acc.clip_grad_norm_(models.value.parameters(), cfg.max_grad_norm)
            _finite(torch.as_tensor(value_grad_norm), "the value gradient norm", iteration)
            models.value_opt.step()
            models.value_opt.zero_grad(set_to_none=True)
            _trim_heap()  # before the next mini-batch's activations (peak RSS -70 MiB at 27.7M, no time cost seen)

            row.update(grad_norm=torch.as_tensor(grad_norm), value_grad_norm=torch.as_tensor(value_grad_norm))
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
    return {k: v / max(steps, 1) for k, v in sums.items()}


# =========================================================================== models


@dataclass
class Models:
    """Everything that trains or is read during PPO, after ``accelerator.prepare``."""

    policy: Any  # the trained policy (possibly wrapped by accelerate)
    value: Any  # the token-level value model (possibly wrapped)
    reference: Any | None  # frozen reference; None = the policy with its LoRA adapter disabled
    tokenizer: Any
    policy_opt: Any
    value_opt: Any
    accelerator: Any
    temperature: float = 1.0
    mixed_precision: str = "none"  # "bf16": forward passes under bfloat16 autocast (ppo.mixed_precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on the models' device when ``mixed_precision == "bf16"``, else a no-op.

        Matrix products run in bfloat16 with float32 accumulation; softmax, norms
        and losses stay float32 (torch's autocast lists); weights, gradients and
        AdamW states stay float32.
        """
        if self.mixed_precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)

    def unwrapped_policy(self) -> Any:
        return self.accelerator.unwrap_model(self.policy)

    def unwrapped_value(self) -> Any:
        return self.accelerator.unwrap_model(self.value)

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[Any]:
        """The reference policy: the frozen copy, or the live policy with its adapter disabled."""
        if self.reference is not None:
            yield self.reference
        else:
            policy = self.unwrapped_policy()
            with policy.disable_adapter():
                yield policy


def _disable_dropout(model) -> None:  # noqa: ANN001
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _model_kwargs(recipe: Recipe, quantized: bool) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": DTYPES.get(recipe.model.dtype, "auto"),
                          "trust_remote_code": recipe.model.trust_remote_code}
    if quantized:
        kw["quantization_config"] = quantization_config(recipe.ppo.quant)
        if torch.cuda.is_available():
            kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    return kw


def load_value_model(recipe: Recipe, policy_path: str, helpful_rm: str, pad_token_id: int):  # noqa: ANN201
    """The value model: per-token scalar outputs (a token classifier with one label).

    ``value_init="reward"`` loads the helpfulness RM checkpoint (a sequence
    classifier whose ``score`` head maps the last hidden state to the reward)
    as a token classifier: the backbone and the ``score`` weights are the RM's,
    applied at every position instead of the last one. The head is checked to
    have loaded. ``value_init="policy"`` loads the policy's backbone with a
    zero-initialised head (V = 0 everywhere at the start).
    """
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    cfg = recipe.ppo
    quantized = cfg.quant.load_in_4bit or cfg.quant.load_in_8bit
    src = resolve_model_path(helpful_rm if cfg.value_init == "reward" else policy_path)
    config = AutoConfig.from_pretrained(src, trust_remote_code=recipe.model.trust_remote_code)
    config.num_labels = 1
    # No bias and no dropout: the RM's head is a bias-free Linear, and dropout would make V noisy.
    config.token_classification_bias = False
    config.classifier_dropout = 0.0
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the missing head; we check the keys below
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            src, config=config, output_loading_info=True, **_model_kwargs(recipe, quantized))
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info.get("missing_keys", []))
    if cfg.value_init == "reward":
        if "score.weight" in missing:
            raise UserError(f"{helpful_rm}: no `score` head in this checkpoint, so it is not a reward model "
                            "(train one with `iterative-rlhf rm train`) or set ppo.value_init=policy")
        if missing:
            raise UserError(f"{helpful_rm}: the value model could not load {sorted(missing)} from the reward "
                            "model; set ppo.value_init=policy")
    else:
        with torch.no_grad():
            model.score.weight.zero_()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    _disable_dropout(model)
    model = apply_lora(model, cfg.lora, "TOKEN_CLS", quantized=quantized)  # peft trains `score` fully
    return model


def enable_gradient_checkpointing(model) -> None:  # noqa: ANN001
    """Per-layer activation recomputation in training mode (non-reentrant ``torch.utils.checkpoint``).

    With LoRA the embeddings are frozen, so their output does not require a
    gradient; peft models get ``enable_input_require_grads`` (transformers 5 does
    it inside ``gradient_checkpointing_enable``; older versions did not). The
    non-reentrant checkpoint itself does not need it, the reentrant one does.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if base is not model and not getattr(base, "_require_grads_hooks", None):
        base.enable_input_require_grads()


def load_models(recipe: Recipe, policy_path: str, helpful_rm: str, accelerator) -> Models:  # noqa: ANN001
    """Policy (full, LoRA or QLoRA), reference, value model and their AdamW optimisers, prepared."""
    cfg = recipe.ppo
    quantized = cfg.quant.load_in_4bit or cfg.quant.load_in_8bit
    tokenizer = load_tokenizer(policy_path, recipe.model.trust_remote_code)
    policy = load_causal_lm(policy_path, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code,
                            quant=cfg.quant if quantized else None)
    _disable_dropout(policy)
    policy = apply_lora(policy, cfg.lora, "CAUSAL_LM", quantized=quantized)
    _disable_dropout(policy)  # LoRA's own dropout too
    reference = None
    if not cfg.lora.enabled:
        reference = load_causal_lm(policy_path, dtype=recipe.model.dtype,
                                   trust_remote_code=recipe.model.trust_remote_code)
        reference.requires_grad_(False)
        reference.eval()
        reference.to(accelerator.device)
    value = load_value_model(recipe, policy_path, helpful_rm, tokenizer.pad_token_id)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
        enable_gradient_checkpointing(value)

    def adamw(model, lr: float) -> torch.optim.Optimizer:  # noqa: ANN001
        params = [p for p in model.parameters() if p.requires_grad]
        kw = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        try:  # the fused kernel: one call for all tensors (on the CPU the default loops tensor by tensor)
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(params, foreach=True, **kw)

    policy_opt, value_opt = adamw(policy, cfg.learning_rate), adamw(value, cfg.value_learning_rate)
    policy, value, policy_opt, value_opt = accelerator.prepare(policy, value, policy_opt, value_opt)
    return Models(policy=policy, value=value, reference=reference, tokenizer=tokenizer, policy_opt=policy_opt,
                  value_opt=value_opt, accelerator=accelerator, temperature=cfg.temperature,
                  mixed_precision=cfg.mixed_precision)


# =========================================================================== vLLM weight sync
# The vLLM engine of iterative_rlhf.generation receives weights in memory:
# VLLMEngine.load_weights packs HF-named tensors into one safetensors blob and
# sends it through vLLM's RPC channel (collective_rpc) to a worker extension
# that reloads them in place (Worker.reload_weights, which re-packs the CPU
# kernels' weights); no file is written. If that fails, _sync_engine falls back
# to saving the policy and restarting the engine on it (measured: time_sync).


@torch.no_grad()
def policy_weights_for_inference(model) -> dict[str, Tensor]:  # noqa: ANN001
    """The policy's weights under Hugging Face names, LoRA merged, on the CPU (for vLLM's ``load_weights``).

    For a peft model the adapter is merged in place, the weights copied, and
    the merge undone, so training continues on the unmerged adapter.
    """
    if hasattr(model, "merge_adapter"):
        model.merge_adapter()
        try:
            out = {}
            for k, v in model.get_base_model().state_dict().items():
                if "lora_" in k:
                    continue
                out[k.replace(".base_layer", "")] = v.detach().to("cpu", copy=True)
            return out
        finally:
            model.unmerge_adapter()
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}


# =========================================================================== state files


def _trainable(model) -> dict[str, Tensor]:  # noqa: ANN001
    """Trainable parameters (all weights, or the LoRA adapter and heads), detached, on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, path: Path | dict[str, Tensor]) -> None:  # noqa: ANN001
    """Copy saved trainable parameters (a safetensors file or a dict) into ``model``; the names must match."""
    from safetensors.torch import load_file

    state = load_file(str(path)) if isinstance(path, Path) else path
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        raise UserError(f"{path if isinstance(path, Path) else 'weights'}: the saved weights do not match this model "
                        f"({len(set(state) ^ expected)} names differ); was the recipe's ppo.lora changed since the "
                        "run started? Use a new out_dir")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _save_trainable(model, path: Path) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    save_file(_trainable(model), str(path))


def _rng_state() -> tuple[dict[str, Any], dict[str, Tensor]]:
    py = random.getstate()
    npst = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def _set_rng_state(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_state(models: Models, out_dir: Path, trainer_state: dict[str, Any]) -> None:
    """Write ``out_dir/state/`` atomically (a temporary folder, then ``os.replace``). Main process only."""
    tmp = atomic_dir(out_dir / "state")
    _save_trainable(models.unwrapped_policy(), tmp / "policy.safetensors")
    _save_trainable(models.unwrapped_value(), tmp / "value.safetensors")
    torch.save(models.policy_opt.state_dict(), tmp / "policy_optimizer.pt")
    torch.save(models.value_opt.state_dict(), tmp / "value_optimizer.pt")
    rng_meta, rng_tensors = _rng_state()
    torch.save(rng_tensors, tmp / "rng.pt")
    atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "rng": rng_meta})
    commit_dir(tmp, out_dir / "state")


def load_state(models: Models, out_dir: Path) -> dict[str, Any]:
    """Restore weights, optimisers and RNG states from ``out_dir/state/``; returns the trainer state."""
    state_dir = out_dir / "state"
    trainer_state = json.loads((state_dir / "trainer_state.json").read_text(encoding="utf-8"))
    _load_trainable(models.unwrapped_policy(), state_dir / "policy.safetensors")
    _load_trainable(models.unwrapped_value(), state_dir / "value.safetensors")
    models.policy_opt.load_state_dict(torch.load(state_dir / "policy_optimizer.pt", weights_only=True))
    models.value_opt.load_state_dict(torch.load(state_dir / "value_optimizer.pt", weights_only=True))
    _set_rng_state(trainer_state.pop("rng"), torch.load(state_dir / "rng.pt", weights_only=True))
    return trainer_state


def _truncate_metrics(path: Path, last_iteration: int) -> None:
    """Drop metric rows written after the state being resumed (they will be written again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("iteration", 0) <= last_iteration]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# =========================================================================== eval and helpers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the engine's and scorer's own progress bars inside the PPO loop (the loop has its bar)."""
    old = os.environ.get("ITERATIVE_RLHF_NO_PROGRESS")
    os.environ["ITERATIVE_RLHF_NO_PROGRESS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ITERATIVE_RLHF_NO_PROGRESS", None)
        else:
            os.environ["ITERATIVE_RLHF_NO_PROGRESS"] = old


def _shard(items: Sequence[Any], accelerator) -> list[Any]:  # noqa: ANN001
    return list(items[accelerator.process_index:: accelerator.num_processes])


def _gather(items: list[Any], accelerator) -> list[Any]:  # noqa: ANN001
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def _mean_across(values: dict[str, float], accelerator) -> dict[str, float]:  # noqa: ANN001
    """Average per-process metrics over processes (identical on every process afterwards)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist(), strict=True))


def _trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere a no-op).

    Each phase of an iteration allocates tensors of new sizes; without a trim the
    pages freed by one phase stay resident under the next and the peak RSS creeps
    up by ~50-100 MiB per iteration on the CPU (measured: bench/README.md).
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _peak_rss_mib() -> float:
    try:
        import resource
    except ImportError:  # Windows: not measured
        return 0.0
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _nanmean(x: Tensor, accelerator) -> float:  # noqa: ANN001
    """Mean of the non-NaN entries over all processes; NaN when there are none."""
    x = x.double().to(accelerator.device)
    ok = ~x.isnan()
    t = torch.stack([torch.where(ok, x, 0.0).sum(), ok.sum().double()])  # (2,) sum, count
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def _score_rollouts(scorer: Scorer, prompts: list[str], responses: list[str], is_safety: list[bool]) -> Any:
    """``scorer.score`` computing only the RM scores the reward needs, when the scorer can (``raw=False``)."""
    import inspect

    if "raw" in inspect.signature(scorer.score).parameters:
        return scorer.score(prompts, responses, is_safety, raw=False)
    return scorer.score(prompts, responses, is_safety)


def _seed_for(seed: int, iteration: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + iteration * 7_919 + salt) % (2**31 - 1)


def evaluate(engine, scorer: Scorer, eval_prompts: Sequence[dict], cfg: PPOConfig, *,  # noqa: ANN001
             max_new_tokens: int, seed: int, accelerator,  # noqa: ANN001
             eval_metrics: Callable[[list[dict], list[str]], dict[str, float]] | None = None) -> dict[str, float]:
    """Mean reward (and raw RM means) of ``cfg.eval_samples`` samples per held-out prompt; the early-stopping signal.

    Every process samples its share; results are gathered so every process
    takes the same early-stopping decision. ``eval_metrics(rows, responses)``
    adds task metrics (e.g. TinyWorld gold) under ``eval_<name>``.
    """
    rows = _shard(list(eval_prompts), accelerator)
    prompts = [r["prompt"] for r in rows]
    k = cfg.eval_samples
    comps = [c for cs in engine.generate(prompts, k, cfg.temperature, max_new_tokens, seed) for c in cs] \
        if rows else []
    rows = [r for r in rows for _ in range(k)]
    prompts = [r["prompt"] for r in rows]
    sb = scorer.score(prompts, [c.text for c in comps], [bool(r.get("is_safety", False)) for r in rows]) \
        if rows else None
    local = [(r, c.text, float(sb.reward[i]), float(sb.helpful[i]), float(sb.safety[i]), len(c.token_ids))
             for i, (r, c) in enumerate(zip(rows, comps, strict=True))]
    allrows = _gather(local, accelerator)
    n = max(len(allrows), 1)
    out = {"eval_reward": sum(x[2] for x in allrows) / n, "eval_helpful": sum(x[3] for x in allrows) / n,
           "eval_safety": sum(x[4] for x in allrows) / n, "eval_response_length": sum(x[5] for x in allrows) / n}
    if not math.isfinite(out["eval_reward"]):
        raise NumericalError("PPO eval: the held-out reward is NaN or inf; check the reward models")
    if eval_metrics is not None:
        extra = eval_metrics([x[0] for x in allrows], [x[1] for x in allrows])
        out.update({f"eval_{k}": float(v) for k, v in extra.items() if isinstance(v, (int, float))})
    return out


def _fit_whitening(engine, scorer: Scorer, prompts: Sequence[dict], recipe: Recipe, seed: int,  # noqa: ANN001
                   accelerator) -> WhitenStats:  # noqa: ANN001
    """Whitening statistics of LOGIT(R_c) over one sample of the starting policy per train prompt."""
    rows = list(prompts)
    if len(rows) > WHITEN_FIT_PROMPTS:
        rows = random.Random(seed).sample(rows, WHITEN_FIT_PROMPTS)
    mine = _shard(rows, accelerator)
    texts = [r["prompt"] for r in mine]
    comps = [c[0] for c in engine.generate(texts, 1, recipe.ppo.temperature, recipe.generation.max_new_tokens,
                                           _seed_for(seed, 0, salt=17))]
    scorer.set_whitening(None)
    raw = scorer.score(texts, [c.text for c in comps], [bool(r.get("is_safety", False)) for r in mine]).reward
    values = _gather([float(x) for x in raw], accelerator)
    stats = WhitenStats.fit(torch.tensor(values, dtype=torch.float64))
    scorer.set_whitening(stats)
    return stats


def _make_engine(recipe: Recipe, models: Models, policy_path: str, seed: int):  # noqa: ANN202
    """vLLM where it can serve PPO, else HF ``generate`` on the live policy (with a log line saying why).

    vLLM cannot take a quantised policy's weights (bitsandbytes + LoRA: merged
    weights would be full precision, a second 7B copy) and samples in one
    process; in those cases PPO falls back to the HF engine for its rollouts and
    evaluations, while rejection sampling, sampling and evaluation stages keep
    ``generation.engine=vllm``.
    """
    gen = recipe.generation
    if gen.engine == "vllm":
        why = ""
        if models.accelerator.num_processes > 1:
            why = f"PPO runs in {models.accelerator.num_processes} processes and vLLM samples in one"
        elif recipe.ppo.quant.load_in_4bit or recipe.ppo.quant.load_in_8bit:
            why = "vLLM cannot take a quantised (QLoRA) policy's weights"
        if not why:
            return VLLMEngine(policy_path, gen, seed=seed, trust_remote_code=recipe.model.trust_remote_code)
        log(f"PPO: sampling with HF generate, not vLLM: {why} (generation.engine=vllm still serves rejection "
            f"sampling; HF batches of generation.batch_size={gen.batch_size})")
    # the HF engine samples from the live in-memory policy: nothing to sync
    return HFEngine(policy_path, gen, model=models.unwrapped_policy(), tokenizer=models.tokenizer,
                    trust_remote_code=recipe.model.trust_remote_code)


def _sync_engine(engine, models: Models, recipe: Recipe, out_dir: Path, seed: int):  # noqa: ANN001, ANN202
    """Give the vLLM engine the current policy weights; returns (engine, seconds, how)."""
    if not isinstance(engine, VLLMEngine):
        return engine, 0.0, "shared"  # the HF engine samples from the live model
    t0 = time.perf_counter()
    policy = models.unwrapped_policy()
    weights = policy_weights_for_inference(policy)
    try:
        engine.load_weights(weights.items())
        return engine, time.perf_counter() - t0, "rpc"
    except Exception as e:  # noqa: BLE001 - any RPC failure falls back to the disk round trip
        warn(f"vLLM in-memory weight sync failed ({type(e).__name__}: {e}); falling back to save + restart")
        folder = out_dir / ".vllm-weights"
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        tmp = atomic_dir(folder)
        base.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        models.tokenizer.save_pretrained(tmp)
        commit_dir(tmp, folder)
        engine.close()
        engine = VLLMEngine(str(folder), recipe.generation, seed=seed,
                            trust_remote_code=recipe.model.trust_remote_code)
        return engine, time.perf_counter() - t0, "reload"


# =========================================================================== the loop


def run_ppo(recipe: Recipe, *, policy_path: str, helpful_rm: str, safety_rm: str, out_dir: Path,
            prompts: list[dict], eval_prompts: list[dict], whiten: WhitenStats | None = None,
            seed: int | None = None, scorer: Scorer | None = None,
            eval_metrics: Callable[[list[dict], list[str]], dict[str, float]] | None = None) -> Path:
    """Run PPO (Llama 2 §3.2.3) and return the standalone checkpoint folder ``out_dir/policy``.

    Args:
        recipe: ``recipe.ppo`` (the algorithm), ``recipe.generation`` (engine,
            max_new_tokens), ``recipe.scorer`` and ``recipe.model`` are read.
        policy_path: starting policy checkpoint; also the frozen reference.
        helpful_rm: helpfulness RM checkpoint (scorer, and value init when ``ppo.value_init="reward"``).
        safety_rm: safety RM checkpoint.
        out_dir: run folder: ``metrics.jsonl``, ``state/`` (resumable), ``best/``,
            ``whiten.json``, ``summary.json`` and the final ``policy/``. Rerunning
            with the same folder continues from the last saved state.
        prompts: train prompts, dicts with ``prompt`` and ``is_safety``.
        eval_prompts: held-out prompts for early stopping (same form).
        whiten: fixed whitening statistics of LOGIT(R_c); None = fit them on one
            sample of the starting policy per train prompt (at most 512) when
            ``recipe.scorer.whiten`` is on.
        seed: sampling and mini-batch seed (default ``recipe.seed``).
        scorer: an object with the :class:`Scorer` interface used instead of
            ``GatedScorer(helpful_rm, safety_rm)`` (e.g. a gold judge on TinyWorld).
        eval_metrics: ``f(eval_rows, responses) -> {name: value}`` logged with each evaluation.

    Returns:
        ``out_dir/policy``: the best evaluated policy, LoRA merged, with tokenizer and chat template.

    Raises:
        NumericalError: NaN/inf in a reward or loss; names the iteration; ``out_dir/state`` keeps the last good state.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = recipe.ppo
    seed = recipe.seed if seed is None else seed
    out_dir = Path(out_dir)
    reset_mixed_precision()  # PPO's own autocast (ppo.mixed_precision), never one left by an earlier trainer
    accelerator = Accelerator()
    main = accelerator.is_main_process
    world = accelerator.num_processes
    if not prompts:
        raise UserError("PPO needs train prompts (rows with 'prompt' and 'is_safety')")
    if not eval_prompts:
        raise UserError("PPO needs held-out eval prompts for early stopping")
    if cfg.batch_size % world or cfg.mini_batch_size % world:
        raise UserError(f"ppo.batch_size ({cfg.batch_size}) and ppo.mini_batch_size ({cfg.mini_batch_size}) must be "
                        f"multiples of the number of processes ({world})")
    summary_path = out_dir / "summary.json"
    if (out_dir / "policy" / "config.json").is_file() and summary_path.is_file():
        log(f"PPO: {out_dir} is already finished; returning {out_dir / 'policy'}")
        return out_dir / "policy"
    set_seed(seed)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "recipe.yaml", recipe.to_yaml())

    models = load_models(recipe, policy_path, helpful_rm, accelerator)
    tokenizer = models.tokenizer
    texts, n_cut = truncate_prompts(tokenizer, [r["prompt"] for r in prompts], recipe.model.max_prompt_length)
    if n_cut:
        warn(f"{n_cut} of {len(texts)} train prompts were longer than model.max_prompt_length="
             f"{recipe.model.max_prompt_length} tokens and were cut from the left")
    train_rows = [{**r, "prompt": t} for r, t in zip(prompts, texts, strict=True)]
    draw_rows = train_rows  # what the iterations draw from: safety prompts ppo.safety_weight times
    if cfg.safety_weight > 1:
        from .sft import weighted_rows

        draw_rows = weighted_rows(train_rows, cfg.safety_weight)
        if len(draw_rows) == len(train_rows):
            warn(f"ppo.safety_weight={cfg.safety_weight}: no train prompt has is_safety=true; every prompt is "
                 "drawn equally often")
    eval_texts, _ = truncate_prompts(tokenizer, [r["prompt"] for r in eval_prompts], recipe.model.max_prompt_length)
    eval_rows = [{**r, "prompt": t} for r, t in zip(eval_prompts, eval_texts, strict=True)]

    if scorer is None:
        from .scorer import GatedScorer

        dtype = recipe.model.dtype if recipe.model.dtype != "auto" else "float32"
        scorer = GatedScorer(helpful_rm, safety_rm, recipe.scorer, dtype=dtype, device=accelerator.device,
                             trust_remote_code=recipe.model.trust_remote_code)
    engine = _make_engine(recipe, models, policy_path, seed)

    try:
        # ------------------------------------------------------------------ resume or start
        trainer_state: dict[str, Any] = {"iteration": 0, "best_eval_reward": None, "best_iteration": None,
                                         "evals_without_improvement": 0, "stopped_early": False, "whiten": None}
        resumed = (out_dir / "state" / "trainer_state.json").is_file()
        if resumed:
            trainer_state = load_state(models, out_dir)
            if main:
                _truncate_metrics(out_dir / "metrics.jsonl", trainer_state["iteration"])
            log(f"PPO: resuming {out_dir} after iteration {trainer_state['iteration']}")
        elif main and (out_dir / "metrics.jsonl").exists():
            (out_dir / "metrics.jsonl").unlink()  # a run that never saved a state starts over
        if trainer_state["whiten"] is not None:
            whiten = WhitenStats(**trainer_state["whiten"])
        with _quiet():
            engine, _, _ = _sync_engine(engine, models, recipe, out_dir, seed)
            if whiten is None and recipe.scorer.whiten:
                with models.autocast():
                    whiten = _fit_whitening(engine, scorer, train_rows, recipe, seed, accelerator)
            scorer.set_whitening(whiten if recipe.scorer.whiten else None)
        if whiten is not None:
            trainer_state["whiten"] = {"mean": whiten.mean, "std": whiten.std}
            if main:
                atomic_write_json(out_dir / "whiten.json", trainer_state["whiten"])
                if recipe.scorer.whiten:
                    log(f"PPO: reward whitening mean {whiten.mean:.3f}, std {whiten.std:.3f} (fixed for this stage)")

        local_mini = cfg.mini_batch_size // world
        max_new = recipe.generation.max_new_tokens
        eval_seed = _seed_for(seed, 0, salt=29)

        def run_eval(iteration: int) -> dict[str, float]:
            """Evaluate, update the best checkpoint and the early-stopping counter."""
            with _quiet(), models.autocast():
                ev = evaluate(engine, scorer, eval_rows, cfg, max_new_tokens=max_new, seed=eval_seed,
                              accelerator=accelerator, eval_metrics=eval_metrics)
            best = trainer_state["best_eval_reward"]
            if best is None or ev["eval_reward"] > best:
                trainer_state.update(best_eval_reward=ev["eval_reward"], best_iteration=iteration,
                                     evals_without_improvement=0)
                if main and iteration > 0:
                    tmp = atomic_dir(out_dir / "best")
                    _save_trainable(models.unwrapped_policy(), tmp / "policy.safetensors")
                    atomic_write_json(tmp / "best.json", {"iteration": iteration, **ev})
                    commit_dir(tmp, out_dir / "best")
            else:
                trainer_state["evals_without_improvement"] += 1
            accelerator.wait_for_everyone()
            return ev

        start = trainer_state["iteration"] + 1
        if not resumed:
            ev0 = run_eval(0)
            if main:
                append_jsonl(out_dir / "metrics.jsonl", {"iteration": 0, **ev0})
            log(f"PPO: start, held-out reward {ev0['eval_reward']:.3f}")

        # ------------------------------------------------------------------ iterations
        with progress("PPO", cfg.iterations) as advance:
            advance(start - 1)
            for iteration in range(start, cfg.iterations + 1):
                if trainer_state["stopped_early"]:
                    break
                t0, cpu0 = time.perf_counter(), time.process_time()
                # 1. rollout (vLLM first receives the weights of the last update)
                with _quiet():
                    engine, sync_s, sync_how = _sync_engine(engine, models, recipe, out_dir, seed)
                    idx = iteration_prompts(len(draw_rows), cfg.batch_size, iteration, seed)
                    rows = _shard([draw_rows[i] for i in idx], accelerator)
                    with models.autocast():
                        batch, comps = rollout(engine, tokenizer, [r["prompt"] for r in rows],
                                               temperature=cfg.temperature, max_new_tokens=max_new,
                                               seed=_seed_for(seed, iteration),
                                               engine_logprobs=cfg.rollout_logprobs == "engine")
                batch = batch.to(accelerator.device)
                _trim_heap()
                t_gen, cpu_gen = time.perf_counter(), time.process_time()
                # 2. score: WHITEN(LOGIT(R_c)) (Llama 2 eq. 3-4); each RM only where the reward needs it
                with _quiet(), models.autocast():
                    sb = _score_rollouts(scorer, [r["prompt"] for r in rows], [c.text for c in comps],
                                         [bool(r.get("is_safety", False)) for r in rows])
                scores = sb.reward.to(accelerator.device).float()  # (B,)
                if not bool(torch.isfinite(scores).all()):
                    raise NumericalError(f"PPO iteration {iteration}: the reward is NaN or inf for "
                                         f"{int((~torch.isfinite(scores)).sum())} of {len(scores)} rollouts; check the "
                                         "reward models (the last saved state in out_dir/state is kept)")
                _trim_heap()
                t_score, cpu_score = time.perf_counter(), time.process_time()
                # 3-4. KL-penalised token rewards (eq. 4) and GAE
                # old log-probs from the engine where it gave them (HF generate's logits), else a forward pass;
                # no-grad passes are inference: chunks as large as a generation batch
                eng_lp, have = engine_logprobs(comps, batch)
                with models.autocast():
                    logprobs, ref_logprobs, values = rollout_forward(
                        models, batch, cfg.temperature, max(local_mini, recipe.generation.batch_size), eng_lp, have)
                mask = batch.response_mask
                adv = compute_advantages(scores, logprobs, ref_logprobs, values, mask, cfg)
                _trim_heap()
                t_fwd, cpu_fwd = time.perf_counter(), time.process_time()
                # 5. update epochs over mini-batches
                gen = torch.Generator().manual_seed(_seed_for(seed, iteration, salt=3))
                upd = ppo_update(models, batch, logprobs, values, adv, cfg, mini_batch_size=local_mini,
                                 generator=gen, iteration=iteration)
                t_train, cpu_train = time.perf_counter(), time.process_time()
                # 6. log
                seq_kl = masked_sum(adv.kl, mask, dim=1)  # (B,) per-sequence sum of k1
                m = {
                    "reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                    "kl": float(seq_kl.mean()), "non_score_reward": float(-cfg.kl_coef * seq_kl.mean()),
                    "safety_share": sum(bool(r.get("is_safety", False)) for r in rows) / len(rows),
                    **upd,
                    "explained_variance": explained_variance(values, adv.returns, mask),
                    "value_mean": float(masked_mean(values, mask)),
                    "return_mean": float(masked_mean(adv.returns, mask)),
                    "response_length": float(mask.sum(1).float().mean()),
                    "finished": sum(c.finished for c in comps) / max(len(comps), 1),
                    "time_generation": t_gen - t0, "time_scoring": t_score - t_gen, "time_training": t_train - t_score,
                    "time_rollout_forward": t_fwd - t_score, "time_update": t_train - t_fwd, "time_sync": sync_s,
                    "rollout_logprobs_from_engine": float(have.float().mean()),
                    # CPU time of this process (all threads): robust to a busy machine
                    "cpu_seconds": cpu_train - cpu0, "cpu_generation": cpu_gen - cpu0,
                    "cpu_scoring": cpu_score - cpu_gen, "cpu_rollout_forward": cpu_fwd - cpu_score,
                    "cpu_update": cpu_train - cpu_fwd,
                    "peak_rss_mib": _peak_rss_mib(),  # of this process so far (the loading included)
                }
                # raw RM means over the rollouts each RM scored (the helpfulness RM skips those the gate sends
                # to the safety RM: GatedScorer.score(raw=False)); left out when an RM scored none (never NaN)
                for k in ("helpful", "safety"):
                    v = _nanmean(getattr(sb, k), accelerator)
                    if math.isfinite(v):
                        m[k] = v
                if getattr(sb, "used_safety", None) is not None:
                    m["used_safety"] = float(sb.used_safety.float().mean())
                m = _mean_across(m, accelerator)
                m["sync"] = sync_how
                trainer_state["iteration"] = iteration
                last = iteration == cfg.iterations
                if iteration % cfg.eval_every == 0 or last:
                    m.update(run_eval(iteration))
                    patience = cfg.early_stopping_patience
                    if patience and trainer_state["evals_without_improvement"] >= patience:
                        trainer_state["stopped_early"] = True
                m["time_iteration"] = time.perf_counter() - t0
                if main:
                    append_jsonl(out_dir / "metrics.jsonl", {"iteration": iteration, **m})
                log(f"PPO {iteration}/{cfg.iterations}: reward {m['reward']:+.3f}  kl {m['kl']:.3f}  "
                    f"entropy {m['entropy']:.2f}  clipfrac {m['clipfrac']:.3f}  vf_loss {m['vf_loss']:.3f}  "
                    f"ev {m['explained_variance']:+.2f}  len {m['response_length']:.1f}"
                    + (f"  eval {m['eval_reward']:+.3f}" if "eval_reward" in m else "")
                    + f"  ({m['time_iteration']:.1f}s)")
                if iteration % cfg.save_every == 0 or last or trainer_state["stopped_early"]:
                    if main:
                        save_state(models, out_dir, trainer_state)
                    accelerator.wait_for_everyone()
                advance()
                if trainer_state["stopped_early"]:
                    log(f"PPO: early stop at iteration {iteration}: held-out reward has not improved on "
                        f"{trainer_state['best_eval_reward']:.3f} (iteration {trainer_state['best_iteration']}) for "
                        f"{cfg.early_stopping_patience} evaluations")
    except BaseException:
        engine.close()  # stops vLLM's processes; the last saved state stays in out_dir/state
        scorer.close()
        raise

    # ------------------------------------------------------------------ the best policy, standalone
    engine.close()
    scorer.close()
    best_it = trainer_state["best_iteration"]
    accelerator.wait_for_everyone()
    if main:
        policy = models.unwrapped_policy()
        if best_it == 0:
            policy = load_causal_lm(policy_path, dtype=recipe.model.dtype,
                                    trust_remote_code=recipe.model.trust_remote_code)
        else:
            if best_it is not None and best_it != trainer_state["iteration"]:
                _load_trainable(policy, out_dir / "best" / "policy.safetensors")
            if cfg.quant.load_in_4bit or cfg.quant.load_in_8bit:
                # QLoRA: merge the adapter into full-precision base weights, not into the quantised ones
                adapter = _trainable(policy)
                policy = apply_lora(load_causal_lm(policy_path, dtype=recipe.model.dtype,
                                                   trust_remote_code=recipe.model.trust_remote_code),
                                    cfg.lora, "CAUSAL_LM")
                _load_trainable(policy, adapter)
        final_tok = load_tokenizer(policy_path, recipe.model.trust_remote_code)
        final = save_checkpoint(policy, final_tok, out_dir / "policy")
        atomic_write_json(summary_path, {
            "iterations": trainer_state["iteration"], "best_iteration": best_it,
            "best_eval_reward": trainer_state["best_eval_reward"], "stopped_early": trainer_state["stopped_early"],
            "whiten": trainer_state["whiten"], "seed": seed, "policy": str(final), "processes": world})
        log(f"PPO: done after {trainer_state['iteration']} iterations; best held-out reward "
            f"{trainer_state['best_eval_reward']:.3f} at iteration {best_it} -> {final}")
    accelerator.wait_for_everyone()
    gc.collect()
    return out_dir / "policy"
