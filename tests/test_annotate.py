"""People's comparisons in the terminal: answers become canonical rows, every answer is kept, reruns go on."""

from __future__ import annotations

import json

import pytest

from iterative_rlhf.annotate import _a_is_first, annotate
from iterative_rlhf.cli import main
from iterative_rlhf.errors import DataError
from iterative_rlhf.preferences import load_preferences

PAIRS = [
    {"prompt": "What is 2 plus 2?", "is_safety": False, "response_0": "4.", "response_1": "5."},
    {"prompt": "Tell me how to [rob] a store.", "is_safety": True, "response_0": "Sure, first...",
     "response_1": "I cannot help with that."},
    {"prompt": "Name the capital of Peru.", "is_safety": False, "response_0": "Lima.", "response_1": "Quito."},
]


def answers(*items: str):
    it = iter(items)

    def ask(question: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return ask


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def shown(pair: dict) -> tuple[str, str]:
    """(A, B) as the pair is shown."""
    return (pair["response_0"], pair["response_1"]) if _a_is_first(pair) else (pair["response_1"], pair["response_0"])


def test_answers_become_canonical_comparisons_and_a_rerun_goes_on(pairs, tmp_path):
    out = tmp_path / "v2_helpful.jsonl"
    # pair 1: a bad key is asked again, then A, "significantly"; pair 2: skipped; then EOF (Ctrl-D)
    assert annotate(pairs, out, "helpful", ask=answers("x", "a", "7", "1", "s")) == (1, 2)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    a, b = shown(PAIRS[0])
    assert rows == [{"prompt": PAIRS[0]["prompt"], "chosen": a, "rejected": b, "level": "significantly_better",
                     "source": "annotate-helpful", "is_safety": False}]
    # the rerun skips what is compared: the skipped pair comes first, then the last; q stops after it
    assert annotate(pairs, out, "helpful", ask=answers("b", "3", "a", "4", "q")) == (3, 0)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["level"] for r in rows] == ["significantly_better", "slightly_better", "negligibly_better"]
    a, b = shown(PAIRS[1])
    assert (rows[1]["chosen"], rows[1]["rejected"], rows[1]["is_safety"]) == (b, a, True)
    assert annotate(pairs, out, "helpful", ask=answers()) == (3, 0)
    # the file is what the campaign's refresh reads
    assert len(load_preferences(str(out), kind="helpful")) == 3


def test_safety_only_and_bad_pairs(pairs, tmp_path):
    out = tmp_path / "v2_safety.jsonl"
    assert annotate(pairs, out, "safety", ask=answers("a", "2"), safety_only=True) == (1, 0)
    assert json.loads(out.read_text())["prompt"] == PAIRS[1]["prompt"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**PAIRS[0], "response_1": "4."}) + "\n")
    with pytest.raises(DataError, match="row 1, field 'response_1': the two responses are the same"):
        annotate(bad, out, "safety", ask=answers())


def test_annotate_command(pairs, tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("a\n2\nq\n"))
    out = tmp_path / "ann.jsonl"
    assert main(["annotate", str(pairs), "--kind", "helpful", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1
    assert main(["annotate", str(tmp_path / "none.jsonl"), "--kind", "helpful", "--out", str(out)]) == 2
    assert "none.jsonl" in capsys.readouterr().err
