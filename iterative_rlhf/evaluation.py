"""Per-round evaluation of a policy on the eval prompts.

Samples ``k`` responses per eval prompt, scores them with both reward models
and the gate (R_c in [0, 1], unwhitened so rounds compare), estimates the KL
to the base policy as the mean over samples of
``sum_t log pi(y_t) - log pi_base(y_t)`` (a Monte-Carlo estimate of
KL(pi || pi_base) per response), counts the win rate of the gated reward
against the samples of another round on the same prompts (ties count half),
and on TinyWorld adds the gold metrics.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

import torch

from .checkpoint import load_causal_lm, load_tokenizer
from .rlmath import logprobs_from_logits


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts: list[str], responses: list[str],  # noqa: ANN001
                      batch_size: int = 64) -> torch.Tensor:
    """Sum of log pi(response tokens | prompt) per pair, with the chat template. Returns (N,)."""
    from .generation import chat_prompts

    heads = chat_prompts(tokenizer, prompts)
    out = torch.zeros(len(prompts))
    device = next(model.parameters()).device
    for s in range(0, len(prompts), batch_size):
        ids, starts = [], []
        for h, r in zip(heads[s:s + batch_size], responses[s:s + batch_size], strict=True):
            hi = tokenizer(h, add_special_tokens=False)["input_ids"]
            ri = tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids.append(hi + ri)
            starts.append(len(hi))
        T = max(map(len, ids))
        x = torch.full((len(ids), T), tokenizer.pad_token_id, dtype=torch.long)  # (B, T) right padded
        mask = torch.zeros((len(ids), T))
        for i, (seq, st) in enumerate(zip(ids, starts, strict=True)):
            x[i, : len(seq)] = torch.tensor(seq)
            mask[i, st: len(seq)] = 1.0  # response tokens (incl. EOS)
        x, mask = x.to(device), mask.to(device)
        logits = model(input_ids=x, attention_mask=(x != tokenizer.pad_token_id) | (mask > 0)).logits  # (B, T, V)
        lp = logprobs_from_logits(logits[:, :-1], x[:, 1:])  # (B, T-1): log p of token t+1
        out[s:s + len(ids)] = (lp * mask[:, 1:]).sum(dim=1).float().cpu()
    return out


def kl_to_base(policy_path: str, base_path: str, prompts: list[str], responses: list[str]) -> float:
    """Monte-Carlo KL(pi || pi_base) per response from samples of pi."""
    if policy_path == base_path:
        return 0.0
    tok = load_tokenizer(policy_path)
    lp = sequence_logprobs(load_causal_lm(policy_path), tok, prompts, responses)
    lb = sequence_logprobs(load_causal_lm(base_path), load_tokenizer(base_path), prompts, responses)
    return max(0.0, float((lp - lb).mean()))


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def histogram(values: list[float], bins: int = 20, lo: float = 0.0, hi: float = 1.0) -> dict[str, list]:
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    return {"bins": edges, "counts": counts}


def win_rate(mine: dict[tuple[str, int], float], other: dict[tuple[str, int], float]) -> float | None:
    """Share of paired samples (same prompt, same sample index) where ``mine`` scores higher; ties count half."""
    keys = [k for k in mine if k in other]
    if not keys:
        return None
    return sum(1.0 if mine[k] > other[k] else 0.5 if mine[k] == other[k] else 0.0 for k in keys) / len(keys)


def best_and_worst(rows: list[dict], per_family: int = 2) -> dict[str, dict[str, list[dict]]]:
    """The best and worst samples by gated reward, per family (or 'all' outside TinyWorld)."""
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        fams[r.get("family") or "all"].append(r)
    keep = ("prompt", "response", "r_c", "score_helpful", "score_safety", "gold")
    out = {}
    for fam, rs in sorted(fams.items()):
        rs = sorted(rs, key=lambda r: (-r["r_c"], r["prompt"], r["response"]))
        out[fam] = {"best": [{k: r.get(k) for k in keep} for r in rs[:per_family]],
                    "worst": [{k: r.get(k) for k in keep} for r in rs[-per_family:][::-1]]}
    return out
