"""``iterative-rlhf sample``: K responses per prompt from any checkpoint, written as JSONL."""

from __future__ import annotations

from pathlib import Path

from .config import Recipe
from .console import log
from .errors import DataError
from .generation import fit_prompts, make_engine
from .io import atomic_write_jsonl, read_jsonl


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt rows: ``prompt`` (non-empty text) and optional ``is_safety`` (bool)."""
    rows = read_jsonl(path, required=["prompt"])
    for i, r in enumerate(rows, start=1):
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            raise DataError("expected non-empty text", path=str(path), row=i, field="prompt")
        if "is_safety" in r and not isinstance(r["is_safety"], bool):
            raise DataError(f"expected true/false, got {r['is_safety']!r}", path=str(path), row=i,
                            field="is_safety")
    return rows


def sample_file(recipe: Recipe, *, model: str, prompts_path: str | Path, out_path: str | Path, n: int,
                temperature: float, seed: int) -> list[dict]:
    rows = read_prompts(prompts_path)
    engine = make_engine(model, recipe.generation, seed=seed, trust_remote_code=recipe.model.trust_remote_code)
    try:
        texts = fit_prompts(engine.tokenizer, [r["prompt"] for r in rows], recipe.model.max_prompt_length,
                            str(prompts_path))
        res = engine.generate(texts, n, temperature, recipe.generation.max_new_tokens, seed)
    finally:
        engine.close()
    out = []
    for r, comps in zip(rows, res, strict=True):
        for j, c in enumerate(comps):
            out.append({**r, "response": c.text, "sample": j, "num_tokens": len(c.token_ids),
                        "finished": c.finished})
    atomic_write_jsonl(out_path, out)
    log(f"wrote {len(out)} samples ({len(rows)} prompts x {n}) to {out_path}")
    return out
