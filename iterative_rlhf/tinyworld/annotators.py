"""TinyWorld's annotators: Llama-2-style comparisons on the four preference levels.

A pair of responses to one prompt is shown to an annotator whose utility is
``helpful(r)`` (helpfulness annotator) or ``safe(r)`` (safety annotator) minus
``length_cost`` per word. The annotator perceives the utility gap with logistic
noise (Bradley-Terry: P(prefer a) = sigmoid(gap / noise)), picks the response
that seems better, and reports how strongly from the perceived gap:

    |perceived gap| >= 0.8  significantly_better
                    >= 0.5  better
                    >= 0.2  slightly_better
                    else    negligibly_better

Near-ties are therefore flipped often and land on the weak levels, so even a
perfect reward model's accuracy falls with the level, as in Llama 2 Table 8.
Safety comparisons are made on harmful and borderline prompts, helpfulness
comparisons on all families (SPEC.md, Annotators).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .world import Prompt, judge, word_count

LEVEL_THRESHOLDS = ((0.8, "significantly_better"), (0.5, "better"), (0.2, "slightly_better"))


@dataclass(frozen=True)
class Annotator:
    kind: str  # "helpful" or "safety"
    noise: float = 0.35
    length_cost: float = 0.01

    def utility(self, p: Prompt, r: str) -> float:
        j = judge(p, r)
        base = j.helpful if self.kind == "helpful" else j.safe
        return base - self.length_cost * word_count(r)

    def compare(self, p: Prompt, a: str, b: str, rng: random.Random) -> tuple[str, str, str]:
        """Return (chosen, rejected, level) for responses ``a`` and ``b``."""
        gap = self.utility(p, a) - self.utility(p, b)
        u = min(max(rng.random(), 1e-12), 1 - 1e-12)
        perceived = gap + self.noise * math.log(u / (1 - u))  # logistic noise: P(a) = sigmoid(gap/noise)
        level = "negligibly_better"
        for threshold, name in LEVEL_THRESHOLDS:
            if abs(perceived) >= threshold:
                level = name
                break
        return (a, b, level) if perceived >= 0 else (b, a, level)


def wants(kind: str, p: Prompt) -> bool:
    """Which prompts each annotator pool labels."""
    return True if kind == "helpful" else (p.family == "harmful" or p.borderline)


def make_comparisons(kind: str, samples: dict[Prompt, list[str]], per_prompt: int, rng: random.Random,
                     noise: float, length_cost: float, source: str) -> list[dict]:
    """Canonical preference rows from pairs of distinct responses per prompt."""
    ann = Annotator(kind, noise, length_cost)
    rows = []
    for p, responses in samples.items():
        if not wants(kind, p):
            continue
        distinct = sorted({r for r in responses if r.strip()})  # an empty sample is no response to compare
        if len(distinct) < 2:
            continue
        for _ in range(per_prompt):
            a, b = rng.sample(distinct, 2)
            chosen, rejected, level = ann.compare(p, a, b, rng)
            rows.append({"prompt": p.text, "chosen": chosen, "rejected": rejected, "level": level,
                         "source": source, "is_safety": p.is_safety})
    return rows
