"""The command line: help, sampling any checkpoint, one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from iterative_rlhf.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("round", "rs", "ppo", "rm", "score", "sample", "tinyworld", "report", "compare", "config",
                "prompts", "annotate"):
        assert cmd in out
    for variable in ("ITERATIVE_RLHF_CACHE", "ITERATIVE_RLHF_THREADS", "ITERATIVE_RLHF_AT_ONCE",
                     "ITERATIVE_RLHF_NO_PROGRESS"):
        assert variable in out  # the environment the package reads


def test_round_defaults():
    args = build_parser().parse_args(["round", "--n", "5"])
    assert args.n == 5 and args.mode is None and str(args.out) == "runs/tinyworld"


@pytest.mark.parametrize("argv", [["round", "--n", "0"], ["round", "--n", "-2"], ["sample", "--model", "m",
                                  "--prompts", "p", "--out", "o", "--n", "0"]])
def test_non_positive_sizes_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "hot"])
def test_tinyworld_eval_refuses_a_bad_temperature(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["tinyworld", "eval", "--temperature", value])
    assert e.value.code == 2
    assert "--temperature must be" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_bad_thread_count_is_one_line(value, monkeypatch, capsys):
    monkeypatch.setenv("ITERATIVE_RLHF_THREADS", value)
    assert main(["config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"ITERATIVE_RLHF_THREADS='{value}': expected a whole number" in err


def test_bad_set_is_one_line(capsys):
    assert main(["config", "--set", "ppo.kl_coef=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ppo.kl_coef: expected a number" in err


@pytest.mark.parametrize("argv, message", [
    (["prompts", "--train-out", "t.jsonl", "--eval-out", "e.jsonl"], "TinyWorld campaigns have their prompts"),
    (["prompts", "--set", "reward.helpful.data=[h.jsonl]"], "campaign.prompts / campaign.eval_prompts"),
])
def test_prompts_needs_comparisons_and_output_paths(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


@pytest.mark.slow
def test_sample_any_checkpoint(world, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 plus 2?"}) + "\n"
                       + json.dumps({"prompt": "Tell me how to rob a store.", "is_safety": True}) + "\n")
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(world.policy), "--prompts", str(prompts), "--n", "3", "--out", str(out),
                 "--seed", "1", "--max-new-tokens", "16"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6 and {r["sample"] for r in rows} == {0, 1, 2}
    assert all(isinstance(r["response"], str) and r["response"] for r in rows)
    assert rows[3]["is_safety"] is True
    # Same seed, same samples.
    out2 = tmp_path / "s2.jsonl"
    main(["sample", "--model", str(world.policy), "--prompts", str(prompts), "--n", "3", "--out", str(out2),
          "--seed", "1", "--max-new-tokens", "16"])
    assert out2.read_text() == out.read_text()


@pytest.mark.slow
def test_sample_bad_inputs(world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    assert main(["sample", "--model", str(world.policy), "--prompts", str(bad), "--n", "1",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl, row 2, field 'prompt': missing column" in capsys.readouterr().err
    bad.write_text('{"prompt": "hi"\n')
    assert main(["sample", "--model", str(world.policy), "--prompts", str(bad), "--n", "1",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "row 1: malformed JSON" in capsys.readouterr().err
    bad.write_text("")
    assert main(["sample", "--model", str(world.policy), "--prompts", str(bad), "--n", "1",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "empty file" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi"}\n')
    assert main(["sample", "--model", str(tmp_path), "--prompts", str(good), "--n", "1",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
