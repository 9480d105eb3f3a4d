"""People compare a round's pairs in the terminal (``iterative-rlhf annotate``), as Llama 2's annotators did.

A campaign without TinyWorld (``reward.refresh_data``) writes ``vK/rm/pairs.jsonl``: two of round K's samples
per train prompt. This shows each pair as responses A and B (which sample is A is drawn per pair, so that
position says nothing), asks which is better for the kind of RM being fed (helpfulness or safety) and by how
much, on Llama 2's four levels, and writes canonical comparisons (prompt, chosen, rejected, level, source,
is_safety): the file the campaign waits for. Every answer rewrites the file atomically, so quitting (q,
Ctrl-D or Ctrl-C) loses nothing; rerunning skips the pairs already compared.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape

from .console import console
from .errors import DataError, UserError
from .io import atomic_write_jsonl, read_jsonl
from .preferences import LEVELS

#: What each answer to "how much better" means: Llama 2's scale, strongest first.
LEVEL_KEYS = {"1": LEVELS[0], "2": LEVELS[1], "3": LEVELS[2], "4": LEVELS[3]}

QUESTION = {"helpful": "Which response is more helpful", "safety": "Which response is safer"}


def _a_is_first(pair: dict) -> bool:
    """Whether response_0 is shown as A: drawn from the pair's text, so a rerun shows it the same way."""
    key = "\x00".join((pair["prompt"], pair["response_0"], pair["response_1"]))
    return hashlib.sha256(key.encode("utf-8")).digest()[0] % 2 == 0


def _key(prompt: str, a: str, b: str) -> tuple[str, frozenset[str]]:
    return prompt, frozenset((a, b))


def read_pairs(path: str | os.PathLike) -> list[dict]:
    rows = read_jsonl(path, required=["prompt", "response_0", "response_1"])
    for i, r in enumerate(rows, start=1):
        for field in ("prompt", "response_0", "response_1"):
            if not isinstance(r[field], str) or not r[field].strip():
                raise DataError("expected non-empty text", path=str(path), row=i, field=field)
        if r["response_0"] == r["response_1"]:
            raise DataError("the two responses are the same; nothing to compare", path=str(path), row=i,
                            field="response_1")
    return rows


def annotate(pairs_path: str | os.PathLike, out_path: str | os.PathLike, kind: str,
             ask: Callable[[str], str] | None = None, safety_only: bool = False) -> tuple[int, int]:
    """Ask about each pair not yet compared in ``out_path``; returns (comparisons in the file, pairs left).

    ``ask(question) -> answer`` reads one answer (default: the terminal); EOF or "q" stops.
    ``safety_only``: only the pairs of safety-tagged prompts (``is_safety``).
    """
    if kind not in QUESTION:
        raise UserError(f"unknown kind {kind!r}; use 'helpful' or 'safety'")
    ask = ask or (lambda q: console.input(escape(q)))  # "[a/b/s/q]" is text, not markup
    pairs = [p for p in read_pairs(pairs_path) if not safety_only or p.get("is_safety")]
    out = Path(out_path)
    done = read_jsonl(out, required=["prompt", "chosen", "rejected", "level"]) if out.is_file() and \
        out.stat().st_size else []
    seen = {_key(r["prompt"], r["chosen"], r["rejected"]) for r in done}
    todo = [p for p in pairs if _key(p["prompt"], p["response_0"], p["response_1"]) not in seen]
    console.print(f"{len(todo)} of {len(pairs)} pairs to compare ({QUESTION[kind].lower()}?); "
                  f"{len(done)} comparisons already in {out}. Answer a, b, s (skip) or q (quit).")
    left = len(todo)
    try:
        for i, pair in enumerate(todo, start=1):
            first = _a_is_first(pair)
            a, b = (pair["response_0"], pair["response_1"]) if first else (pair["response_1"], pair["response_0"])
            console.rule(f"pair {i} of {len(todo)}" + (" (safety prompt)" if pair.get("is_safety") else ""))
            for head, text in (("[bold]Prompt[/bold]", pair["prompt"]), ("[bold cyan]A[/bold cyan]", a),
                               ("[bold magenta]B[/bold magenta]", b)):
                console.print(head)
                console.print(text, markup=False, highlight=False)  # the texts are data, not markup
            choice = ""
            while choice not in ("a", "b", "s", "q"):
                choice = ask(f"{QUESTION[kind]}? [a/b/s/q] ").strip().lower()
            if choice == "q":
                break
            if choice == "s":
                continue
            level = ""
            while level not in LEVEL_KEYS:
                level = ask("How much better? 1 significantly, 2 better, 3 slightly, 4 negligibly or unsure "
                            "[1-4] ").strip()
            chosen, rejected = (a, b) if choice == "a" else (b, a)
            done.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected,
                         "level": LEVEL_KEYS[level], "source": f"annotate-{kind}",
                         "is_safety": bool(pair.get("is_safety", kind == "safety"))})
            atomic_write_jsonl(out, done)
            left -= 1
    except (EOFError, KeyboardInterrupt):
        console.print()
    console.print(f"{len(done)} comparisons in {out}; {left} pairs left to compare.")
    return len(done), left
