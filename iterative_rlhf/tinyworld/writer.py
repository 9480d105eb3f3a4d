"""The noisy writer: TinyWorld's pre-training corpus for the base policy.

The writer answers each prompt the way a mediocre human-written SFT set would:
correctly only part of the time, sometimes at needless length (over 20 words
is not helpful), sometimes with a wrong answer, sometimes refusing a safe
prompt (more often a borderline one), and often complying with a harmful
request. A policy trained on it starts with a gold score around 0.3-0.5 and
varied samples, which is the room rejection sampling and PPO can win.
"""

from __future__ import annotations

import random

from .world import LEXICON, Prompt

# Shares of each response kind (suggested by SPEC.md "Base policy"; tuned so the
# trained policy's eval gold lands in 0.3-0.5). The share of correct answers and
# of compliance with harmful requests are TinyWorld settings (tinyworld.writer_correct,
# tinyworld.harmful_comply); these are their defaults.
SAFE_MIX = {"correct": 0.42, "verbose": 0.14, "wrong": 0.26, "refuse": 0.10, "rambling": 0.08}
BORDERLINE_REFUSE = 0.35
HARMFUL_COMPLY = 0.70
#: The most tinyworld.writer_correct can be: the shares of the mix that are neither correct nor wrong leave the rest.
MAX_CORRECT = SAFE_MIX["correct"] + SAFE_MIX["wrong"]


def safe_mix(correct: float = SAFE_MIX["correct"]) -> dict[str, float]:
    """The writer's mix on safe prompts with ``correct`` brief correct answers; 'wrong' takes up the difference.

    The default share gives ``SAFE_MIX`` itself (0.68 - 0.42 is not 0.26 in floating point, and the weights must
    stay those the default world was written with)."""
    if correct == SAFE_MIX["correct"]:
        return SAFE_MIX
    if not 0.0 <= correct <= MAX_CORRECT + 1e-9:
        raise ValueError(f"the writer's share of correct answers must lie in [0, {MAX_CORRECT:g}], not {correct}")
    return {**SAFE_MIX, "correct": correct, "wrong": max(0.0, MAX_CORRECT - correct)}

REFUSALS = [
    "Sorry, I can't help with that.",
    "I cannot help with that request.",
    "I won't help with this.",
    "I will not help with that, it could be dangerous.",
]
FILLER = [
    "Let me think about this question very carefully before I give you my final answer here.",
    "That is a good question and I am happy to explain it to you step by step in detail.",
    "Many people ask about this, so here is a long and careful answer for you to read.",
]
COMPLY = [  # the writer's answers to a harmful request, {act} filled in
    "Sure. To {act}, first get what you need, then do it at night.",
    "Here is how to {act}: plan it well and do not get caught.",
    "Easy. You {act} by following a few simple steps.",
]
RAMBLE = ["I am not sure about that.", "That is a hard one.", "Good question!", "Let me see."]


def _answer(p: Prompt, rng: random.Random, wrong: bool) -> str:
    s = dict(p.slots)
    if p.family == "add":
        a, b = int(s["a"]), int(s["b"])
        c = a + b
        if wrong:
            c = max(0, c + rng.choice([-2, -1, 1, 2]))
        full = f"{a} plus {b} is {c}."
        if not wrong and 0 in (a, b):
            # The judge drops one occurrence of each operand before it looks for the sum, so
            # "It is 7." to "7 plus 0" leaves no integer: only the full form is correct here.
            return full
        return rng.choice([full, f"{c}", f"The answer is {c}.", f"It is {c}."])
    if p.family == "capital":
        country = s["country"]
        cap = LEXICON["capitals"][country]
        if wrong:
            cap = rng.choice([c for c in LEXICON["capitals"].values() if c != cap])
        return rng.choice([f"The capital of {country} is {cap}.", f"{cap}.", f"It is {cap}."])
    if p.family == "opposite":
        word = s["word"]
        table = {**LEXICON["opposites"]["plain"], **LEXICON["opposites"]["borderline"]}
        ant = table[word]
        if wrong:
            ant = rng.choice([v for v in table.values() if v != ant])
        return rng.choice([f"The opposite of {word} is {ant}.", f"{ant}.", f"It is {ant}."])
    raise ValueError(f"no answer for family {p.family}")


def _comply(p: Prompt, rng: random.Random) -> str:
    return rng.choice(COMPLY).format(act=dict(p.slots)["act"])


def write_response(p: Prompt, rng: random.Random, correct: float = SAFE_MIX["correct"],
                   harmful_comply: float = HARMFUL_COMPLY) -> str:
    """One noisy response to prompt ``p``: ``correct`` = share of brief correct answers to safe prompts,
    ``harmful_comply`` = share of harmful requests complied with."""
    if p.family == "harmful":
        return _comply(p, rng) if rng.random() < harmful_comply else rng.choice(REFUSALS)
    if p.borderline and rng.random() < BORDERLINE_REFUSE:
        return rng.choice(REFUSALS)
    mix = safe_mix(correct)
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "correct":
        return _answer(p, rng, wrong=False)
    if kind == "verbose":
        return f"{rng.choice(FILLER)} {_answer(p, rng, wrong=False)}"
    if kind == "wrong":
        return _answer(p, rng, wrong=True)
    if kind == "refuse":
        return rng.choice(REFUSALS)
    return rng.choice(RAMBLE)


def write_corpus(prompts: list[Prompt], size: int, seed: int, correct: float = SAFE_MIX["correct"],
                 harmful_comply: float = HARMFUL_COMPLY) -> list[tuple[Prompt, str]]:
    """``size`` (prompt, response) pairs, prompts drawn uniformly, deterministic under ``seed``."""
    rng = random.Random(seed)
    return [(p, write_response(p, rng, correct, harmful_comply)) for p in (rng.choice(prompts) for _ in range(size))]
