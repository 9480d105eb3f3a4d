"""Tests for the preference-data loader, adapters, margins, mixing and splitting."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import datasets
import pytest

from iterative_rlhf import preferences as prefs
from iterative_rlhf.errors import DataError, UserError
from iterative_rlhf.preferences import (
    CANONICAL_COLUMNS,
    LEVELS,
    DroppedRow,
    RowError,
    hh_rlhf_split,
    load_preferences,
    load_preferences_with_report,
    mix_for_rm,
    pku_saferlhf_pair,
    pku_safety_level,
    score_gap_level,
    scores_pair,
    split_train_test,
    write_preferences,
)

FIXTURES = Path(__file__).parent / "fixtures" / "preferences"
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ITERATIVE_RLHF_SHARED", REPO.parent / "shared"))
REAL_HH = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

H, A = "\n\nHuman: ", "\n\nAssistant: "


@pytest.fixture(autouse=True, scope="module")
def _private_hf_cache(tmp_path_factory):
    """Keep the Arrow caches that datasets writes out of the user's home folder."""
    mp = pytest.MonkeyPatch()
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    yield
    mp.undo()


@pytest.fixture
def logs(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(prefs, "log", lambda msg, **kw: lines.append(msg))
    monkeypatch.setattr(prefs, "warn", lambda msg: lines.append("warning: " + msg))
    return lines


def fx(name: str) -> str:
    return str(FIXTURES / name)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def canonical_rows(n: int, *, safety: bool, tag: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "prompt": [f"{tag} prompt {i}" for i in range(n)],
        "chosen": [f"{tag} good {i}" for i in range(n)],
        "rejected": [f"{tag} bad {i}" for i in range(n)],
        "level": ["better"] * n,
        "margin": [2 / 3] * n,
        "source": [tag] * n,
        "is_safety": [safety] * n,
    }, features=prefs.FEATURES)


# --------------------------------------------------------------------------- HH-RLHF


def test_hh_split_multi_turn():
    shared = H + "Hi." + A + "Hello! How can I help?" + H + "How do I pick a lock?"
    prompt, chosen, rejected = hh_rlhf_split(shared + A + " I can't help with that. ",
                                             shared + A + "Use a pick.")
    assert prompt == ("Human: Hi.\n\nAssistant: Hello! How can I help?\n\n"
                      "Human: How do I pick a lock?\n\nAssistant:")
    assert chosen == "I can't help with that."
    assert rejected == "Use a pick."


def test_hh_split_tolerates_missing_leading_blank_line():
    assert hh_rlhf_split("Human: Hi\n\nAssistant: A", "Human: Hi\n\nAssistant: B") == (
        "Human: Hi\n\nAssistant:", "A", "B")


@pytest.mark.parametrize("chosen, rejected, reason", [
    (H + "Q" + A + "same", H + "Q" + A + "same", "identical responses"),
    (H + "Q" + A + "same", H + "Q" + A + "same  ", "identical responses"),
    (H + "Q" + A + "one  Human: more?" + A + "two", H + "Q" + A + "other", "prompts differ"),
    (H + "Q" + A, H + "Q" + A + "text", "empty response"),
    (H + "Q", H + "Q?", "no assistant turn"),
    (H + "Q" + A + "a" + H + "bye", H + "Q" + A + "b" + H + "bye", "last turn not assistant"),
])
def test_hh_split_quirks_are_drops(chosen, rejected, reason):
    with pytest.raises(DroppedRow) as e:
        hh_rlhf_split(chosen, rejected)
    assert e.value.reason == reason


def test_hh_fixture_counts_every_drop(logs):
    ds = load_preferences(fx("hh-rlhf-harmless-sample.jsonl"))
    assert len(ds) == 2
    assert ds.column_names == list(CANONICAL_COLUMNS)
    assert all(ds["is_safety"]) and ds["level"] == [None, None] and ds["margin"] == [0.0, 0.0]
    assert ds[0]["prompt"].startswith("Human: Hi there.") and ds[0]["prompt"].endswith("Assistant:")
    (line,) = logs
    assert "kept 2 of 8 rows" in line
    for part in ("identical responses 2", "prompts differ 1", "empty response 1", "no assistant turn 1",
                 "last turn not assistant 1", "inline 'Human:' in a response 1"):
        assert part in line


def test_hh_report_and_kind():
    ds, report = load_preferences_with_report(fx("hh-rlhf-harmless-sample.jsonl"), kind="helpful",
                                              source_name="hh-helpful")
    assert report.format == "hh-rlhf" and report.n_in == 8 and report.n_out == 2
    assert report.n_out + report.n_dropped == report.n_in
    assert report.dropped == {"identical responses": 2, "prompts differ": 1, "empty response": 1,
                              "no assistant turn": 1, "last turn not assistant": 1}
    assert ds["is_safety"] == [False, False] and ds["source"] == ["hh-helpful"] * 2


def test_hh_needs_kind_when_name_says_nothing(tmp_path):
    path = tmp_path / "dialogues.jsonl"
    path.write_text((FIXTURES / "hh-rlhf-harmless-sample.jsonl").read_text())
    with pytest.raises(UserError, match="kind='safety'"):
        load_preferences(str(path))
    assert len(load_preferences(str(path), kind="safety")) == 2


@pytest.mark.skipif(not REAL_HH.exists(), reason=f"real HH-RLHF file not found at {REAL_HH}; "
                    "set ITERATIVE_RLHF_SHARED to the shared folder to run this test")
def test_real_hh_harmless_base_test():
    ds, report = load_preferences_with_report(str(REAL_HH), format="hh-rlhf")
    assert report.n_in == 2312
    assert report.n_out + report.n_dropped == 2312 == len(ds) + sum(report.dropped.values())
    assert report.dropped == {"prompts differ": 5, "empty response": 4}
    assert report.notes == {"inline 'Human:' in a response": 31}
    assert all(ds["is_safety"])
    assert all(p.startswith("Human:") and p.endswith("\n\nAssistant:") for p in ds["prompt"])
    assert all(c and r and c != r for c, r in zip(ds["chosen"], ds["rejected"]))
    # every prompt becomes alternating chat turns that end with the user's (iterative_rlhf.chat)
    from iterative_rlhf.chat import prompt_messages

    turns = [prompt_messages(p) for p in ds["prompt"]]
    assert all(m[-1]["role"] == "user" and "Human:" not in m[0]["content"] for m in turns)
    assert all(a["role"] != b["role"] for m in turns for a, b in zip(m, m[1:]))
    assert max(len(m) for m in turns) > 3


# --------------------------------------------------------------------------- PKU-SafeRLHF


def pku_row(s0, s1, sev0, sev1, safer=0, better=0, r0="resp zero", r1="resp one"):
    return {"prompt": "p", "response_0": r0, "response_1": r1, "better_response_id": better,
            "safer_response_id": safer, "is_response_0_safe": s0, "is_response_1_safe": s1,
            "response_0_severity_level": sev0, "response_1_severity_level": sev1}


@pytest.mark.parametrize("row, level", [
    (pku_row(True, False, 0, 3), "significantly_better"),
    (pku_row(False, False, 1, 3), "better"),
    (pku_row(False, False, 2, 3), "slightly_better"),
    (pku_row(False, False, 2, 2), "negligibly_better"),
    (pku_row(False, False, 3, 1), "negligibly_better"),
    (pku_row(True, True, 0, 0), "negligibly_better"),
    (pku_row(False, False, None, None), None),
])
def test_pku_safety_levels(row, level):
    prompt, chosen, rejected, got, is_safety = pku_saferlhf_pair(row, "safety")
    assert (prompt, chosen, rejected, got, is_safety) == ("p", "resp zero", "resp one", level, True)


def test_pku_safety_picks_safer_and_helpful_picks_better():
    row = pku_row(False, True, 2, 0, safer=1, better=0)
    assert pku_saferlhf_pair(row, "safety")[1:4] == ("resp one", "resp zero", "significantly_better")
    assert pku_saferlhf_pair(row, "helpful") == ("p", "resp zero", "resp one", None, True)
    assert pku_saferlhf_pair(pku_row(True, True, 0, 0, better=1), "helpful")[4] is False


def test_pku_quirks_are_drops():
    with pytest.raises(DroppedRow, match="safer response is the unsafe one"):
        pku_safety_level(False, True, 2, 0)
    with pytest.raises(DroppedRow, match="identical responses"):
        pku_saferlhf_pair(pku_row(True, True, 0, 0, r1="resp zero"), "safety")
    with pytest.raises(DroppedRow, match="empty response"):
        pku_saferlhf_pair(pku_row(True, True, 0, 0, r1="  "), "helpful")
    with pytest.raises(RowError) as e:
        pku_saferlhf_pair(pku_row(True, True, 0, 0, safer=2), "safety")
    assert e.value.field == "safer_response_id"


def test_pku_fixture_both_kinds():
    ds, report = load_preferences_with_report(fx("pku-saferlhf-sample.jsonl"), kind="safety")
    assert report.format == "pku-saferlhf" and report.n_in == 8
    assert report.dropped == {"safer response is the unsafe one": 1, "identical responses": 1}
    assert ds["level"] == ["significantly_better", "better", "slightly_better", "negligibly_better",
                           "negligibly_better", "negligibly_better"]
    assert ds["margin"] == pytest.approx([1, 2 / 3, 1 / 3, 0, 0, 0])
    assert all(ds["is_safety"])
    helpful, report = load_preferences_with_report(fx("pku-saferlhf-sample.jsonl"), kind="helpful")
    assert report.n_out == 7 and report.dropped == {"identical responses": 1}
    assert set(helpful["level"]) == {None}
    assert Counter(helpful["is_safety"]) == {True: 6, False: 1}  # only the bread row has two safe answers


def test_pku_needs_kind_and_reports_bad_ids(tmp_path):
    with pytest.raises(UserError, match="kind='helpful'"):
        load_preferences(fx("pku-saferlhf-sample.jsonl"))
    rows = [pku_row(True, False, 0, 2), pku_row(True, False, 0, 2, better=7)]
    path = write_jsonl(tmp_path / "pku.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_preferences(str(path), kind="helpful")
    msg = str(e.value)
    assert "pku.jsonl" in msg and "row 2" in msg and "field 'better_response_id'" in msg and "[0, 1]" in msg


def test_pku_limit(logs):
    ds, report = load_preferences_with_report(fx("pku-saferlhf-sample.jsonl"), kind="safety", limit=3)
    assert report.n_in == 3 and len(ds) == 3


# --------------------------------------------------------------------------- score sets


@pytest.mark.parametrize("gap, scale, level", [
    (3, 10, "significantly_better"), (2.99, 10, "better"), (2, 10, "better"), (1, 10, "slightly_better"),
    (0.99, 10, "negligibly_better"), (1.2, 4, "significantly_better"), (0.8, 4, "better"),
    (0.4, 4, "slightly_better"), (0.3, 4, "negligibly_better"),
])
def test_score_gap_levels(gap, scale, level):
    assert score_gap_level(gap, scale) == level


def test_scores_pair_best_versus_worst():
    assert scores_pair("p", [("mid", 5), ("best", 9), ("worst", 1)]) == ("p", "best", "worst",
                                                                       "significantly_better")
    for scored, reason in [([("a", 5)], "fewer than two"), ([("a", 5), ("b", 5)], "tied scores"),
                           ([("a", 5), ("a", 2)], "identical responses")]:
        with pytest.raises(DroppedRow, match=reason):
            scores_pair("p", scored)


def test_scores_fixtures():
    ds, report = load_preferences_with_report(fx("scores-ultrafeedback.jsonl"))
    assert report.format == "scores" and report.n_in == 7
    assert report.dropped == {"tied scores": 1, "fewer than two scored responses": 2}
    assert ds["level"] == ["significantly_better", "better", "slightly_better", "negligibly_better"]
    assert ds[0]["chosen"].startswith("Soft rain") and ds[0]["rejected"] == "I like cars."
    flat = load_preferences(fx("scores-flat.jsonl"), margin_scheme="large")
    assert flat["chosen"] == ["Rome.", "Blue."] and flat["margin"] == [3.0, 1.0]
    steer, report = load_preferences_with_report(fx("scores-helpsteer.jsonl"), kind="helpful")
    assert report.unit == "prompts" and report.n_in == 3
    assert report.dropped == {"fewer than two scored responses": 1}
    assert steer["level"] == ["significantly_better", "negligibly_better"]  # gaps 3 and 1/3 on 0-4
    assert steer["chosen"] == ["Masses attract each other.", "A word for an action."]
    # on a 0-10 reading of the same attributes the 3-point gap is only "significantly" at >= 3
    assert load_preferences(fx("scores-helpsteer.jsonl"), scale=20)["level"][0] == "slightly_better"


def test_scores_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "flat.jsonl", [
        {"prompt": "p", "response_a": "x", "response_b": "y", "score_a": 1, "score_b": 2},
        {"prompt": "p", "response_a": "x", "response_b": "y", "score_a": 1, "score_b": "high"}])
    with pytest.raises(DataError) as e:
        load_preferences(str(path))
    assert "flat.jsonl, row 2, field 'score_b'" in str(e.value) and "expected a number" in str(e.value)


# --------------------------------------------------------------------------- canonical files and margins


@pytest.mark.parametrize("name", ["canonical.jsonl", "canonical.csv", "canonical.parquet"])
@pytest.mark.parametrize("scheme, expected", [
    ("none", [0, 0, 0, 0, 2.5]), ("small", [1, 2 / 3, 1 / 3, 0, 2.5]), ("large", [3, 2, 1, 0, 2.5])])
def test_canonical_margins_per_scheme(name, scheme, expected):
    ds = load_preferences(fx(name), margin_scheme=scheme)
    assert ds.features == prefs.FEATURES
    assert ds["margin"] == pytest.approx(expected)  # the row with a margin of its own keeps it
    assert ds["level"] == [*LEVELS, None]
    assert ds["chosen"][2] == "4"  # a numeric-looking CSV cell stays text
    assert ds["is_safety"] == [False, True, False, False, False]
    assert ds["source"] == ["canonical"] * 4 + ["my-set"]


def test_canonical_kind_sets_default_is_safety_and_levels_are_normalised(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b", "level": "Slightly better"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "is_safety": False}])
    ds = load_preferences(str(path), kind="safety")
    assert ds["level"] == ["slightly_better", None] and ds["is_safety"] == [True, False]


def test_folder_and_mixed_formats(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p1", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p2", "chosen": "c", "rejected": "d", "level": "better"}])
    ds, report = load_preferences_with_report(str(tmp_path))
    assert ds["prompt"] == ["p1", "p2"] and report.n_in == 2 and ds["source"] == ["a", "b"]
    (tmp_path / "c.jsonl").write_text((FIXTURES / "scores-flat.jsonl").read_text())
    with pytest.raises(UserError, match="mixes formats"):
        load_preferences(str(tmp_path))


# --------------------------------------------------------------------------- error messages


def load_error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_preferences(str(path), **kw)
    msg = str(e.value)
    assert "\n" not in msg and path.name in msg
    return msg


@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "same text"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "empty text"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "empty text"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "level": "great"}, "level",
     "unknown level 'great'; use one of significantly_better, better, slightly_better, negligibly_better"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")}, "margin", "non-finite margin"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("inf")}, "margin", "non-finite margin"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a number"),
    ({"prompt": "p", "chosen": 7, "rejected": "b"}, "chosen", "wrong type: expected text"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "is_safety": "yes"}, "is_safety",
     "expected true or false"),
])
def test_canonical_row_errors_name_file_row_field(tmp_path, row, field, words):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")  # json writes NaN and Infinity bare
    msg = load_error(path)
    assert f"prefs.jsonl, row 2, field '{field}'" in msg and words in msg


def test_row_number_is_the_jsonl_line(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n'
                    '{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    assert "gaps.jsonl, row 3, field 'rejected'" in load_error(path)


def test_csv_row_error(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,,b\n")
    msg = load_error(path)
    assert "prefs.csv, row 2, field 'chosen'" in msg and "empty text" in msg


def test_missing_columns_say_what_the_format_needs(tmp_path):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "p", "chosen": "a", "answer": "b"}])
    msg = load_error(path, format="canonical")
    assert "field 'rejected'" in msg and "missing column rejected" in msg
    assert "needs prompt, chosen, rejected" in msg and "found: prompt, chosen, answer" in msg
    msg = load_error(write_jsonl(tmp_path / "what.jsonl", [{"question": "p", "answer": "a"}]))
    assert "cannot tell the format" in msg and "hh-rlhf: chosen, rejected" in msg
    pku = [{"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0}]
    msg = load_error(write_jsonl(tmp_path / "pku.jsonl", pku), format="pku-saferlhf", kind="safety")
    assert "field 'safer_response_id'" in msg and "is_response_0_safe" in msg


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
                                        ("header.csv", "prompt,chosen,rejected\n")])
def test_empty_files(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert "empty file" in load_error(path)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", oops\n')
    msg = load_error(path)
    assert "bad.jsonl, row 2" in msg and "malformed JSON" in msg


def test_nothing_left_after_drops(tmp_path):
    rows = [{"chosen": H + "Q" + A + "x", "rejected": H + "Q" + A + "x"}]
    path = write_jsonl(tmp_path / "hh-harmless.jsonl", rows)
    msg = load_error(path)
    assert "no usable comparisons" in msg and "identical responses 1" in msg


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown preference format"):
        load_preferences(fx("canonical.jsonl"), format="anthropic")
    with pytest.raises(UserError, match="unknown kind"):
        load_preferences(fx("canonical.jsonl"), kind="harmless")
    with pytest.raises(UserError, match="unknown margin scheme 'huge'; use one of none, small, large"):
        load_preferences(fx("canonical.jsonl"), margin_scheme="huge")
    with pytest.raises(UserError, match="file not found"):
        load_preferences(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UserError, match="unsupported file type"):
        load_preferences(str(tmp_path / "x.txt"))


def test_hub_source_goes_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split, **kw):
        calls.append((name, split, kw))
        return datasets.Dataset.from_list([pku_row(True, False, 0, 2)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds, report = load_preferences_with_report("PKU-Alignment/PKU-SafeRLHF", kind="safety", split="test")
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", "test", {})]
    assert ds["level"] == ["significantly_better"] and ds["source"] == ["PKU-Alignment/PKU-SafeRLHF"]

    def offline(name, split, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="could not load this hub dataset"):
        load_preferences("Anthropic/hh-rlhf", data_dir="harmless-base")


def test_hub_subset_is_named_after_a_colon(monkeypatch):
    """'NAME:SUBSET' (as recipes list them) reads one folder of a hub dataset, and HH's subset name says
    whether its comparisons are safety ones."""
    calls = []
    dialogue = (H + "Hi" + A + "Hello.", H + "Hi" + A + "Go away.")

    def fake_load_dataset(name, split, **kw):
        calls.append((name, split, kw))
        return datasets.Dataset.from_list([{"chosen": dialogue[0], "rejected": dialogue[1]}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    harmless = load_preferences("Anthropic/hh-rlhf:harmless-base", split="test")
    helpful = load_preferences("Anthropic/hh-rlhf:helpful-base")
    assert calls == [("Anthropic/hh-rlhf", "test", {"data_dir": "harmless-base"}),
                     ("Anthropic/hh-rlhf", "train", {"data_dir": "helpful-base"})]
    assert harmless["is_safety"] == [True] and helpful["is_safety"] == [False]
    assert harmless["source"] == ["Anthropic/hh-rlhf/harmless-base"]
    for bad in ("Anthropic/hh-rlhf:", ":helpful-base"):
        with pytest.raises(UserError, match="NAME:SUBSET"):
            load_preferences(bad)


# --------------------------------------------------------------------------- mixing


def test_mix_for_helpfulness_rm(logs):
    helpful, safety = canonical_rows(100, safety=False, tag="h"), canonical_rows(150, safety=True, tag="s")
    mixed = mix_for_rm(helpful, safety, "helpful", seed=1)
    assert Counter(mixed["is_safety"]) == {False: 100, True: 100}
    assert set(mixed.filter(lambda r: not r["is_safety"])["prompt"]) == set(helpful["prompt"])
    assert "helpful RM mix: 100 helpfulness + 100 safety rows = 200" in logs[-1]
    short = mix_for_rm(helpful, canonical_rows(40, safety=True, tag="s"), "helpful")
    assert Counter(short["is_safety"]) == {False: 100, True: 40}
    assert any("only 40 available" in line for line in logs)
    half = mix_for_rm(helpful, safety, "helpful", helpful_extra_ratio=0.5)
    assert Counter(half["is_safety"]) == {False: 100, True: 50}


def test_mix_for_safety_rm_is_90_10(logs):
    safety, helpful = canonical_rows(90, safety=True, tag="s"), canonical_rows(500, safety=False, tag="h")
    mixed = mix_for_rm(safety, helpful, "safety")
    assert Counter(mixed["is_safety"]) == {True: 90, False: 10}
    big = mix_for_rm(canonical_rows(1000, safety=True, tag="s"), helpful, "safety", safety_fraction=0.8)
    assert Counter(big["is_safety"]) == {True: 1000, False: 250}
    assert len(mix_for_rm(safety, helpful, "safety", safety_fraction=1.0)) == 90


def test_mix_is_deterministic_and_validates(logs):
    safety, helpful = canonical_rows(90, safety=True, tag="s"), canonical_rows(500, safety=False, tag="h")
    a = mix_for_rm(safety, helpful, "safety", seed=3)
    assert a["prompt"] == mix_for_rm(safety, helpful, "safety", seed=3)["prompt"]
    assert a["prompt"] != mix_for_rm(safety, helpful, "safety", seed=4)["prompt"]
    with pytest.raises(UserError, match="safety_fraction"):
        mix_for_rm(safety, helpful, "safety", safety_fraction=0)
    with pytest.raises(UserError, match="unknown reward model kind"):
        mix_for_rm(safety, helpful, "harmless")
    with pytest.raises(UserError, match="missing columns"):
        mix_for_rm(safety.remove_columns("margin"), helpful, "safety")


# --------------------------------------------------------------------------- split and write


def test_split_train_test_by_prompt_and_deterministic():
    ds = canonical_rows(60, safety=False, tag="x")
    twice = ds.map(lambda r: {"chosen": r["chosen"] + "!"})
    ds = datasets.concatenate_datasets([ds, twice])  # two pairs per prompt
    train, test = split_train_test(ds, 0.25, seed=0)
    assert len(train) + len(test) == 120 and 30 <= len(test) <= 32
    assert not set(train["prompt"]) & set(test["prompt"])
    again = split_train_test(ds, 0.25, seed=0)
    assert again[1]["prompt"] == test["prompt"] and again[0]["prompt"] == train["prompt"]
    assert split_train_test(ds, 0.25, seed=1)[1]["prompt"] != test["prompt"]
    with pytest.raises(UserError, match="test_fraction"):
        split_train_test(ds, 1.0, seed=0)
    with pytest.raises(UserError, match="two prompts"):
        split_train_test(ds.filter(lambda r: r["prompt"] == "x prompt 0"), 0.5, seed=0)


def test_hold_out_by_prompt_holds_a_prompt_out_of_every_set():
    ds = canonical_rows(400, safety=False, tag="x")
    train, test = prefs.hold_out_by_prompt(ds, 0.05, "data")
    assert len(train) + len(test) == 400 and 5 <= len(test) <= 40
    assert not set(train["prompt"]) & set(test["prompt"])
    # a prompt's fate is a property of its text: the same in a subset of the data
    sub = ds.select(range(0, 400, 3))
    sub_train, sub_test = prefs.hold_out_by_prompt(sub, 0.05, "data")
    assert set(sub_test["prompt"]) == set(test["prompt"]) & set(sub["prompt"])
    # a set too small to hold a prompt out by hash gives up its lowest-hash prompt
    few = ds.filter(lambda r: r["prompt"] in set(train["prompt"][:3]))
    few_train, few_test = prefs.hold_out_by_prompt(few, 0.05, "data")
    assert len(set(few_test["prompt"])) == 1 and len(set(few_train["prompt"])) == 2
    with pytest.raises(UserError, match="data: 1 distinct prompt"):
        prefs.hold_out_by_prompt(ds.select([0]), 0.05, "data")


def test_prompt_rows_tags_caps_and_keeps_eval_prompts_out_of_training():
    helpful = canonical_rows(30, safety=False, tag="h")
    safety = canonical_rows(10, safety=True, tag="s")
    both = datasets.Dataset.from_dict({**safety[:2], "prompt": helpful["prompt"][:2]}, features=safety.features)
    train, evals = prefs.prompt_rows([helpful, both], [helpful.select(range(25, 30)), safety])
    assert {r["prompt"] for r in evals} == set(helpful["prompt"][25:]) | set(safety["prompt"])
    assert {r["prompt"] for r in train} == set(helpful["prompt"][:25])
    tagged = {r["prompt"] for r in train if r["is_safety"]}
    assert tagged == set(helpful["prompt"][:2])  # a prompt with a safety comparison is a safety prompt
    assert [r["is_safety"] for r in evals] == [False] * 5 + [True] * 10
    capped, _ = prefs.prompt_rows([helpful], [safety], max_train=7)
    again, _ = prefs.prompt_rows([helpful.select(range(29, -1, -1))], [safety], max_train=7)
    assert len(capped) == 7 and {r["prompt"] for r in capped} == {r["prompt"] for r in again}


def test_write_preferences_round_trip(tmp_path):
    ds = load_preferences(fx("canonical.csv"), margin_scheme="large")
    path = tmp_path / "out" / "prefs.jsonl"
    assert write_preferences(ds, path) == 5
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == list(CANONICAL_COLUMNS)
    again = load_preferences(str(path), margin_scheme="none")  # written margins are kept
    assert again.to_list() == ds.to_list()
    rows = ds.to_list()
    rows[1]["margin"] = math.nan
    with pytest.raises(UserError, match="non-finite"):
        write_preferences(rows, tmp_path / "nan.jsonl")
    with pytest.raises(DataError, match="row 1, field 'level'"):
        write_preferences([{"prompt": "p", "chosen": "a", "rejected": "b"}], tmp_path / "short.jsonl")
