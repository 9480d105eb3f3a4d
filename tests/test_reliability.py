"""Reliability pieces: atomic files, NaN refusal, disk-space check, loading rules."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple

import pytest

from iterative_rlhf.errors import UserError
from iterative_rlhf.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_jsonl,
    check_free_space,
    commit_dir,
    hash_path,
    read_jsonl,
)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"x": 1})

    def boom(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(p, {"x": 2})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"x": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_no_nan_reaches_a_file(tmp_path):
    with pytest.raises(UserError, match=r"non-finite number \(nan\) at .*\.a\[1\]"):
        atomic_write_json(tmp_path / "r.json", {"a": [1.0, float("nan")]})
    with pytest.raises(UserError, match="row 2"):
        atomic_write_jsonl(tmp_path / "r.jsonl", [{"r": 1.0}, {"r": float("inf")}])
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.jsonl").exists()


def test_atomic_dir_replaces_whole_folders(tmp_path):
    final = tmp_path / "ckpt"
    tmp = atomic_dir(final)
    (tmp / "w.bin").write_bytes(b"1")
    assert not final.exists()  # nothing visible until committed
    commit_dir(tmp, final)
    h1 = hash_path(final)
    tmp = atomic_dir(final)
    (tmp / "w.bin").write_bytes(b"2")
    commit_dir(tmp, final)
    assert (final / "w.bin").read_bytes() == b"2" and hash_path(final) != h1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_disk_space_check_says_how_much(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(100, 90, 10 * 2**20))
    with pytest.raises(UserError, match=r"needs about 100 MiB, 10 MiB free"):
        check_free_space(tmp_path / "x", 100 * 2**20, "the checkpoint")
    check_free_space(tmp_path, 2**20, "a small file")


def test_a_stage_reruns_when_it_now_writes_an_output_its_record_lacks(tmp_path):
    from iterative_rlhf.campaign import Manifest

    (tmp_path / "v1").mkdir()
    report, metrics = tmp_path / "v1" / "report.json", tmp_path / "v1" / "metrics.jsonl"
    report.write_text("{}")
    m = Manifest(tmp_path)
    m.mark("v1/report", [report])
    assert Manifest(tmp_path).done("v1/report", [report])
    metrics.write_text("")
    assert not Manifest(tmp_path).done("v1/report", [report, metrics])  # recorded by an older version
    m.mark("v1/report", [report, metrics])
    assert Manifest(tmp_path).done("v1/report", [report, metrics])
    report.write_text('{"changed": 1}')
    assert not Manifest(tmp_path).done("v1/report", [report, metrics])


def test_a_stage_reruns_when_an_input_it_read_was_made_again_differently(tmp_path):
    from iterative_rlhf.campaign import Manifest

    (tmp_path / "v1").mkdir()
    ev, ppo, report = (tmp_path / "v1" / n for n in ("eval.json", "ppo.json", "report.json"))
    ev.write_text('{"gold": 0.5}')
    report.write_text("{}")
    Manifest(tmp_path).mark("v1/report", [report])  # an older version recorded no inputs: made again once
    assert not Manifest(tmp_path).done("v1/report", [report], [ev, ppo])
    Manifest(tmp_path).mark("v1/report", [report], [ev, ppo])  # ppo.json does not exist (an rs campaign)
    assert Manifest(tmp_path).done("v1/report", [report], [ev, ppo])
    ev.write_text('{"gold": 0.5, "deployed": {"gold": 0.9}}')  # the evaluation made again by a newer version
    assert not Manifest(tmp_path).done("v1/report", [report], [ev, ppo])
    Manifest(tmp_path).mark("v1/report", [report], [ev, ppo])
    ppo.write_text("{}")  # an input that appeared
    assert not Manifest(tmp_path).done("v1/report", [report], [ev, ppo])


def test_read_jsonl_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"d.jsonl, row 2: expected a JSON object"):
        read_jsonl(p)
    with pytest.raises(UserError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_checkpoint_rules(tmp_path):
    from iterative_rlhf.checkpoint import resolve_model_path

    with pytest.raises(UserError, match="not a Hugging Face checkpoint"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(UserError, match="no such checkpoint folder"):
        resolve_model_path(str(tmp_path / "missing"))
    assert resolve_model_path("meta-llama/Llama-2-7b-chat-hf") == "meta-llama/Llama-2-7b-chat-hf"  # hub names pass


def test_no_unsafe_loading_in_the_package():
    """trust_remote_code is never hard-coded on, torch.load always uses weights_only, no shell=True."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "iterative_rlhf"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "trust_remote_code=True" not in text, f
        assert "shell=True" not in text, f
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{f}: {line.strip()}"


@pytest.mark.slow
def test_long_prompts_are_truncated_from_the_left_with_a_count(world, tmp_path, capsys):
    import json

    from iterative_rlhf.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "word " * 200 + "What is 2 plus 2?"}) + "\n"
                       + json.dumps({"prompt": "What is 1 plus 1?"}) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["sample", "--model", str(world.policy), "--prompts", str(prompts), "--n", "1", "--out", str(out),
                 "--max-new-tokens", "8"]) == 0
    assert "1 of 2 prompts were longer than model.max_prompt_length=64" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 2
