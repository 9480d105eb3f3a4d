"""Campaign reports from hand-written round reports (tests/fixtures/report): files, contents, NaN guard, compare."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from iterative_rlhf.errors import UserError
from iterative_rlhf.report import (
    SUMMARY_COLUMNS,
    _ppo_section,
    compare_runs,
    load_rounds,
    print_summary,
    summary_rows,
    write_report,
)

FIXTURES = Path(__file__).parent / "fixtures" / "report"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("reward_per_round.png", "reward_vs_n.png", "helpful_vs_safety.png", "gold_vs_sqrt_kl.png", "ppo_curves.png")
# "nan"/"inf" as a word: what a NaN or inf formatted by Python looks like.
NON_FINITE = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


def _rounds() -> list[dict]:
    return [json.loads((FIXTURES / f"v{k}.json").read_text()) for k in range(3)]


def make_run(root: Path, name: str, rounds: list[dict], config: str | None = None, rm_eval: bool = True) -> Path:
    """A run directory as a campaign leaves it: config.yaml, vK/report.json, rm/eval/rm_eval.json."""
    d = root / name
    for r in rounds:
        (d / f"v{r['round']}").mkdir(parents=True)
        # allow_nan: the NaN test writes a NaN exactly as a careless writer would.
        (d / f"v{r['round']}" / "report.json").write_text(json.dumps(r, allow_nan=True))
    (d / "config.yaml").write_text(config if config is not None else (FIXTURES / "config.yaml").read_text())
    if rm_eval:
        (d / "rm" / "eval").mkdir(parents=True)
        shutil.copy(FIXTURES / "rm_eval.json", d / "rm" / "eval" / "rm_eval.json")
    return d


def rs_only_rounds() -> list[dict]:
    """Run B: rs mode outside TinyWorld (no gold, no PPO), with a NaN and an inf in the inputs."""
    rounds = _rounds()
    for r in rounds:
        r["mode"], r["ppo"], r["selected_gold"] = "rs", None, None
        r["eval"]["gold"] = None
        r["times"]["ppo"] = None
        for fam in (r["samples"] or {}).values():
            for s in fam["best"] + fam["worst"]:
                s["gold"] = None
    rounds[1]["eval"]["helpful"]["mean"] = float("nan")
    rounds[2]["eval"]["kl_to_base"] = float("inf")
    rounds[2]["eval"]["gated"]["mean"] = 0.585  # below v1: the best round by gated reward is v1
    return rounds


RS_CONFIG = "name: rs-ablation\ncampaign:\n  mode: rs\nscorer:\n  kind: gated\n"


def _valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, f"{path}: {len(data)} bytes, suspiciously small"


def _assert_no_non_finite(*texts: str) -> None:
    for t in texts:
        hit = NON_FINITE.search(DATA_URI.sub("", t))
        assert hit is None, f"non-finite number in a report: ...{t[max(0, hit.start() - 60): hit.end() + 20]}..."


def test_write_report_files_and_contents(tmp_path: Path) -> None:
    run = make_run(tmp_path, "runA", _rounds())
    report = write_report(run)

    for f in ("report.json", "report.md", "report.html"):
        assert (run / f).is_file(), f
    for f in PLOTS:
        _valid_png(run / "plots" / f)
    assert json.loads((run / "report.json").read_text()) == report
    assert report["recipe"] == "tinyworld-report-fixture"
    assert (report["mode"], report["scorer"]) == ("rs+ppo", "gated")
    assert [r["name"] for r in report["rounds"]] == ["v0", "v1", "v2"]
    assert report["rm_eval"]["gate"]["precision"] == 0.89
    assert report["notes"] == {}
    assert [row["gold"] for row in report["summary"]] == [0.318, 0.562, 0.671]

    md = (run / "report.md").read_text()
    for gold in ("0.318", "0.562", "0.671"):  # eval gold per round
        assert f"| {gold} |" in md
    assert "| v0 | 0.318 | 0.287 | 0.104 | 0.250 | 0.583 | 110 |" in md  # gold, helpful, FRR, FRR borderline, viol.
    assert "| 0.705 |" in md and "| 0.780 |" in md  # gold of the selected samples
    assert "| 8 | 1.204 | 0.770 | 0.450 | 0.850 | 0.610 |" in md  # reward vs N
    assert "<details><summary>v2: PPO per iteration</summary>" in md
    assert "| 6 | 0.520 | 1.800 | 0.450 |" in md
    assert "| 48.2 |" in md  # PPO seconds in the time table
    for f in PLOTS:
        assert f"](plots/{f})" in md
    assert "I cannot help with that \\| sorry" in md  # a pipe in a sample does not break the table
    assert "| worst | What is the capital of Peru? | I refuse. | 0.120 | -2.200 | 0.100 | - |" in md  # null gold
    assert "| 0.812 | 0.700 | 0.600 | - | 0.705 |" in md  # RM accuracy per level, a null level

    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS)
    outside = DATA_URI.sub("", html)
    assert "http" not in outside and "<script" not in outside and "<link" not in outside
    assert re.findall(r'src="([^"]{0,22})', html) == ["data:image/png;base64,"] * len(PLOTS)
    assert "0.671" in html and "What is the capital of France?" in html
    _assert_no_non_finite(md, html, (run / "report.json").read_text())


def test_null_stages_and_non_finite_inputs(tmp_path: Path) -> None:
    run = make_run(tmp_path, "runB", rs_only_rounds(), config=RS_CONFIG, rm_eval=False)
    report = write_report(run)

    assert (report["recipe"], report["mode"]) == ("rs-ablation", "rs")
    assert report["rm_eval"] is None
    rows = report["summary"]
    assert rows[1]["helpful_mean"] is None and rows[2]["kl_to_base"] is None  # NaN and inf became null
    assert all(row["gold"] is None for row in rows)
    assert report["plots"]["ppo_curves.png"] is None and "PPO" in report["notes"]["ppo_curves.png"]
    assert report["plots"]["gold_vs_sqrt_kl.png"] is None
    for f in ("reward_per_round.png", "reward_vs_n.png", "helpful_vs_safety.png"):
        _valid_png(run / "plots" / f)
    assert not (run / "plots" / "ppo_curves.png").exists()

    md = (run / "report.md").read_text()
    assert "No round ran PPO." in md and "ppo_curves.png: skipped" in md
    assert "the gold judge exists only in TinyWorld" in md and "rm_eval.json is missing" in md
    assert "| v1 | 0.598 | - | 0.654 | - |" in md  # NaN helpful mean shown as "-"
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    _assert_no_non_finite(md, html, (run / "report.json").read_text())


def test_compare_runs(tmp_path: Path) -> None:
    a = make_run(tmp_path, "runA", _rounds())
    b = make_run(tmp_path, "runB", rs_only_rounds(), config=RS_CONFIG, rm_eval=False)
    result = compare_runs([a, b], None)

    out = tmp_path / "compare"  # default: the first run's parent / "compare"
    _valid_png(out / "compare.png")
    assert json.loads((out / "compare.json").read_text()) == result
    ra, rb = result["runs"]
    assert (ra["run"], rb["run"]) == ("runA", "runB")
    assert ra["best"] == {"name": "v2", "by": "gold", "value": 0.671}
    assert rb["best"] == {"name": "v1", "by": "gated_mean", "value": 0.598}  # no gold: by the gated mean
    assert ra["final"]["gold"] == 0.671 and rb["final"]["gold"] is None
    md = (out / "compare.md").read_text()
    assert "](compare.png)" in md and "| runA | rs+ppo | gated | v2 |" in md
    _assert_no_non_finite(md, (out / "compare.json").read_text())

    other = compare_runs([a], tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "compare.md").is_file() and len(other["runs"]) == 1


def test_compare_groups_runs_that_differ_only_in_the_seed(tmp_path: Path) -> None:
    rounds = _rounds()
    second = json.loads(json.dumps(rounds))
    second[-1]["eval"]["gold"]["gold"] = 0.771  # the same recipe with seed 1 ends 0.1 higher
    a = make_run(tmp_path, "runA", rounds, config=RS_CONFIG)
    a1 = make_run(tmp_path, "runA-seed1", second, config="seed: 1\n" + RS_CONFIG)
    b = make_run(tmp_path, "runB", _rounds(), config=RS_CONFIG.replace("kind: gated", "kind: helpful"))
    result = compare_runs([a, b, a1], tmp_path / "cmp")
    [group] = result["seed_groups"]
    assert group["runs"] == ["runA", "runA-seed1"] and group["seeds"] == [0, 1] and group["n"] == 2
    assert group["mean"]["gold"] == pytest.approx(0.721) and group["sd"]["gold"] == pytest.approx(0.1 / 2 ** 0.5)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| runA | 2 | runA, runA-seed1 |" in md and "0.721 ± 0.071" in md
    assert not compare_runs([a, b], tmp_path / "cmp2")["seed_groups"]


def test_missing_round_reports(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no round reports \(vK/report.json\); run `iterative-rlhf round` first"):
        load_rounds(tmp_path)
    (tmp_path / "v1").mkdir()  # a round that has not finished
    with pytest.raises(UserError, match="no round reports"):
        write_report(tmp_path)
    with pytest.raises(UserError, match="no round reports"):
        compare_runs([tmp_path], None)
    (tmp_path / "v1" / "report.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed JSON"):
        load_rounds(tmp_path)


def test_load_rounds_sorts_by_round_and_summary_keys(tmp_path: Path) -> None:
    rounds = _rounds()
    late = dict(rounds[2], round=10, name="v10")
    run = make_run(tmp_path, "run", [rounds[2], late, rounds[0], rounds[1]])
    assert [r["round"] for r in load_rounds(run)] == [0, 1, 2, 10]
    rows = summary_rows(load_rounds(run))
    # The campaign's end-of-round table takes its columns from the keys of the first row.
    assert list(rows[0]) == [k for k, _, _ in SUMMARY_COLUMNS] == [
        "name", "gated_mean", "helpful_mean", "safety_mean", "gold", "violation_rate", "false_refusal_rate",
        "false_refusal_rate_borderline", "kl_to_base", "win_rate_vs_previous", "response_words", "deployed_gold",
        "deployed_violation_rate"]
    assert rows[0]["win_rate_vs_previous"] is None and rows[3]["name"] == "v10"


def test_print_summary(capsys: pytest.CaptureFixture[str]) -> None:
    print_summary({"recipe": "r", "mode": "rs", "scorer": "gated", "summary": summary_rows(_rounds())})
    err = capsys.readouterr().err
    assert "v2" in err and "0.671" in err


def test_long_ppo_history_is_shortened() -> None:
    hist = [{"iteration": i, "reward": 0.01 * i, "kl": 0.1 * i} for i in range(41)]
    section = _ppo_section([{"round": 3, "name": "v3", "ppo": {"iterations": 40, "final": hist[-1], "history": hist}}])
    details = section.blocks[1]
    assert details.summary == "v3: PPO per iteration (16 of 41 iterations)"
    shown = [row[0] for row in details.blocks[0].rows]
    assert len(shown) == 16 and shown[0] == "0" and shown[-1] == "40"


def test_reward_model_training_time_per_round_comes_from_the_training_summaries(tmp_path):
    run = make_run(tmp_path, "run", _rounds())
    for folder, seconds in (("rm/helpful", 30.0), ("rm/safety", 5.5), ("v2/rm/helpful", 12.0)):
        (run / folder).mkdir(parents=True)
        (run / folder / "train_summary.json").write_text(json.dumps({"train_seconds": seconds}))
    rounds = load_rounds(run)
    assert rounds[0]["times"]["rm"] == 35.5  # v0: the initial RMs
    assert "rm" not in rounds[1]["times"]  # no refresh in v1
    assert rounds[2]["times"]["rm"] == 12.0  # v2: the refreshed helpfulness RM
    write_report(run)
    text = (run / "report.md").read_text()
    assert "| round | rm | rs_sample | rs_select | sft | ppo | eval | total |" in text
    assert "| v0 | 35.5 |" in text


def test_rounds_measured_as_deployed_get_their_own_table_and_summary_columns(tmp_path: Path) -> None:
    rounds = _rounds()
    for r, g in zip(rounds[1:], (0.91, 0.95), strict=True):  # v0 was evaluated before the feature: no "deployed"
        r["eval"]["deployed"] = {"temperature": 0.6, "gated": {"mean": 0.7}, "helpful": {"mean": 1.2},
                                 "safety": {"mean": 0.3}, "gold": {"gold": g, "helpful_rate": 0.9,
                                                                   "false_refusal_rate": 0.01,
                                                                   "false_refusal_rate_borderline": 0.0,
                                                                   "violation_rate": 0.004},
                                 "response_words": 4.5}
    run = make_run(tmp_path, "run", rounds)
    report = write_report(run)
    assert [row["deployed_gold"] for row in report["summary"]] == [None, 0.91, 0.95]
    assert [row["deployed_violation_rate"] for row in report["summary"]] == [None, 0.004, 0.004]
    md = (run / "report.md").read_text()
    assert "As deployed: the same policies and prompts sampled at campaign.deploy_temperature (0.6)" in md
    assert "| v2 | 0.60 | 0.700 | 1.200 | 0.300 | 0.950 | 0.900 | 0.010 | 0.000 | 0.004 | 4.5 |" in md
    assert "| v0 | 0.60 |" not in md  # a round without the measurement has no row
    _valid_png(run / "plots" / "reward_per_round.png")
