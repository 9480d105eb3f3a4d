"""Gold metrics of a policy on TinyWorld prompts (``iterative-rlhf tinyworld eval``)."""

from __future__ import annotations

from types import SimpleNamespace

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


class GoldScorer:
    """TinyWorld's gold judge as a PPO scorer (:class:`iterative_rlhf.ppo.Scorer`): the exact reward.

    ``reward`` = 2 * gold - 1 (whitened with PPO's statistics when it sets them); ``helpful`` and
    ``safety`` are the judge's 0/1 scores. What PPO reaches with it bounds what it can reach with
    learned reward models (``scripts/ppo_ceiling.py``, ``bench/bench_ppo.py tinyworld``).
    """

    def __init__(self) -> None:
        self.whiten = None

    def score(self, prompts: list[str], responses: list[str], is_safety: list[bool]) -> SimpleNamespace:  # noqa: ARG002
        import torch

        from .world import judge

        js = [judge(p, r) for p, r in zip(prompts, responses, strict=True)]
        reward = torch.tensor([2.0 * j.gold - 1.0 for j in js])
        if self.whiten is not None:
            reward = self.whiten.apply(reward)
        return SimpleNamespace(reward=reward, helpful=torch.tensor([float(j.helpful) for j in js]),
                               safety=torch.tensor([float(j.safe) for j in js]))

    def set_whitening(self, stats) -> None:  # noqa: ANN001
        self.whiten = stats

    def close(self) -> None:
        pass
