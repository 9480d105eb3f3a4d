"""Best-of-N rejection sampling (Llama 2 §3.2.3, Fig. 7).

Per prompt: N samples at the round's temperature from the current policy,
scored by the gated scorer; the best ``top_k`` are kept (ties broken by the
shorter response, then by text, so selection is deterministic). With
``pool="all"`` the samples kept in every previous round compete with the new
ones under the current scorer (Llama 2's fix after V3 regressed); with
``pool="previous"`` only the new samples count.

Recorded per round: the mean over prompts of the max, median and mean reward
among the first n samples for n = 1, 2, 4, ..., N (Llama 2 Fig. 7), the
best-of-N KL bound log N - (N-1)/N, where the selected samples came from,
and on TinyWorld the gold metrics of the selected samples next to those of
all samples.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from .rlmath import best_of_n_kl_bound


def powers_of_two(n_max: int) -> list[int]:
    ns, n = [], 1
    while n < n_max:
        ns.append(n)
        n *= 2
    return ns + [n_max]


def reward_vs_n(rewards: torch.Tensor) -> list[dict[str, float]]:
    """Mean over prompts of the max / median / mean reward among the first n samples.

    rewards: (P, N) reward of sample j of prompt i. Returns one row per n in 1, 2, 4, ..., N
    with the best-of-n KL bound beside it.
    """
    rows = []
    for n in powers_of_two(rewards.shape[1]):
        r = rewards[:, :n]  # (P, n)
        rows.append({"n": n, "max": r.max(dim=1).values.mean().item(),
                     "median": r.median(dim=1).values.mean().item() if n > 1 else r[:, 0].mean().item(),
                     "mean": r.mean(dim=1).mean().item(), "kl_bound": best_of_n_kl_bound(n)})
    return rows


@dataclass
class Candidate:
    prompt: str
    response: str
    is_safety: bool
    origin: str  # "new" or "vK" (the round that first kept it)
    sample: int = -1
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def reward(self) -> float:
        return self.scores["reward"]


def select_top(cands: list[Candidate], top_k: int) -> list[Candidate]:
    """Best ``top_k`` distinct responses: higher reward first, then shorter, then by text (deterministic)."""
    seen, out = set(), []
    for c in sorted(cands, key=lambda c: (-c.reward, len(c.response), c.response)):
        if c.response in seen:
            continue
        seen.add(c.response)
        out.append(c)
        if len(out) == top_k:
            break
    return out


def selection_stats(selected: list[Candidate], all_new: list[Candidate]) -> dict[str, float | int]:
    n_pool = sum(c.origin != "new" for c in selected)
    return {
        "selected": len(selected),
        "from_pool": n_pool,
        "from_new": len(selected) - n_pool,
        "selected_reward_mean": statistics.fmean(c.reward for c in selected),
        "new_reward_mean": statistics.fmean(c.reward for c in all_new),
        "selected_used_safety": statistics.fmean(float(c.scores.get("used_safety", 0.0)) for c in selected),
        "selected_words_mean": statistics.fmean(len(c.response.split()) for c in selected),
    }


def score_candidates(scorer, cands: list[Candidate]) -> None:  # noqa: ANN001
    """Fill ``c.scores`` (raw RM scores, gate decision, reward) with the current scorer."""
    if not cands:
        return
    b = scorer.score([c.prompt for c in cands], [c.response for c in cands], [c.is_safety for c in cands])
    for i, c in enumerate(cands):
        c.scores = {"helpful": float(b.helpful[i]), "safety": float(b.safety[i]),
                    "used_safety": float(b.used_safety[i]), "reward": float(b.reward[i])}


@dataclass
class RSResult:
    selected: list[Candidate]
    samples: list[Candidate]  # the N new samples per prompt, scored
    curve: list[dict[str, float]]
    stats: dict[str, float | int]


def best_of_n(engine, scorer, prompts: list[dict], n: int, temperature: float, max_new_tokens: int,  # noqa: ANN001
              top_k: int, seed: int, pool: dict[str, list[Candidate]] | None = None) -> RSResult:
    """Sample ``n`` per prompt, score, and keep the best ``top_k`` per prompt (with the pool competing).

    prompts: rows with ``prompt`` and ``is_safety``. pool: prompt text -> candidates kept in earlier
    rounds (rescored here with the current scorer), or None for the current round only.
    """
    texts = [p["prompt"] for p in prompts]
    res = engine.generate(texts, n, temperature, max_new_tokens, seed)
    new = [Candidate(p["prompt"], c.text, bool(p.get("is_safety", False)), "new", j)
           for p, comps in zip(prompts, res, strict=True) for j, c in enumerate(comps)]
    old = [c for t in texts for c in (pool or {}).get(t, [])]
    score_candidates(scorer, new + old)
    rewards = torch.tensor([c.reward for c in new]).view(len(prompts), n)  # (P, N)
    by_prompt: dict[str, list[Candidate]] = {t: [] for t in texts}
    for c in new + old:
        by_prompt[c.prompt].append(c)
    selected = [c for t in texts for c in select_top(by_prompt[t], top_k)]
    stats = selection_stats(selected, new)
    stats["kl_bound"] = best_of_n_kl_bound(n)
    stats["temperature"] = temperature
    return RSResult(selected=selected, samples=new, curve=reward_vs_n(rewards), stats=stats)
