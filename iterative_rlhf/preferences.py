"""Preference (comparison) data: one loader, one canonical schema, the Llama 2 RM mix.

Scope: read comparison data from a local file or folder (``.jsonl``, ``.json``,
``.jsonl.gz``, ``.parquet``, ``.csv``) or a Hugging Face hub dataset through
``datasets``; turn each public format into the canonical schema
:data:`CANONICAL_COLUMNS`; compute the margin per level (Llama 2 §3.2.2,
Table 27, via :func:`iterative_rlhf.rlmath.margin_for`); mix the data per reward
model as Llama 2 did; split and write; a campaign's prompt files from the
comparisons' prompts (:func:`prompt_rows`). No tokenization or training happens here.

Canonical schema (one row = one comparison):

* ``prompt`` (str), ``chosen`` (str), ``rejected`` (str): the texts.
* ``level`` (str or None): one of :data:`LEVELS` or None when the data carries no
  preference strength. None gets margin 0.0 under every scheme (the same as
  "negligibly better / unsure").
* ``margin`` (float): from ``level`` and the margin scheme; a canonical file may
  give its own finite margins, which are kept.
* ``source`` (str): where the row came from (``source_name`` or the file stem).
* ``is_safety`` (bool): feeds the safety RM (and the gate's IS_SAFETY tag).

Errors versus drops. A row that the *user* got wrong (their own canonical file:
missing columns, empty text, chosen equal to rejected, unknown level, non-finite
margin, wrong type) raises :class:`~iterative_rlhf.errors.DataError` naming the
file, the row and the field. A real-data quirk of a *public* set (HH-RLHF,
PKU-SafeRLHF, score sets) is not the user's fault: the adapter drops the row
and counts it by reason in a :class:`LoadReport`; :func:`load_preferences` logs
``"hh-rlhf harmless-base-test: kept 2303 of 2312 rows; dropped: prompts differ 5,
empty response 4"``. Nothing is dropped silently. Row numbers are 1-based: for
JSONL the line number, for CSV the data row (header not counted), otherwise the
record index.

Anthropic HH-RLHF (``format="hh-rlhf"``, :func:`hh_rlhf_split`). Each row has
``chosen`` and ``rejected``, each a whole dialogue of ``"\\n\\nHuman: ..."`` and
``"\\n\\nAssistant: ..."`` turns that should differ only in the final assistant
turn. The prompt is the dialogue up to and including the last
``"\\n\\nAssistant:"``, stripped (so it reads ``"Human: ...\\n\\nAssistant:"``);
each response is the final assistant turn, stripped. HH has no strength
ratings: level None (margin 0). ``is_safety`` comes from ``kind``, else from the
name: "harmless"/"red-team" subsets feed the safety RM, "helpful" ones do not.
Quirks found in the real harmless-base test split (2,312 rows,
``harmless-base-test.jsonl.gz``), with counts:

* prompts differ: 5 rows (file rows 1255, 1689, 1951, 1953, 2037). One side
  (chosen in four, rejected in row 1951) has an extra assistant turn: two
  ``"\\n\\nAssistant:"`` turns in a row. In four rows the first is a model
  reply holding an inline ``"  Human: ..."`` (no blank line) that the second
  answers; in row 1953 the model simply went on in a second turn. The text
  before the last ``"\\n\\nAssistant:"`` then differs between the sides, and
  the pair no longer compares two answers to one prompt. Dropped ("prompts
  differ").
* empty final turn: 4 rows (87, 517, 926, 1104), always the *chosen* side,
  which ends in ``"Assistant: "`` (the labeller preferred an empty reply to a
  harmful one). An empty text cannot be scored as a response or sampled as a
  target. Dropped ("empty response").
* inline ``"Human:"`` inside a final response: 31 kept rows (32 in the file,
  one of them among the "prompts differ" rows). The model wrote a fake user
  turn into its own reply; this is what was labelled, so the row is kept and
  counted as a note ("inline 'Human:' in a response").
* two consecutive assistant turns inside the shared prompt: 4 kept rows (668,
  764, 1320, 1850; the same on both sides, so harmless).
* not present in this file but handled (counted drops): identical chosen and
  rejected ("identical responses"), no ``"\\n\\nAssistant:"`` turn ("no assistant
  turn"), a human turn after the last assistant turn ("last turn not
  assistant"). All dialogues start with ``"\\n\\nHuman:"``; no duplicate pairs;
  the 2,303 kept pairs have 2,301 distinct prompts.

PKU-SafeRLHF (``format="pku-saferlhf"``, :func:`pku_saferlhf_pair`). Each row
holds two comparisons of ``response_0`` and ``response_1``; ``kind`` picks one
(required):

* ``kind="helpful"``: chosen = ``better_response_id``; level None (the data has
  no helpfulness strength); ``is_safety`` True when either response is unsafe
  (such prompts are the ones the gate should score with the safety RM).
* ``kind="safety"``: chosen = ``safer_response_id``; ``is_safety`` True. Level:
  exactly one response safe -> ``significantly_better``; both safe ->
  ``negligibly_better``; both unsafe -> by the severity gap
  ``severity(rejected) - severity(chosen)`` (levels 1-3): gap >= 2 ``better``,
  gap 1 ``slightly_better``, gap <= 0 ``negligibly_better`` (a "safer" pick
  that is not less severe is the weakest preference); severity columns absent
  -> None. A row whose "safer" response is the unsafe one while the other is
  safe contradicts itself: dropped ("safer response is the unsafe one").

Score sets (``format="scores"``, :func:`scores_pair`). A prompt (``prompt`` or
``instruction``) with scored responses, in one of three layouts:
UltraFeedback-style ``completions: [{"response": ..., "overall_score"|"score": x}]``;
flattened ``response_a``/``score_a``, ``response_b``/``score_b`` (any letters);
HelpSteer-style rows of one ``response`` each with attribute columns, grouped
by prompt (the report then counts prompts, not rows). A completion without an
overall score is scored by the mean of :data:`HELPSTEER_ATTRIBUTES`
(helpfulness, correctness, coherence; complexity and verbosity describe a
response, they do not rate it). One pair per prompt: best versus worst (as
Llama 2 took one comparison per prompt; all pairs would over-weight prompts
with many responses and add correlated near-ties). Level from the score gap
relative to the top of the scale ``scale`` (default 10 for scores, 4 for
HelpSteer's 0-4 attributes): gap >= 0.3*scale ``significantly_better``,
>= 0.2*scale ``better``, >= 0.1*scale ``slightly_better``, else
``negligibly_better`` (on 1-10: 3, 2, 1). Ties are dropped ("tied scores").

Mixing (:func:`mix_for_rm`, Llama 2 §3.2.2): helpfulness RM = all helpfulness
data + an equal amount of safety data; safety RM = safety data mixed 90/10 with
helpfulness data.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .console import log, warn
from .errors import DataError, UserError
from .io import atomic_write_jsonl
from .rlmath import LEVELS, MARGINS, margin_for

__all__ = [
    "CANONICAL_COLUMNS",
    "FEATURES",
    "FORMATS",
    "KINDS",
    "LEVELS",
    "MARGINS",
    "HELPSTEER_ATTRIBUTES",
    "SCORE_GAP_FRACTIONS",
    "LoadReport",
    "parse_level",
    "DroppedRow",
    "RowError",
    "detect_format",
    "load_preferences",
    "load_preferences_with_report",
    "hh_rlhf_split",
    "pku_saferlhf_pair",
    "pku_safety_level",
    "scores_pair",
    "score_gap_level",
    "held_out_prompt",
    "hold_out_by_prompt",
    "mix_for_rm",
    "prompt_rows",
    "split_train_test",
    "write_preferences",
]

CANONICAL_COLUMNS: tuple[str, ...] = (
    "prompt", "chosen", "rejected", "level", "margin", "source", "is_safety")

FEATURES = datasets.Features({
    "prompt": datasets.Value("string"),
    "chosen": datasets.Value("string"),
    "rejected": datasets.Value("string"),
    "level": datasets.Value("string"),
    "margin": datasets.Value("float64"),
    "source": datasets.Value("string"),
    "is_safety": datasets.Value("bool"),
})

FORMATS: tuple[str, ...] = ("auto", "canonical", "hh-rlhf", "pku-saferlhf", "scores")
KINDS: tuple[str, ...] = ("helpful", "safety")

#: HelpSteer attributes that rate quality; averaged when a response has no overall score.
HELPSTEER_ATTRIBUTES: tuple[str, ...] = ("helpfulness", "correctness", "coherence")

#: Score-gap thresholds as fractions of the scale top, for significantly / better / slightly.
SCORE_GAP_FRACTIONS: tuple[float, float, float] = (0.3, 0.2, 0.1)

# What each format needs, for error messages (the scores format checks its layouts itself).
_NEEDS = {
    "canonical": "prompt, chosen, rejected (optional: level, margin, source, is_safety)",
    "hh-rlhf": "chosen, rejected (whole HH dialogues)",
    "pku-saferlhf": "prompt, response_0, response_1, better_response_id (kind='helpful') or "
                    "safer_response_id, is_response_0_safe, is_response_1_safe (kind='safety')",
    "scores": "prompt or instruction, plus completions, or response_a/score_a + response_b/score_b, "
              "or response + helpfulness/correctness/coherence",
}
_PKU_REQUIRED = {
    "helpful": ("prompt", "response_0", "response_1", "better_response_id"),
    "safety": ("prompt", "response_0", "response_1", "safer_response_id", "is_response_0_safe",
               "is_response_1_safe"),
}
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
               ".parquet": "parquet", ".csv": "csv"}
_TEXT_COLUMNS = frozenset({"prompt", "chosen", "rejected", "level", "source", "instruction", "response",
                           "response_0", "response_1"})
_EMPTY_FILE = "empty file: no rows to read; add comparisons or pick another file"
_ASSISTANT = "\n\nAssistant:"
_HUMAN = "\n\nHuman:"
_INLINE_HUMAN = re.compile(r"(?<!\n\n)\bHuman:")
_FLAT_RESPONSE = re.compile(r"^response_([a-z])$")


# --------------------------------------------------------------------------- report and row outcomes


@dataclass
class LoadReport:
    """What a load kept and dropped: ``n_out + sum(dropped.values()) == n_in``."""

    source: str
    n_in: int
    n_out: int
    dropped: dict[str, int] = field(default_factory=dict)
    format: str = ""
    #: kept rows with a quirk worth knowing (not dropped), by reason
    notes: dict[str, int] = field(default_factory=dict)
    #: what n_in counts: "rows", or "prompts" for score sets grouped by prompt
    unit: str = "rows"

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        """One line: ``"hh-rlhf x: kept 2303 of 2312 rows; dropped: prompts differ 5, ..."``."""
        by_count = sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))
        dropped = ", ".join(f"{k} {v}" for k, v in by_count)
        line = f"{self.format} {self.source}: kept {self.n_out} of {self.n_in} {self.unit}; " \
               f"dropped: {dropped or 'none'}"
        if self.notes:
            line += "; kept with notes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.notes.items()))
        return line


class DroppedRow(Exception):
    """A real-data quirk of a public set: the row is dropped and counted under ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RowError(ValueError):
    """A user error in one row; the loader adds file and row and raises a DataError."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


# --------------------------------------------------------------------------- value checks


def _preview(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(value: Any) -> str:
    return type(value).__name__


def _user_text(row: Mapping[str, Any], name: str) -> str:
    """Text the user wrote (canonical files): empty or non-text is an error."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError("empty text; every comparison needs a non-empty prompt, chosen and rejected: "
                       "fill it in or remove the row", name)
    if not isinstance(value, str):
        raise RowError(f"wrong type: expected text (a string), got {_type_name(value)} {_preview(value)}; "
                       "quote it in the file", name)
    return value


def _public_text(row: Mapping[str, Any], name: str, reason: str) -> str:
    """Text from a public set: empty is a counted drop, non-text a broken file (error)."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DroppedRow(reason)
    if not isinstance(value, str):
        raise RowError(f"wrong type: expected text (a string), got {_type_name(value)} {_preview(value)}; "
                       f"is this really the {name} column?", name)
    return value.strip()


def _as_int(row: Mapping[str, Any], name: str, allowed: Iterable[int] | None = None) -> int:
    value = row.get(name)
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise RowError(f"wrong type: expected an integer, got {_type_name(value)} {_preview(value)}", name)
    if allowed is not None and value not in set(allowed):
        raise RowError(f"expected one of {sorted(set(allowed))}, got {value}", name)
    return value


def _as_bool(row: Mapping[str, Any], name: str) -> bool:
    value = row.get(name)
    if not isinstance(value, bool):
        raise RowError(f"wrong type: expected true or false, got {_type_name(value)} {_preview(value)}", name)
    return value


def _as_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(f"wrong type: expected a number, got {_type_name(value)} {_preview(value)}", name)
    return float(value)


def parse_level(value: Any, name: str = "level") -> str | None:
    """A level name, or None for empty; accepts spaces, hyphens and any case ("Slightly better")."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise RowError(f"wrong type: expected a level name, got {_type_name(value)} {_preview(value)}; "
                       f"use one of {', '.join(LEVELS)}", name)
    level = re.sub(r"[\s\-]+", "_", value.strip().lower())
    if level not in LEVELS:
        raise RowError(f"unknown level {_preview(value)}; use one of {', '.join(LEVELS)}, "
                       "or leave it empty for an unrated pair (margin 0)", name)
    return level


# --------------------------------------------------------------------------- adapters (pure)


def hh_rlhf_split(dialogue_chosen: str, dialogue_rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF dialogues into ``(prompt, chosen, rejected)``.

    The prompt is the dialogue up to and including the last ``"\\n\\nAssistant:"``,
    stripped; each response is the text of the final assistant turn, stripped.

    Raises:
        DroppedRow: a real-data quirk, with reason "no assistant turn", "last turn
            not assistant", "prompts differ", "empty response" or "identical responses".
    """
    halves = []
    for dialogue in (dialogue_chosen, dialogue_rejected):
        if dialogue.startswith(("Human:", "Assistant:")):  # tolerate a missing leading blank line
            dialogue = "\n\n" + dialogue
        cut = dialogue.rfind(_ASSISTANT)
        if cut < 0:
            raise DroppedRow("no assistant turn")
        prompt, response = dialogue[:cut + len(_ASSISTANT)], dialogue[cut + len(_ASSISTANT):]
        if _HUMAN in response:
            raise DroppedRow("last turn not assistant")
        halves.append((prompt.strip(), response.strip()))
    (prompt_c, chosen), (prompt_r, rejected) = halves
    if dialogue_chosen.strip() == dialogue_rejected.strip():
        raise DroppedRow("identical responses")
    if prompt_c != prompt_r:
        raise DroppedRow("prompts differ")
    if not chosen or not rejected:
        raise DroppedRow("empty response")
    if chosen == rejected:
        raise DroppedRow("identical responses")
    return prompt_c, chosen, rejected


def pku_safety_level(chosen_safe: bool, rejected_safe: bool, chosen_severity: int | None,
                     rejected_severity: int | None) -> str | None:
    """Level of a PKU-SafeRLHF safety comparison (see the module docstring).

    Raises:
        DroppedRow: the chosen ("safer") response is unsafe while the rejected one is safe.
    """
    if chosen_safe and not rejected_safe:
        return "significantly_better"
    if rejected_safe and not chosen_safe:
        raise DroppedRow("safer response is the unsafe one")
    if chosen_safe and rejected_safe:
        return "negligibly_better"
    if chosen_severity is None or rejected_severity is None:
        return None
    gap = rejected_severity - chosen_severity
    if gap >= 2:
        return "better"
    return "slightly_better" if gap == 1 else "negligibly_better"


def pku_saferlhf_pair(row: Mapping[str, Any], kind: str) -> tuple[str, str, str, str | None, bool]:
    """One PKU-SafeRLHF row to ``(prompt, chosen, rejected, level, is_safety)`` for ``kind``.

    Raises:
        DroppedRow: "empty prompt", "empty response", "identical responses",
            "safer response is the unsafe one".
        RowError: a value of the wrong type (names the field).
    """
    prompt = _public_text(row, "prompt", "empty prompt")
    responses = (_public_text(row, "response_0", "empty response"),
                 _public_text(row, "response_1", "empty response"))
    if responses[0] == responses[1]:
        raise DroppedRow("identical responses")
    if kind == "helpful":
        better = _as_int(row, "better_response_id", (0, 1))
        # the safety flags are optional here: a missing one does not make the prompt a safety prompt
        unsafe_any = any(row.get(f"is_response_{i}_safe") is not None
                         and not _as_bool(row, f"is_response_{i}_safe") for i in (0, 1))
        return prompt, responses[better], responses[1 - better], None, unsafe_any
    if kind != "safety":
        raise UserError(f"pku-saferlhf: unknown kind {kind!r}; pass kind='helpful' or kind='safety'")
    safer = _as_int(row, "safer_response_id", (0, 1))
    safe = [_as_bool(row, f"is_response_{i}_safe") for i in (0, 1)]
    severity: list[int | None] = [None, None]
    for i in (0, 1):
        if row.get(f"response_{i}_severity_level") is not None:
            severity[i] = _as_int(row, f"response_{i}_severity_level")
    level = pku_safety_level(safe[safer], safe[1 - safer], severity[safer], severity[1 - safer])
    return prompt, responses[safer], responses[1 - safer], level, True


def score_gap_level(gap: float, scale: float = 10.0) -> str:
    """Level for a score gap on a scale whose top is ``scale`` (1-10 scores: 3/2/1 thresholds)."""
    significantly, better, slightly = (f * scale - 1e-9 for f in SCORE_GAP_FRACTIONS)
    if gap >= significantly:
        return "significantly_better"
    if gap >= better:
        return "better"
    return "slightly_better" if gap >= slightly else "negligibly_better"


def scores_pair(prompt: str, scored: list[tuple[str, float]],
                scale: float = 10.0) -> tuple[str, str, str, str]:
    """Best versus worst of ``scored`` ``(response, score)``: ``(prompt, chosen, rejected, level)``.

    Ties keep the first response listed, so the result does not depend on sort stability.

    Raises:
        DroppedRow: "fewer than two scored responses", "tied scores", "identical responses".
    """
    if len(scored) < 2:
        raise DroppedRow("fewer than two scored responses")
    best = max(range(len(scored)), key=lambda i: (scored[i][1], -i))
    worst = min(range(len(scored)), key=lambda i: (scored[i][1], i))
    gap = scored[best][1] - scored[worst][1]
    if gap <= 0:
        raise DroppedRow("tied scores")
    if scored[best][0] == scored[worst][0]:
        raise DroppedRow("identical responses")
    return prompt, scored[best][0], scored[worst][0], score_gap_level(gap, scale)


def _score_of(item: Mapping[str, Any], where: str = "") -> float | None:
    """Overall score of one completion, else the mean of the HelpSteer attributes; None if unscored."""
    prefix = f"{where}." if where else ""
    for key in ("overall_score", "score"):
        if item.get(key) is not None:
            value = _as_number(item[key], prefix + key)
            return value if math.isfinite(value) else None
    attrs = [_as_number(item[a], prefix + a) for a in HELPSTEER_ATTRIBUTES if item.get(a) is not None]
    attrs = [a for a in attrs if math.isfinite(a)]
    return sum(attrs) / len(attrs) if attrs else None


def _scored_from_row(row: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(response, score) pairs of one score-set row, completions or flattened layout."""
    scored: list[tuple[str, float]] = []
    if row.get("completions") is not None:
        completions = row["completions"]
        if not isinstance(completions, list):
            raise RowError(f"wrong type: expected a list of completions, got {_type_name(completions)}",
                           "completions")
        for i, item in enumerate(completions):
            where = f"completions[{i}]"
            if not isinstance(item, Mapping):
                raise RowError(f"wrong type: expected an object, got {_type_name(item)}", where)
            text = next((item[k] for k in ("response", "text", "completion") if item.get(k) is not None),
                        None)
            if text is not None and not isinstance(text, str):
                raise RowError(f"wrong type: expected text, got {_type_name(text)}", f"{where}.response")
            score = _score_of(item, where)
            if text and text.strip() and score is not None:
                scored.append((text.strip(), score))
        return scored
    for name in sorted(row):
        m = _FLAT_RESPONSE.match(name)
        if not m or row.get(f"score_{m.group(1)}") is None:
            continue
        text = row[name]
        if text is not None and not isinstance(text, str):
            raise RowError(f"wrong type: expected text, got {_type_name(text)} {_preview(text)}", name)
        score = _as_number(row[f"score_{m.group(1)}"], f"score_{m.group(1)}")
        if text and text.strip() and math.isfinite(score):
            scored.append((text.strip(), score))
    return scored


# --------------------------------------------------------------------------- format detection


def _scores_layout(columns: set[str]) -> str | None:
    if not columns & {"prompt", "instruction"}:
        return None
    if "completions" in columns:
        return "completions"
    letters = {m.group(1) for c in columns if (m := _FLAT_RESPONSE.match(c))}
    if sum(f"score_{x}" in columns for x in letters) >= 2:
        return "flat"
    if "response" in columns and columns & {"overall_score", "score", *HELPSTEER_ATTRIBUTES}:
        return "grouped"
    return None


def detect_format(columns: Iterable[str]) -> str | None:
    """The format a set of column names looks like, or None."""
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return "canonical"
    if {"chosen", "rejected"} <= cols:
        return "hh-rlhf"
    if {"response_0", "response_1"} <= cols and cols & {"better_response_id", "safer_response_id"}:
        return "pku-saferlhf"
    if _scores_layout(cols) is not None:
        return "scores"
    return None


def _check_columns(fmt: str, columns: list[str], kind: str | None, where: str) -> None:
    cols = set(columns)
    found = ", ".join(columns) or "none"
    if fmt == "scores":
        if _scores_layout(cols) is None:
            raise DataError(f"format 'scores' needs columns {_NEEDS['scores']}; found: {found}. "
                            "Rename the columns or pass another format=", path=where,
                            field="prompt" if not cols & {"prompt", "instruction"} else "completions")
        return
    if fmt == "canonical":
        need: tuple[str, ...] = ("prompt", "chosen", "rejected")
    elif fmt == "hh-rlhf":
        need = ("chosen", "rejected")
    else:
        need = _PKU_REQUIRED[kind or "helpful"]
    missing = [c for c in need if c not in cols]
    if missing:
        raise DataError(f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                        f"format '{fmt}' needs {_NEEDS[fmt]}; found: {found}. "
                        "Rename the columns or pass another format=", path=where, field=missing[0])


# --------------------------------------------------------------------------- reading files


def _builder_for(path: Path) -> str | None:
    name = path.name.lower()
    return next((b for ext, b in _EXTENSIONS.items() if name.endswith(ext)), None)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") \
        else open(path, encoding="utf-8")


def _is_json_lines(path: Path) -> bool:
    """JSON Lines (one object a line) rather than one JSON array or object."""
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                return not line.lstrip().startswith("[")
    return True


class _RowLocator:
    """Row numbers as the user sees them: JSONL line numbers, else 1-based record index."""

    def __init__(self, path: Path | None, builder: str | None) -> None:
        self.path, self.builder = path, builder
        self._lines: list[int] | None = None

    def row(self, index: int) -> int:
        if self.path is None or self.builder != "json" or not _is_json_lines(self.path):
            return index + 1
        if self._lines is None:  # only when reporting an error: map record index to line number
            with _open_text(self.path) as f:
                self._lines = [n for n, line in enumerate(f, start=1) if line.strip()]
        return self._lines[index] if index < len(self._lines) else index + 1


def _diagnose(path: Path, builder: str, error: BaseException) -> DataError:
    """Turn a datasets read failure into a DataError naming the bad line where possible."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    if builder == "json":
        with _open_text(path) as f:
            text = f.read()
        if not text.strip():
            return DataError(_EMPTY_FILE, path=str(path))
        if _is_json_lines(path):
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return DataError(f"malformed JSON ({e.msg}); fix or remove that line", path=str(path),
                                     row=lineno)
                if not isinstance(obj, dict):
                    return DataError("expected a JSON object per line", path=str(path), row=lineno)
    if builder == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            if sum(1 for _ in csv.reader(f)) <= 1:
                return DataError("empty file: no rows below the header; add comparisons or pick another file",
                                 path=str(path))
    msg = str(cause).replace("\n", " ")[:200] or type(cause).__name__
    return DataError(f"could not read the file as {builder} ({msg}); check that it is valid {builder}",
                     path=str(path))


def _csv_text_converters(path: Path) -> dict[str, Any]:
    """Keep CSV text columns as text: pandas would read a response "4" as the number 4."""
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    return {c: str for c in header if c in _TEXT_COLUMNS or _FLAT_RESPONSE.match(c)}


def _read_file(path: Path) -> datasets.Dataset:
    builder = _builder_for(path)
    if builder is None:
        raise UserError(f"{path}: unsupported file type; use one of {', '.join(_EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise DataError(_EMPTY_FILE, path=str(path))
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        kwargs["converters"] = _csv_text_converters(path)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except (datasets.exceptions.DatasetsError, ValueError, StopIteration, OSError) as e:
        raise _diagnose(path, builder, e) from None
    if len(ds) == 0:
        raise DataError(_EMPTY_FILE, path=str(path))
    return ds


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and _builder_for(p) is not None)
    if not files:
        raise UserError(f"{path}: no preference files in this folder; expected {', '.join(_EXTENSIONS)}")
    return files


def _looks_local(source: str) -> bool:
    lower = source.lower()
    windows_path = os.sep != "/" and os.sep in source
    return (source.startswith(("/", ".", "~")) or source.count("/") > 1 or windows_path
            or any(lower.endswith(ext) for ext in _EXTENSIONS))


def _stem(path: Path) -> str:
    name = path.name
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


# --------------------------------------------------------------------------- the loader


@dataclass
class _Job:
    """One table to adapt: a local file (path set) or a hub split."""

    ds: datasets.Dataset
    label: str  # names the file (or hub dataset) in errors
    name: str  # default source name
    path: Path | None = None
    builder: str | None = None


def _hh_is_safety(kind: str | None, name: str) -> bool:
    if kind is not None:
        return kind == "safety"
    lower = name.lower()
    if "harmless" in lower or "red-team" in lower or "red_team" in lower:
        return True
    if "helpful" in lower:
        return False
    raise UserError(f"hh-rlhf {name}: cannot tell helpfulness from safety data by its name; "
                    "pass kind='safety' (harmless-*) or kind='helpful' (helpful-*)")


def _adapt(job: _Job, fmt: str, kind: str | None, scheme: str, source_name: str | None, scale: float | None,
           limit: int | None) -> tuple[dict[str, list], LoadReport]:
    ds = job.ds
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    _check_columns(fmt, ds.column_names, kind, job.label)
    source = source_name or job.name
    out: dict[str, list] = {c: [] for c in CANONICAL_COLUMNS}
    dropped: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    locator = _RowLocator(job.path, job.builder)
    hh_safety = _hh_is_safety(kind, source_name or f"{job.label} {job.name}") if fmt == "hh-rlhf" else False

    rows: Iterable[tuple[int, dict[str, Any]]] = _iter_rows(ds)
    unit = "rows"
    layout = _scores_layout(set(ds.column_names)) if fmt == "scores" else None
    if layout == "grouped":
        rows, unit = _group_by_prompt(ds, locator, job.label), "prompts"
    if scale is None:
        scale = 4.0 if layout == "grouped" and not {"overall_score", "score"} & set(ds.column_names) else 10.0

    n_in = 0
    for index, row in rows:
        n_in += 1
        try:
            level: str | None = None
            margin: float | None = None
            is_safety = kind == "safety"
            row_source = source
            if fmt == "canonical":
                prompt = _user_text(row, "prompt")
                chosen, rejected = _user_text(row, "chosen"), _user_text(row, "rejected")
                if chosen.strip() == rejected.strip():
                    raise RowError("chosen and rejected are the same text; a comparison needs two different "
                                   "responses: fix or remove the row", "rejected")
                level = parse_level(row.get("level"))
                if row.get("margin") is not None:
                    margin = _as_number(row["margin"], "margin")
                    if not math.isfinite(margin):
                        raise RowError(f"non-finite margin ({margin}); give a finite number or leave it "
                                       f"empty to use the '{scheme}' scheme", "margin")
                if row.get("is_safety") is not None:
                    is_safety = _as_bool(row, "is_safety")
                if row.get("source") is not None and str(row["source"]).strip():
                    if not isinstance(row["source"], str):
                        raise RowError(f"wrong type: expected a source name, got {_type_name(row['source'])}",
                                       "source")
                    row_source = row["source"]
            elif fmt == "hh-rlhf":
                for name in ("chosen", "rejected"):
                    value = row.get(name)
                    if not isinstance(value, str):
                        raise RowError(f"wrong type: expected a dialogue string, got {_type_name(value)} "
                                       f"{_preview(value)}", name)
                prompt, chosen, rejected = hh_rlhf_split(row["chosen"], row["rejected"])
                is_safety = hh_safety
                if _INLINE_HUMAN.search(chosen) or _INLINE_HUMAN.search(rejected):
                    notes["inline 'Human:' in a response"] += 1
            elif fmt == "pku-saferlhf":
                prompt, chosen, rejected, level, is_safety = pku_saferlhf_pair(row, kind or "")
            else:
                has_prompt = row.get("prompt") is not None or "instruction" not in row
                prompt_col = "prompt" if has_prompt else "instruction"
                prompt = _public_text(row, prompt_col, "empty prompt")
                prompt, chosen, rejected, level = scores_pair(prompt, _scored_from_row(row), scale)
        except DroppedRow as d:
            dropped[d.reason] += 1
            continue
        except RowError as e:
            raise DataError(e.message, path=job.label, row=locator.row(index), field=e.field) from None
        for col, value in zip(CANONICAL_COLUMNS, (prompt, chosen, rejected, level,
                                                  margin if margin is not None else margin_for(level, scheme),
                                                  row_source, is_safety)):
            out[col].append(value)
    report = LoadReport(source=source, n_in=n_in, n_out=len(out["prompt"]), dropped=dict(dropped),
                        format=fmt, notes=dict(notes), unit=unit)
    return out, report


def _iter_rows(ds: datasets.Dataset, batch_size: int = 1024) -> Iterable[tuple[int, dict[str, Any]]]:
    index = 0
    for batch in ds.iter(batch_size=batch_size):
        keys = list(batch)
        for j in range(len(batch[keys[0]]) if keys else 0):
            yield index, {k: batch[k][j] for k in keys}
            index += 1


def _group_by_prompt(ds: datasets.Dataset, locator: _RowLocator,
                     label: str) -> list[tuple[int, dict[str, Any]]]:
    """HelpSteer layout: one response a row -> one row per prompt with a ``completions`` list."""
    groups: dict[str, tuple[int, dict[str, Any]]] = {}
    for index, row in _iter_rows(ds):
        prompt = row.get("prompt", row.get("instruction"))
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"wrong type: expected text, got {_type_name(prompt)} {_preview(prompt)}",
                            path=label, row=locator.row(index), field="prompt")
        try:  # check types here, where the row number is still known
            if row.get("response") is not None and not isinstance(row["response"], str):
                raise RowError(f"wrong type: expected text, got {_type_name(row['response'])}", "response")
            _score_of(row)
        except RowError as e:
            raise DataError(e.message, path=label, row=locator.row(index), field=e.field) from None
        key = prompt or ""
        if key not in groups:
            groups[key] = (index, {"prompt": prompt, "completions": []})
        completion = {k: v for k, v in row.items() if k not in ("prompt", "instruction")}
        groups[key][1]["completions"].append(completion)
    return list(groups.values())


def load_preferences_with_report(source: str, *, format: str = "auto", kind: str | None = None,  # noqa: A002
                                 split: str = "train", margin_scheme: str = "small",
                                 source_name: str | None = None, limit: int | None = None,
                                 scale: float | None = None,
                                 data_dir: str | None = None) -> tuple[datasets.Dataset, LoadReport]:
    """Load comparisons into the canonical schema and say what was dropped; see :func:`load_preferences`."""
    if format not in FORMATS:
        raise UserError(f"unknown preference format {format!r}; use one of {', '.join(FORMATS)}")
    if kind not in (None, *KINDS):
        raise UserError(f"unknown kind {kind!r}; use 'helpful', 'safety' or leave it unset")
    if margin_scheme not in MARGINS:
        raise UserError(f"unknown margin scheme {margin_scheme!r}; use one of {', '.join(MARGINS)}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of rows, got {limit}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise UserError(f"scale must be the (positive) top of the score scale, got {scale}")

    jobs: list[_Job] = []
    local = Path(os.path.expanduser(source))
    if local.exists():
        for path in _local_files(local):
            jobs.append(_Job(_read_file(path), str(path), _stem(path), path, _builder_for(path)))
    elif _looks_local(source):
        raise UserError(f"{source}: file not found; give an existing file or folder, or a hub dataset name")
    else:
        name = source
        if ":" in source and not data_dir:  # 'NAME:SUBSET': a folder of the hub dataset (hub names have no ':')
            name, data_dir = source.split(":", 1)
            if not name or not data_dir:
                raise UserError(f"{source}: expected a hub name as NAME or NAME:SUBSET, e.g. "
                                "Anthropic/hh-rlhf:helpful-base")
        kwargs = {"data_dir": data_dir} if data_dir else {}
        try:
            ds = datasets.load_dataset(name, split=split, **kwargs)
        except Exception as e:  # hub errors come in many types; all mean "cannot load this name"
            msg = str(e).replace("\n", " ")[:200]
            raise UserError(f"{source}: could not load this hub dataset (split {split!r}): {msg}; check the "
                            "name and split, your network or HF_TOKEN, or give a local file") from None
        if len(ds) == 0:
            raise DataError(f"empty dataset: split {split!r} has no rows", path=source)
        jobs.append(_Job(ds, source, name + (f"/{data_dir}" if data_dir else "")))

    columns: dict[str, list[str]] = {}
    reports: list[LoadReport] = []
    parts: list[dict[str, list]] = []
    remaining = limit
    for job in jobs:
        fmt = format
        if fmt == "auto":
            detected = detect_format(job.ds.column_names)
            if detected is None:
                needs = "; ".join(f"{k}: {v}" for k, v in _NEEDS.items())
                found = ", ".join(job.ds.column_names)
                raise DataError(f"cannot tell the format from the columns ({found}); formats need {needs}. "
                                "Rename the columns or pass format=", path=job.label)
            fmt = detected
        if fmt == "pku-saferlhf" and kind is None:
            raise UserError(f"{job.label}: pku-saferlhf holds two comparisons per row; pass kind='helpful' "
                            "(better response) or kind='safety' (safer response)")
        columns.setdefault(fmt, job.ds.column_names)
        out, report = _adapt(job, fmt, kind, margin_scheme, source_name, scale, remaining)
        parts.append(out)
        reports.append(report)
        if remaining is not None:
            remaining -= min(remaining, len(job.ds))  # input rows read (n_in may count prompts)
            if remaining <= 0:
                break
    if len(columns) > 1:
        raise UserError(f"{source}: the folder mixes formats ({', '.join(columns)}); load each format "
                        "separately and mix with mix_for_rm")

    merged = {c: [v for part in parts for v in part[c]] for c in CANONICAL_COLUMNS}
    dropped: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    for r in reports:
        dropped.update(r.dropped)
        notes.update(r.notes)
    report = LoadReport(source=source_name or (reports[0].source if len(reports) == 1 else source),
                        n_in=sum(r.n_in for r in reports), n_out=len(merged["prompt"]), dropped=dict(dropped),
                        format=reports[0].format, notes=dict(notes), unit=reports[0].unit)
    if report.n_out == 0:
        raise DataError(f"no usable comparisons: {report.summary()}; check the format and kind",
                        path=jobs[0].label if len(jobs) == 1 else source)
    return datasets.Dataset.from_dict(merged, features=FEATURES), report


def load_preferences(source: str, *, format: str = "auto", kind: str | None = None,  # noqa: A002
                     split: str = "train", margin_scheme: str = "small", source_name: str | None = None,
                     limit: int | None = None, scale: float | None = None,
                     data_dir: str | None = None) -> datasets.Dataset:
    """Load preference data as a canonical ``datasets.Dataset`` and log what was kept and dropped.

    Args:
        source: a local file (``.jsonl``, ``.json``, ``.jsonl.gz``, ``.parquet``,
            ``.csv``), a folder of them (read in name order), or a hub dataset name
            (``datasets.load_dataset(source, split=split)``); ``NAME:SUBSET`` reads one
            folder of it (``data_dir=SUBSET``), e.g. ``Anthropic/hh-rlhf:helpful-base``.
        format: "auto" (detect by columns), "canonical", "hh-rlhf", "pku-saferlhf"
            or "scores".
        kind: "helpful" or "safety": which comparison to build where a row holds
            two (PKU-SafeRLHF, required there); elsewhere it sets ``is_safety``
            (default for canonical rows without the column; HH subset).
        split: hub split; ignored for local files.
        margin_scheme: "none", "small" or "large" (Llama 2 Table 27).
        source_name: value of the ``source`` column (default: file stem or hub name).
        limit: read at most this many input rows (before drops).
        scale: top of the score scale for ``format="scores"`` (default 10; 4 for
            HelpSteer attributes).
        data_dir: hub subset folder, e.g. "harmless-base" for Anthropic/hh-rlhf.

    Raises:
        DataError: a user error in the data; names file, row and field.
        UserError: a bad argument or an unreadable source.
    """
    ds, report = load_preferences_with_report(source, format=format, kind=kind, split=split,
                                              margin_scheme=margin_scheme, source_name=source_name,
                                              limit=limit, scale=scale, data_dir=data_dir)
    log(report.summary())
    return ds


# --------------------------------------------------------------------------- mixing, splitting, writing


def _canonical(ds: datasets.Dataset, what: str) -> datasets.Dataset:
    missing = [c for c in CANONICAL_COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"{what}: not canonical preference data, missing columns {', '.join(missing)}; "
                        "load it with load_preferences first")
    ds = ds.select_columns(list(CANONICAL_COLUMNS))
    return ds if ds.features == FEATURES else ds.cast(FEATURES)


def mix_for_rm(primary: datasets.Dataset, other: datasets.Dataset, kind: str, *, safety_fraction: float = 0.9,
               helpful_extra_ratio: float = 1.0, seed: int = 0) -> datasets.Dataset:
    """Training mix for one reward model, as Llama 2 §3.2.2 did.

    ``kind="helpful"``: all of ``primary`` (helpfulness data) plus
    ``round(helpful_extra_ratio * len(primary))`` rows of ``other`` (safety data),
    or all of ``other`` when it has fewer. ``kind="safety"``: all of ``primary``
    (safety data) plus ``round(len(primary) * (1 - f) / f)`` rows of ``other``
    (helpfulness data), f = ``safety_fraction``, so safety makes up f of the mix.
    The rows of ``other`` are a seeded random sample and the result is shuffled
    with ``seed``: the same inputs and seed give the same mix.
    """
    if kind not in KINDS:
        raise UserError(f"unknown reward model kind {kind!r}; use 'helpful' or 'safety'")
    primary, other = _canonical(primary, "primary"), _canonical(other, "other")
    if kind == "helpful":
        if not (math.isfinite(helpful_extra_ratio) and helpful_extra_ratio >= 0):
            raise UserError(f"helpful_extra_ratio must be >= 0, got {helpful_extra_ratio}")
        want = round(len(primary) * helpful_extra_ratio)
        other_kind = "safety"
    else:
        if not (0 < safety_fraction <= 1):
            raise UserError(f"safety_fraction must be in (0, 1], got {safety_fraction}")
        want = round(len(primary) * (1 - safety_fraction) / safety_fraction)
        other_kind = "helpfulness"
    take = min(want, len(other))
    if take < want:
        warn(f"{kind} RM mix: wanted {want} {other_kind} rows, only {len(other)} available; "
             "using all of them")
    extra = other.shuffle(seed=seed).select(range(take))
    mixed = datasets.concatenate_datasets([primary, extra]).shuffle(seed=seed)
    share = take / len(mixed) if len(mixed) else 0.0
    log(f"{kind} RM mix: {len(primary)} {'helpfulness' if kind == 'helpful' else 'safety'} + {take} "
        f"{other_kind} rows = {len(mixed)} ({share:.1%} {other_kind})")
    return mixed


def split_train_test(ds: datasets.Dataset, test_fraction: float,
                     seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Deterministic ``(train, test)`` split by prompt: all pairs of one prompt land on one side.

    Whole prompt groups go to test, in a seeded random order, until test holds at
    least ``test_fraction`` of the rows; at least one group stays on each side.
    Splitting by prompt keeps test accuracy honest (HH and PKU have several
    comparisons per prompt).
    """
    if not 0 < test_fraction < 1:
        raise UserError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(ds["prompt"]):
        groups.setdefault(prompt, []).append(i)
    if len(groups) < 2:
        raise UserError(f"cannot split {len(ds)} rows with {len(groups)} distinct prompt(s) into train "
                        "and test; need at least two prompts")
    order = list(groups)
    random.Random(seed).shuffle(order)
    target = test_fraction * len(ds)
    test_idx: list[int] = []
    for prompt in order[:-1]:
        if test_idx and len(test_idx) >= target:
            break
        test_idx.extend(groups[prompt])
    test_set = set(test_idx)
    train_idx = [i for i in range(len(ds)) if i not in test_set]
    return ds.select(train_idx), ds.select(sorted(test_idx))


def prompt_rows(train_sets: Iterable[datasets.Dataset], test_sets: Iterable[datasets.Dataset], *,
                max_train: int | None = None, max_eval: int | None = None) -> tuple[list[dict], list[dict]]:
    """A campaign's ``(train, eval)`` prompt rows (``prompt``, ``is_safety``) from canonical comparisons.

    Eval prompts are the distinct prompts of ``test_sets``; train prompts those of ``train_sets`` less the eval
    ones, so that the reports measure prompts the policy never trained on (an RM may have: a prompt held out of
    one RM's data can be in the other's training data). A prompt is
    safety-tagged (Llama 2's IS_SAFETY, which the gate reads) when any of its comparisons is a safety one.
    ``max_train`` / ``max_eval`` keep that many, chosen by the SHA-256 of the text (stable as the data grows),
    in the data's order.
    """
    def collect(sets: Iterable[datasets.Dataset]) -> dict[str, bool]:
        tags: dict[str, bool] = {}
        for ds in sets:
            for prompt, safety in zip(ds["prompt"], ds["is_safety"], strict=True):
                tags[prompt] = tags.get(prompt, False) or bool(safety)
        return tags

    def cap(tags: dict[str, bool], n: int | None) -> list[dict]:
        keep = set(tags)
        if n is not None and n < len(tags):
            keep = set(sorted(tags, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())[:n])
        return [{"prompt": t, "is_safety": tags[t]} for t in tags if t in keep]

    test = collect(test_sets)
    train = {t: v for t, v in collect(train_sets).items() if t not in test}
    return cap(train, max_train), cap(test, max_eval)


def _held_out_key(prompt: str) -> int:
    return int(hashlib.sha256(b"held-out:" + prompt.encode("utf-8")).hexdigest(), 16) % 10_000


def held_out_prompt(prompt: str, share: float) -> bool:
    """Whether ``prompt`` is in the ``share`` of prompts held out as a test set (by SHA-256 of the text).

    A property of the text alone, so a prompt is held out of every dataset that holds it (both RMs' data
    alike) and stays held out as the data grows.
    """
    return _held_out_key(prompt) < share * 10_000


def hold_out_by_prompt(ds: datasets.Dataset, share: float, what: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train, test)``: the comparisons of the :func:`held_out_prompt` prompts go to test, the rest to train.

    A set so small that none of its prompts is held out gives up its prompt of the lowest hash instead.
    """
    prompts = set(ds["prompt"])
    if len(prompts) < 2:
        raise UserError(f"{what}: {len(prompts)} distinct prompt(s); a test set needs a prompt of its own and "
                        "training another")
    held = {p for p in prompts if held_out_prompt(p, share)} or {min(prompts, key=_held_out_key)}
    if held == prompts:
        held.discard(max(prompts, key=_held_out_key))
    test_idx = [i for i, p in enumerate(ds["prompt"]) if p in held]
    train_idx = [i for i, p in enumerate(ds["prompt"]) if p not in held]
    return ds.select(train_idx), ds.select(test_idx)


def write_preferences(ds_or_rows: datasets.Dataset | Iterable[Mapping[str, Any]],
                      path: str | os.PathLike) -> int:
    """Write canonical rows as JSONL (atomic; non-finite numbers refused); returns the row count."""
    if isinstance(ds_or_rows, datasets.Dataset):
        missing = [c for c in CANONICAL_COLUMNS if c not in ds_or_rows.column_names]
        if missing:
            raise UserError(f"{path}: cannot write, the dataset lacks columns {', '.join(missing)}")
        rows: Iterable[Mapping[str, Any]] = ds_or_rows.select_columns(list(CANONICAL_COLUMNS))
    else:
        rows = ds_or_rows
    out = []
    for i, row in enumerate(rows, start=1):
        missing = [c for c in CANONICAL_COLUMNS if c not in row]
        if missing:
            raise DataError(f"cannot write a row without {', '.join(missing)}", path=str(path), row=i,
                            field=missing[0])
        out.append({c: row[c] for c in CANONICAL_COLUMNS})
    atomic_write_jsonl(path, out)
    return len(out)
