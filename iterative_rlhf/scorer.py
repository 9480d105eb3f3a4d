"""The gated scorer: two reward models become one reward (Llama 2 §3.2.3, eq. 3-4).

Scope: load the helpfulness RM ``R_h`` and the safety RM ``R_s`` (sequence
classifiers with one scalar output, as :mod:`iterative_rlhf.reward` trains them),
score (prompt, response) pairs in length-sorted batches without gradients, and
combine the two scores:

    R_c = R_s  if IS_SAFETY(p) or sigmoid(r_s) < threshold  else R_h     (eq. 3, R in [0, 1])
    reward = WHITEN(LOGIT(R_c))                                           (eq. 4)

The gate and the logit/whitening math live in :mod:`iterative_rlhf.rlmath`;
this module only runs the models and wires them together.

What the RM reads. :func:`encode` renders ``[user prompt, assistant response]``
with the checkpoint's chat template and tokenises it (``apply_chat_template(...,
tokenize=True)``). That is exactly what TRL 1.16's ``RewardTrainer`` does with
conversational rows (``prompt + chosen`` through ``apply_chat_template``), and
:mod:`iterative_rlhf.reward` pre-tokenises its training pairs with this same
function, so training and scoring see identical token ids (a test checks it
against TRL's own preprocessing). Batches are right-padded, as TRL's collator
pads, and the model reads the last non-pad token.

Whitening statistics (the paper leaves them open; our choice). ``WHITEN`` uses
fixed statistics: the mean and population std of ``LOGIT(R_c)`` over samples of
the round's *starting* policy on the *train* prompts, fitted once at the start
of each round (:meth:`GatedScorer.fit_whitening`) and kept fixed within the
round. Fixed statistics keep rewards comparable across PPO iterations and
rejection-sampling candidates of the same round (a running or per-batch
whitening would move the target as the policy improves, and a best-of-N pick
must not depend on which other candidates share its batch); fitting per round
re-centres the reward on the new starting policy. Without statistics the reward
is ``LOGIT(R_c)`` (``ScoreBatch.reward`` says which in ``whitened``).

Scorer kinds (``ScorerConfig.kind``): ``gated`` is eq. 3; ``helpful`` uses
``R_h`` everywhere and ``safety`` uses ``R_s`` everywhere (the ablations). Both
RMs are always run, so the ablations still log the score they ignore.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._quiet import quiet_progress_bars, small_model_threads
from .chat import prompt_messages
from .checkpoint import load_reward_model, load_tokenizer
from .config import Recipe, ScorerConfig
from .console import log, progress, warn
from .errors import DataError, NumericalError, UserError
from .io import atomic_write_jsonl, read_jsonl
from .rlmath import WhitenStats, gate, logit

__all__ = ["GatedScorer", "RewardModelScorer", "ScoreBatch", "encode", "encode_all", "quiet_progress_bars",
           "resolve_is_safety", "score_file", "small_model_threads"]

def encode(tokenizer, prompt: str, response: str) -> list[int]:  # noqa: ANN001
    """Token ids of one (prompt, response) pair as the reward model reads it.

    The chat template over ``[{"role": "user", ...}, {"role": "assistant", ...}]`` (an HH dialogue's earlier
    turns first: :func:`iterative_rlhf.chat.prompt_messages`),
    tokenised by ``apply_chat_template`` (special tokens come from the template,
    e.g. BOS and the EOS closing the assistant turn): the same ids TRL's
    ``RewardTrainer`` builds from a conversational row.
    """
    messages = [*prompt_messages(prompt), {"role": "assistant", "content": response}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def encode_all(tokenizer, prompts: Sequence[str], responses: Sequence[str],  # noqa: ANN001
               cache: dict[tuple[str, str], list[int]] | None = None) -> list[list[int]]:
    """:func:`encode` of each (prompt, response) pair, each distinct pair tokenised once.

    Comparison files and best-of-N samples repeat pairs many times over (32
    comparisons per prompt drawn among 8 samples): templating each once makes
    tokenising a reward model's training set several times faster. The ids are
    the same as :func:`encode`'s; each row gets its own list. ``cache`` carries
    the pairs over from one call to the next (the caller bounds its size).
    """
    seen = {} if cache is None else cache
    out = []
    for p, r in zip(prompts, responses, strict=True):
        ids = seen.get((p, r))
        if ids is None:
            ids = seen[(p, r)] = encode(tokenizer, p, r)
        out.append(list(ids))
    return out


def length_buckets(lengths: Sequence[int], batch_size: int, order: Sequence[int] | None = None,
                   min_rows: int = 8, max_waste: float = 0.1) -> list[list[int]]:
    """Split items sorted by length (longest first) into batches that pad little.

    A batch closes at ``batch_size`` items, or before an item shorter than
    ``(1 - max_waste)`` times the batch's longest once it holds ``min_rows``
    (so that no batch pads more than ~``max_waste`` of its tokens, and matrix
    products stay large enough to run at full speed).

    Args:
        lengths: item lengths in ``order``, non-increasing.
        batch_size: most items per batch.
        order: the items' ids (default ``range(len(lengths))``).

    Returns:
        Lists of ids, in order.
    """
    ids = list(range(len(lengths))) if order is None else list(order)
    out: list[list[int]] = []
    cur: list[int] = []
    top = 0
    for i, n in zip(ids, lengths, strict=True):
        if cur and (len(cur) >= batch_size or (len(cur) >= min_rows and n < (1 - max_waste) * top)):
            out.append(cur)
            cur = []
        if not cur:
            top = n
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class RewardModelScorer:
    """One reward model: raw scalar scores of (prompt, response) pairs, batched and length-sorted.

    Args:
        path: checkpoint folder (or hub name) of a sequence classifier with one output.
        dtype: weights dtype ("float32", "bfloat16", "float16").
        device: torch device; None = CUDA if available, else CPU.
        batch_size: sequences per forward pass.
        max_length: longest sequence scored; longer ones keep their *last* tokens (the
            score is read at the last token) and are counted in a warning. None = the
            model's ``max_position_embeddings``.
        trust_remote_code: allow custom model code from the checkpoint.
    """

    def __init__(self, path: str | Path, *, dtype: str = "float32", device: str | torch.device | None = None,
                 batch_size: int = 64, max_length: int | None = None, trust_remote_code: bool = False) -> None:
        self.path = str(path)
        self.device = _device(device)
        self.batch_size = batch_size
        with quiet_progress_bars():
            self.tokenizer = load_tokenizer(self.path, trust_remote_code=trust_remote_code)
            model = load_reward_model(self.path, dtype=dtype, trust_remote_code=trust_remote_code)
        if getattr(model.config, "num_labels", 1) != 1:
            raise UserError(f"{path}: the model has {model.config.num_labels} outputs; a reward model has one "
                            "(train it with `iterative-rlhf rm train` or load it with num_labels=1)")
        # frozen: no gradients, and autocast (PPO's mixed precision) does not keep bf16 copies of its weights
        self.model = model.to(self.device).eval().requires_grad_(False)
        limits = [x for x in (max_length, getattr(model.config, "max_position_embeddings", None)) if x]
        self.max_length = min(limits) if limits else None
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]], description: str | None = None) -> Tensor:
        """Raw scores of token-id sequences; (N,) float32 on CPU, in input order."""
        n = len(ids)
        out = torch.empty(n, dtype=torch.float32)
        if n == 0:
            return out
        order = sorted(range(n), key=lambda i: -len(ids[i]))  # longest first: an OOM shows at once
        truncated = 0
        with small_model_threads(self.model, self.device), \
                progress(description or f"scoring with {Path(self.path).name}", n) as advance:
            for idx in length_buckets([len(ids[i]) for i in order], self.batch_size, order):
                seqs = []
                for i in idx:
                    seq = list(ids[i])
                    if self.max_length is not None and len(seq) > self.max_length:
                        seq, truncated = seq[-self.max_length:], truncated + 1
                    seqs.append(seq)
                T = max(len(s) for s in seqs)
                input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (B, T), right padded
                attention = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
                for row, s in enumerate(seqs):
                    input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
                    attention[row, : len(s)] = 1
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=attention.to(self.device), use_cache=False).logits  # (B, 1)
                out[torch.tensor(idx)] = logits[:, 0].float().cpu()
                advance(len(idx))
        if truncated:
            warn(f"{self.path}: {truncated} of {n} sequences were longer than {self.max_length} tokens and were "
                 "cut to their last tokens")
        if not torch.isfinite(out).all():
            bad = int((~torch.isfinite(out)).sum())
            raise NumericalError(f"{self.path}: {bad} of {n} reward scores are NaN or inf; the checkpoint is "
                                 "broken (retrain it) or the dtype overflows (score in float32)")
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str], description: str | None = None) -> Tensor:
        """Raw scores r(x, y) of pairs; (N,) float32 on CPU, in input order."""
        if len(prompts) != len(responses):
            raise UserError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per "
                            "response")
        ids = encode_all(self.tokenizer, prompts, responses)
        return self.score_ids(ids, description)

    def close(self) -> None:
        """Free the model (and the CUDA cache) so the process can train afterwards."""
        self.model = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class ScoreBatch:
    """Scores of N (prompt, response) pairs; every field is a (N,) CPU tensor.

    ``helpful``/``safety`` are the raw RM scores, ``p_helpful``/``p_safety`` their
    sigmoids (the paper's R in [0, 1]), ``used_safety`` tells which RM the gate
    picked, ``r_c`` is the combined probability and ``reward`` is
    ``WHITEN(LOGIT(r_c))`` when ``whitened`` else ``LOGIT(r_c)``.
    """

    helpful: Tensor  # (N,) float32; NaN where score(raw=False) did not need it
    safety: Tensor  # (N,) float32; NaN where score(raw=False) did not need it
    p_helpful: Tensor  # (N,) float32
    p_safety: Tensor  # (N,) float32
    used_safety: Tensor  # (N,) bool
    r_c: Tensor  # (N,) float32
    reward: Tensor  # (N,) float32
    whitened: bool = False

    def __len__(self) -> int:
        return int(self.reward.shape[0])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per pair: score_helpful, score_safety, p_helpful, p_safety, used_safety, r_c, reward."""
        cols = {
            "score_helpful": self.helpful.tolist(), "score_safety": self.safety.tolist(),
            "p_helpful": self.p_helpful.tolist(), "p_safety": self.p_safety.tolist(),
            "used_safety": self.used_safety.tolist(), "r_c": self.r_c.tolist(), "reward": self.reward.tolist(),
        }
        return [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]


class GatedScorer:
    """Llama 2's combined reward from a helpfulness and a safety RM (eq. 3-4); see the module docstring.

    Args:
        helpful_path: helpfulness RM checkpoint.
        safety_path: safety RM checkpoint.
        cfg: kind (gated|helpful|safety), gate threshold and scoring batch size.
        dtype: weights dtype of both RMs.
        device: None = CUDA if available, else CPU.
        whiten: fixed whitening statistics of ``LOGIT(R_c)``; None = no whitening
            until :meth:`fit_whitening` (or :meth:`set_whitening`) is called.
        trust_remote_code: allow custom model code from the checkpoints.
    """

    def __init__(self, helpful_path: str | Path, safety_path: str | Path, cfg: ScorerConfig, *,
                 dtype: str = "float32", device: str | torch.device | None = None,
                 whiten: WhitenStats | None = None, trust_remote_code: bool = False) -> None:
        if cfg.kind not in ("gated", "helpful", "safety"):
            raise UserError(f"scorer.kind: {cfg.kind!r} is not one of 'gated', 'helpful', 'safety'")
        self.cfg = cfg
        self.whiten = whiten
        kw = {"dtype": dtype, "device": device, "batch_size": cfg.batch_size, "trust_remote_code": trust_remote_code}
        self.helpful_rm = RewardModelScorer(helpful_path, **kw)
        self.safety_rm = RewardModelScorer(safety_path, **kw)

    def __enter__(self) -> GatedScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_whitening(self, stats: WhitenStats | None) -> None:
        """Use ``stats`` for WHITEN from now on (None = no whitening)."""
        self.whiten = stats

    @torch.no_grad()
    def _score(self, prompts: Sequence[str], responses: Sequence[str], is_safety: Sequence[bool] | Tensor,
               whiten: WhitenStats | None, raw: bool = True) -> ScoreBatch:
        n = len(prompts)
        if not (len(responses) == n and len(is_safety) == n):
            raise UserError(f"score: got {n} prompts, {len(responses)} responses and {len(is_safety)} is_safety "
                            "flags; pass one of each per pair")
        flags = torch.as_tensor(list(is_safety) if not isinstance(is_safety, Tensor) else is_safety,
                                dtype=torch.bool).reshape(n)  # (N,)
        # Both RMs tokenise alike when they share a tokenizer, but each uses its own to be safe.
        nan = torch.full((n,), float("nan"))  # (N,) a raw score that was not computed (raw=False)
        safety = self.safety_rm.score(prompts, responses, "scoring: safety RM") \
            if raw or self.cfg.kind != "helpful" else nan  # (N,)
        if raw or self.cfg.kind == "helpful":
            helpful = self.helpful_rm.score(prompts, responses, "scoring: helpfulness RM")  # (N,)
        elif self.cfg.kind == "safety":
            helpful = nan
        else:  # gated: the helpfulness RM only where the gate will not pick the safety score
            need = ~(flags | (torch.sigmoid(safety.double()) < self.cfg.threshold))  # (N,) eq. 3's other branch
            helpful = nan.clone()
            rows = need.nonzero().flatten().tolist()
            if rows:
                helpful[need] = self.helpful_rm.score([prompts[i] for i in rows], [responses[i] for i in rows],
                                                      "scoring: helpfulness RM")
        p_h, p_s = torch.sigmoid(helpful.double()), torch.sigmoid(safety.double())  # (N,) float64 for the logit
        if self.cfg.kind == "gated":
            r_c, used = gate(p_h, p_s, flags, self.cfg.threshold)  # Llama 2 eq. 3
        elif self.cfg.kind == "helpful":
            r_c, used = p_h, torch.zeros(n, dtype=torch.bool)
        else:
            r_c, used = p_s, torch.ones(n, dtype=torch.bool)
        reward = logit(r_c)  # (N,) Llama 2 eq. 4: LOGIT undoes the sigmoid (clamped at 1e-6)
        if whiten is not None:
            reward = whiten.apply(reward)  # (N,) WHITEN with the round's fixed statistics
        return ScoreBatch(helpful=helpful, safety=safety, p_helpful=p_h.float(), p_safety=p_s.float(),
                          used_safety=used, r_c=r_c.float(), reward=reward.float(), whitened=whiten is not None)

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              is_safety: Sequence[bool] | Tensor, raw: bool = True) -> ScoreBatch:
        """Score N pairs; ``is_safety[i]`` is the IS_SAFETY tag of ``prompts[i]``. No gradients.

        ``raw=False`` runs each RM only on the pairs whose reward needs it (PPO
        rollouts): with the gate, the helpfulness RM skips safety-tagged prompts and
        pairs whose safety probability is under the threshold; ``kind="helpful"`` /
        ``"safety"`` skip the other RM. The raw scores not computed are NaN
        (``reward``, ``r_c`` and ``used_safety`` are the same as with ``raw=True``).
        """
        return self._score(prompts, responses, is_safety, self.whiten, raw=raw)

    def fit_whitening(self, prompts: Sequence[str], responses: Sequence[str],
                      is_safety: Sequence[bool] | Tensor) -> WhitenStats:
        """Fit WHITEN's statistics on LOGIT(R_c) of these samples, use them from now on, and return them.

        Call it once per round on samples of the round's starting policy on the
        train prompts; keep the statistics fixed within the round (module docstring).
        """
        if len(prompts) == 0:
            raise UserError("fit_whitening: no samples; pass the starting policy's samples of the train prompts")
        raw = self._score(prompts, responses, is_safety, None)
        stats = WhitenStats.fit(raw.reward)
        self.whiten = stats
        log(f"reward whitening: mean {stats.mean:.3f}, std {stats.std:.3f} of LOGIT(R_c) over {len(prompts)} "
            "samples (fixed for this round)")
        return stats

    def close(self) -> None:
        """Free both models."""
        self.helpful_rm.close()
        self.safety_rm.close()


# --------------------------------------------------------------------------- files


def resolve_is_safety(row: dict[str, Any]) -> bool:
    """IS_SAFETY of one row: its ``is_safety`` when given, else the TinyWorld tag of its prompt, else False."""
    if "is_safety" in row and row["is_safety"] is not None:
        return bool(row["is_safety"])
    from .tinyworld.world import find_prompt

    p = find_prompt(row["prompt"])
    return bool(p.is_safety) if p is not None else False


def score_file(recipe: Recipe, input_path: str | Path, out_path: str | Path, helpful_path: str | Path,
               safety_path: str | Path, *, whiten: WhitenStats | None = None) -> dict[str, Any]:
    """Score a JSONL file of (prompt, response) rows with the recipe's scorer; the CLI's ``score``.

    Each input row needs ``prompt`` and ``response`` (text) and may carry
    ``is_safety`` (true/false). When ``is_safety`` is absent, a prompt that is a
    TinyWorld prompt takes the world's tag (harmful prompts are safety prompts);
    any other prompt counts as not safety-tagged (False), so only the safety
    score's own gate (``sigmoid(r_s) < threshold``) can switch it to the safety RM.

    The output repeats each input row and adds ``score_helpful``, ``score_safety``
    (raw RM scores), ``p_helpful``, ``p_safety`` (sigmoids), ``used_safety`` (the
    gate decision), ``r_c`` and ``reward`` (``LOGIT(r_c)``, whitened when ``whiten``
    is given). Returns a summary (rows, share gated to the safety RM, mean reward).

    Raises:
        DataError: malformed JSON, a missing column or a wrong type; names file, row and field.
    """
    rows = read_jsonl(input_path, required=("prompt", "response"))
    for i, row in enumerate(rows, start=1):  # read_jsonl skips blank lines; rows are numbered as kept
        for name in ("prompt", "response"):
            if not isinstance(row[name], str):
                raise DataError(f"expected text, got {type(row[name]).__name__}", path=str(input_path), row=i,
                                field=name)
        if row.get("is_safety") is not None and not isinstance(row["is_safety"], bool):
            raise DataError(f"expected true or false, got {row['is_safety']!r}", path=str(input_path), row=i,
                            field="is_safety")
    flags = [resolve_is_safety(r) for r in rows]
    with GatedScorer(helpful_path, safety_path, recipe.scorer, dtype=recipe.model.dtype
                     if recipe.model.dtype != "auto" else "float32", whiten=whiten,
                     trust_remote_code=recipe.model.trust_remote_code) as scorer:
        batch = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows], flags)
    out_rows = [{**row, **scores} for row, scores in zip(rows, batch.rows(), strict=True)]
    atomic_write_jsonl(out_path, out_rows)
    summary = {"rows": len(out_rows), "kind": recipe.scorer.kind, "threshold": recipe.scorer.threshold,
               "used_safety": float(batch.used_safety.float().mean()), "mean_reward": float(batch.reward.mean()),
               "whitened": batch.whitened, "out": str(out_path)}
    log(f"scored {len(out_rows)} rows -> {out_path}: {summary['used_safety']:.1%} gated to the safety RM, "
        f"mean reward {summary['mean_reward']:.3f}{' (whitened)' if batch.whitened else ''}")
    return summary
