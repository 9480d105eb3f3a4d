"""Gold metrics of a policy on TinyWorld prompts (``iterative-rlhf tinyworld eval``)."""

from __future__ import annotations

from ..config import Recipe
from ..generation import Engine, make_engine
from .world import Prompt, get_prompts, metrics


def sample_world(engine: Engine, prompts: list[Prompt], samples: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[tuple[Prompt, str]]:
    """(prompt, response) pairs, ``samples`` per prompt."""
    res = engine.generate([p.text for p in prompts], samples, temperature, max_new_tokens, seed)
    return [(p, c.text) for p, comps in zip(prompts, res, strict=True) for c in comps]


def evaluate_policy(model: str, recipe: Recipe, split: str = "eval", samples: int = 4, seed: int = 0,
                    temperature: float = 1.0) -> dict[str, float | int]:
    """Sample ``samples`` responses per prompt of ``split`` and return the gold metrics (SPEC.md, Metrics)."""
    engine = make_engine(model, recipe.generation, seed=seed, trust_remote_code=recipe.model.trust_remote_code)
    try:
        pairs = sample_world(engine, get_prompts(split), samples, temperature, recipe.generation.max_new_tokens,
                             seed)
    finally:
        engine.close()
    return metrics(pairs)
