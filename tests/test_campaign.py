"""Campaigns end to end on the tests' TinyWorld: determinism, refusal of foreign run dirs, crash safety.

The crash test starts ``iterative-rlhf round`` as a subprocess, SIGKILLs it at
points inside several stages (RM training, sampling, SFT, PPO, report), reruns
the same command until it finishes, and checks that the final report equals the
one of an uninterrupted run with the same seed (times aside).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROUNDS = 2


def small_args(world_config) -> list[str]:  # noqa: ANN001
    """A 2-round rs+ppo campaign small enough for CI: few prompts, small N, two PPO iterations."""
    tw = [f"tinyworld.{k}={v}" for k, v in vars(world_config).items()]
    rest = [
        "reward.helpful.learning_rate=1e-3", "reward.safety.learning_rate=1e-3",
        "reward.helpful.batch_size=32", "reward.safety.batch_size=32",
        "reward.helpful.max_length=64", "reward.safety.max_length=64",
        "rs.n=4", "rs.prompts=48", "campaign.eval_samples=1",
        "ppo.iterations=2", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.save_every=1", "ppo.eval_every=1",
        "sft.epochs=1", "reward.refresh=true", "reward.refresh_comparisons_per_prompt=4",
        "campaign.ppo_from_round=1", "campaign.select=best", "campaign.select_samples=2", "campaign.merge=0.5",
    ]
    out = []
    for item in tw + rest:
        out += ["--set", item]
    return out


def run_cli(args: list[str], kill_when=None, timeout: float = 900, env: dict | None = None) -> int:  # noqa: ANN001
    """Run the CLI in a subprocess; SIGKILL it once ``kill_when()`` is true. Returns the exit code."""
    env = {**os.environ, "ITERATIVE_RLHF_NO_PROGRESS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "iterative_rlhf.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while proc.poll() is None:
        if kill_when is not None and kill_when():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return -9
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"campaign did not finish in {timeout} s")
        time.sleep(0.05)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr.read()[-3000:])
    return proc.returncode


def stages_done(run_dir: Path) -> set[str]:
    try:
        return set(json.loads((run_dir / "manifest.json").read_text())["stages"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return set()


def comparable(report: dict) -> dict:
    """The report without what legitimately differs between runs: times, memory and paths."""

    def timing(k: str) -> bool:
        return k.startswith(("time", "cpu_", "peak_rss")) or k.endswith(("_s", "seconds"))

    report = json.loads(json.dumps(report))
    report.pop("run_dir", None)
    report.pop("plots", None)
    (report.get("rm_eval") or {}).pop("models", None)  # checkpoint paths
    for r in report.get("rounds", []):
        r.pop("times", None)
        if r.get("ppo"):
            for row in r["ppo"].get("history", []):
                for k in [k for k in row if timing(k)]:
                    row.pop(k)
            if r["ppo"].get("final"):
                for k in [k for k in r["ppo"]["final"] if timing(k)]:
                    r["ppo"]["final"].pop(k)
    return report


@pytest.fixture(scope="module")
def reference_run(world, world_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("campaign") / "reference"
    run_cli(["round", "--n", str(ROUNDS), "--out", str(out), *small_args(world_config)])
    return out


def test_campaign_writes_a_self_describing_run_dir(reference_run, world):
    d = reference_run
    for name in ("config.yaml", "manifest.json", "report.json", "report.md", "report.html"):
        assert (d / name).is_file(), name
    assert (d / "plots" / "reward_vs_n.png").is_file()
    report = json.loads((d / "report.json").read_text())
    assert [r["name"] for r in report["rounds"]] == ["v0", "v1", "v2"]
    v2 = report["rounds"][2]
    assert v2["ppo"]["iterations"] == 2 and v2["reward_vs_n"][-1]["n"] == 4
    assert v2["eval"]["gold"]["n"] == 55 and 0 <= v2["eval"]["gold"]["gold"] <= 1
    # Each round's policy is a checkpoint transformers loads.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(d / "v2" / "ppo" / "policy")
    # ... deployed at campaign.deploy_temperature: its generation config says so, and the reports measure each
    # round's policy at that temperature too, on the same prompts, beside temperature 1.0.
    from transformers import GenerationConfig

    for ckpt in ("v1/rs_policy", "v2/rs_policy", "v2/ppo/policy"):
        gen = GenerationConfig.from_pretrained(d / ckpt)
        assert gen.do_sample and gen.temperature == 0.6, ckpt
    for r in report["rounds"]:
        dep = r["eval"]["deployed"]
        assert dep["temperature"] == 0.6 and dep["gold"]["n"] == r["eval"]["gold"]["n"] == 55
        assert 0 <= dep["gated"]["mean"] <= 1 and 0 <= dep["gold"]["violation_rate"] <= 1
    deployed = [json.loads(x) for x in (d / "v2" / "eval_samples_deployed.jsonl").read_text().splitlines()]
    assert len(deployed) == 55 and all("r_c" in x and x["gold"] in (0, 1) for x in deployed)
    assert report["summary"][2]["deployed_gold"] == report["rounds"][2]["eval"]["deployed"]["gold"]["gold"]
    assert "As deployed" in (d / "report.md").read_text()
    # Each round's training logs in one file, tagged by stage, in the order the stages ran.
    rows = [json.loads(line) for line in (d / "v2" / "metrics.jsonl").read_text().splitlines()]
    stages_seen = list(dict.fromkeys(r["stage"] for r in rows))
    assert stages_seen == ["rm/helpful", "rm/safety", "sft", "ppo_rm/helpful", "ppo_rm/safety", "ppo"]
    assert [r["iteration"] for r in rows if r["stage"] == "ppo"] == [0, 1, 2]
    assert all("loss" in r for r in rows if r["stage"] == "sft" and "train_runtime" not in r)
    v0_stages = {json.loads(line)["stage"] for line in (d / "v0" / "metrics.jsonl").read_text().splitlines()}
    assert v0_stages == {"rm/helpful", "rm/safety"}
    # Round 2's policy is its PPO policy averaged with round 1's, weight by weight: what the reports measure.
    import torch

    merge = json.loads((d / "v2" / "merge.json").read_text())
    assert merge["trained"] == "v2/ppo/policy" and merge["weight"] == 0.5 and v2["merge"]["previous"] == \
        merge["previous"] and report["rounds"][1].get("merge") is None
    # (campaign.select=best then weighs the average against the previous round's policy)
    assert v2["select"]["trained"]["policy"] == "v2/policy" and v2["select"]["previous"]["policy"] == merge["previous"]
    assert v2["policy"] == ("v2/policy" if v2["select"]["kept"] == "trained" else merge["previous"])
    prev = world.policy if merge["previous"] == "base" else d / merge["previous"]  # round 1 kept the base or not
    got = AutoModelForCausalLM.from_pretrained(d / "v2" / "policy").state_dict()
    a = AutoModelForCausalLM.from_pretrained(d / "v2" / "ppo" / "policy").state_dict()
    b = AutoModelForCausalLM.from_pretrained(prev).state_dict()
    assert all(torch.equal(got[n], 0.5 * a[n] + 0.5 * b[n]) for n in got)
    assert GenerationConfig.from_pretrained(d / "v2" / "policy").temperature == 0.6
    assert "campaign.merge" in (d / "report.md").read_text()
    # The manifest records a hash per output.
    stages = json.loads((d / "manifest.json").read_text())["stages"]
    assert all(len(h) == 64 for s in stages.values() for h in s["outputs"].values())
    assert "nan" not in (d / "report.md").read_text().lower().split()
    # PPO's held-out prompts (1 in 8 train prompts) are never trained on: no sample, no selection, no PPO rollout.
    import hashlib

    def held_out(text: str) -> bool:
        return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 8 == 0

    for k in (1, 2):
        for name in ("samples.jsonl", "selected.jsonl"):
            rows = [json.loads(x) for x in (d / f"v{k}" / name).read_text().splitlines()]
            assert rows and not any(held_out(r["prompt"]) for r in rows), (k, name)
    ppo_eval = [row for row in json.loads((d / "v2" / "ppo.json").read_text())["history"] if "eval_gold" in row]
    assert ppo_eval and all(row["eval_n"] % 4 == 0 for row in ppo_eval)  # ppo.eval_samples per held-out prompt
    # RM refresh (round 2): new comparisons of v1's policy's samples plus as many replayed earlier ones,
    # training continued from the initial RMs; round 2 is scored by the refreshed RMs.
    assert "v2/rm" in stages and "v1/rm" not in stages
    for kind in ("helpful", "safety"):
        new = (d / "v2" / "rm" / f"comparisons_{kind}.jsonl").read_text().splitlines()
        assert (d / "v2" / "rm" / kind / "config.json").is_file()
        if not new:  # no new pairs of this kind (few prompts): the RM of the round before is kept
            assert kind == "safety"
            continue
        replay = (d / "v2" / "rm" / f"replay_{kind}.jsonl").read_text().splitlines()
        assert len(replay) == len(new)
        assert all(json.loads(x)["source"] == f"tinyworld-{kind}-v2" for x in new)
        summary = json.loads((d / "v2" / "rm" / kind / "train_summary.json").read_text())
        assert summary["init"].endswith(f"rm/{kind}")
    # Before PPO the RMs are refreshed again on the RS checkpoint's own samples (reward.refresh_before_ppo), and
    # continue from that round's refresh; PPO, the evaluation and the next round score with them.
    for k in (1, 2):
        assert f"v{k}/ppo_rm" in stages
        summary = json.loads((d / f"v{k}" / "ppo_rm" / "helpful" / "train_summary.json").read_text())
        started_from = str(d / "v2" / "rm" / "helpful") if k == 2 else str(d / "rm" / "helpful")
        assert summary["init"] == started_from
        new = (d / f"v{k}" / "ppo_rm" / "comparisons_helpful.jsonl").read_text().splitlines()
        assert new and all(json.loads(x)["source"] == f"tinyworld-helpful-v{k}-ppo" for x in new)
    assert json.loads((d / "v2" / "rm" / "helpful" / "train_summary.json").read_text())["init"].endswith(
        "v1/ppo_rm/helpful")
    # campaign.select=best: each round keeps its trained policy or the previous round's, by the held-out reward.
    for k in (1, 2):
        sel = json.loads((d / f"v{k}" / "select.json").read_text())
        higher = "previous" if sel["previous"]["reward"] > sel["trained"]["reward"] else "trained"
        assert sel["kept"] == higher and report["rounds"][k]["policy"] == sel["policy"] == sel[higher]["policy"]
        assert sel["trained"]["policy"] == ("v2/policy" if k == 2 else "v1/ppo/policy")  # round 2's merged
        rows = [json.loads(x) for x in (d / f"v{k}" / "select_samples.jsonl").read_text().splitlines()]
        assert rows and all(held_out(r["prompt"]) for r in rows) and len(rows) == 2 * 2 * sel["prompts"]
    assert json.loads((d / "v1" / "select.json").read_text())["previous"]["policy"] == "base"
    # Each refresh first scores its new comparisons with the RMs it starts from (reward.refresh_check per RM).
    assert report["rounds"][1]["rm_new_batch"].keys() == {"ppo_rm"}
    for name, before in (("rm", "v1/ppo_rm"), ("ppo_rm", "v2/rm")):
        batch = report["rounds"][2]["rm_new_batch"][name]
        n_new = len((d / "v2" / name / "comparisons_helpful.jsonl").read_text().splitlines())
        assert batch["helpful"]["rm"] == f"{before}/helpful" and batch["helpful"]["n"]["all"] == min(n_new, 256)
        assert 0 <= batch["helpful"]["avg"] <= 1
    md = (d / "report.md").read_text()
    assert "## Reward models on each refresh's new comparisons" in md and "| v2 | before PPO | helpful |" in md
    # the selection table: the kept policy of each round
    assert "| round | kept | trained R_c | trained se | previous R_c |" in md
    assert f"| v2 | {json.loads((d / 'v2' / 'select.json').read_text())['policy']} |" in md


def test_select_best_without_held_out_prompts_says_so(world_config, tmp_path):
    from iterative_rlhf.campaign import Campaign
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.errors import UserError

    sets = [f"tinyworld.{k}={v}" for k, v in vars(world_config).items()] + ["campaign.select=best"]
    campaign = Campaign(load_recipe(None, sets), tmp_path / "run")
    campaign.holdout_prompts = []  # a prompt file too small for any prompt to hash into the held-out set
    with pytest.raises(UserError, match="campaign.select=best: no held-out prompts"):
        campaign.select(1)
    assert not (tmp_path / "run" / "v1" / "select.json").exists()


def test_select_best_keeps_the_previous_policy_when_the_trained_one_scores_lower(reference_run, tmp_path):
    """A round whose trained policy is worse than the previous round's (here: the base policy in its place) keeps
    the previous one: the evaluation, the report and the next round then use that policy."""
    import shutil

    from iterative_rlhf.campaign import Campaign
    from iterative_rlhf.config import load_recipe

    d = tmp_path / "run"
    shutil.copytree(reference_run, d)
    v1 = json.loads((d / "v1" / "select.json").read_text())
    v1.update(kept="trained", policy="v1/ppo/policy")  # round 1 kept its PPO policy
    (d / "v1" / "select.json").write_text(json.dumps(v1))
    campaign = Campaign(load_recipe(d / "config.yaml"), d)
    campaign.prepare()
    made = campaign.round_policy
    campaign.round_policy = lambda k: campaign.base_path if k == 2 else made(k)  # round 2 "made" the base
    campaign.select(2)
    sel = json.loads((d / "v2" / "select.json").read_text())
    assert sel["trained"]["policy"] == "base" and sel["previous"]["policy"] == "v1/ppo/policy"
    assert sel["previous"]["reward"] > sel["trained"]["reward"] and sel["kept"] == "previous"
    assert campaign.policy_of(2) == str(d / "v1" / "ppo" / "policy")
    # round 1's selection drew the previous policy's samples for round 2 already: they are reused
    rows = [json.loads(x) for x in (d / "v2" / "select_samples.jsonl").read_text().splitlines()]
    earlier = [json.loads(x) for x in (d / "v1" / "select_samples.jsonl").read_text().splitlines()]
    mine = [(r["prompt"], r["response"]) for r in rows if r["policy"] == "v1/ppo/policy"]
    assert mine == [(r["prompt"], r["response"]) for r in earlier if r["policy"] == "v1/ppo/policy"]


@pytest.mark.parametrize("ratio", [0.5, 0.0])
def test_refresh_replays_the_asked_share_of_earlier_comparisons(reference_run, world_config, tmp_path, ratio):
    """reward.refresh_replay: replayed earlier comparisons per new one (0: the RM trains on the new ones only)."""
    import shutil

    from iterative_rlhf.campaign import Campaign
    from iterative_rlhf.config import load_recipe

    d = tmp_path / "run"
    shutil.copytree(reference_run, d)
    sets = [a for a in small_args(world_config) if a != "--set"]
    sets += [f"reward.refresh_replay={ratio}", "reward.helpful.max_length=128"]  # no pair cut for length
    recipe = load_recipe(None, sets)
    (d / "config.yaml").write_text(recipe.to_yaml())  # keep the reference run's rounds (--force would clear them)
    campaign = Campaign(recipe, d)
    campaign.prepare()
    out = tmp_path / "refresh"
    campaign.refresh_rms(2, out=out)
    new = (out / "comparisons_helpful.jsonl").read_text().splitlines()
    replay = (out / "replay_helpful.jsonl").read_text().splitlines()
    assert new and len(replay) == round(len(new) * ratio)
    summary = json.loads((out / "helpful" / "train_summary.json").read_text())
    assert summary["pairs"] == len(new) + len(replay)


def test_rerun_does_not_recompute(reference_run, world_config):
    before = (reference_run / "manifest.json").read_text()
    t = time.time()
    run_cli(["round", "--n", str(ROUNDS), "--out", str(reference_run), *small_args(world_config)])
    assert time.time() - t < 60
    assert (reference_run / "manifest.json").read_text() == before


def test_force_clears_what_another_recipe_wrote(reference_run, world_config, tmp_path):
    """--force on a directory of another recipe starts again: no stage (PPO included) may reuse its files."""
    import shutil

    from iterative_rlhf.campaign import Campaign, Manifest
    from iterative_rlhf.config import load_recipe

    d = tmp_path / "run"
    shutil.copytree(reference_run, d)
    assert (d / "v1" / "ppo").is_dir()
    sets = [a for a in small_args(world_config) if a != "--set"] + ["rs.n=2"]
    Campaign(load_recipe(None, sets), d, force=True)
    assert not [p.name for p in d.iterdir() if p.name.startswith("v") or p.name in ("rm", "plots", "report.json")]
    assert Manifest(d).data == {"stages": {}}
    assert load_recipe(d / "config.yaml").rs.n == 2


def test_foreign_recipe_is_refused(reference_run, world_config):
    from iterative_rlhf.cli import main

    args = ["round", "--n", str(ROUNDS), "--out", str(reference_run), *small_args(world_config), "--set", "rs.n=2"]
    assert main(args) == 2


def test_a_run_made_before_rounds_were_merged_is_not_taken_for_todays_default(tmp_path):
    """A run directory whose config.yaml predates campaign.merge did not merge: today's default (0.5) is another
    recipe there, named in the refusal, and the same recipe with campaign.merge=1 continues it."""
    from iterative_rlhf.campaign import Campaign
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.errors import UserError

    d = tmp_path / "old"
    d.mkdir()
    text = load_recipe(None).to_yaml()
    assert "  merge: 0.5\n" in text
    (d / "config.yaml").write_text(text.replace("  merge: 0.5\n", ""))
    with pytest.raises(UserError, match=r"differs in campaign\.merge: 1\.0 in the run, 0\.5 now\)"):
        Campaign(load_recipe(None), d)
    Campaign(load_recipe(None, ["campaign.merge=1"]), d)  # accepted, and the config now says so
    assert load_recipe(d / "config.yaml").campaign.merge == 1.0


def test_sigkill_at_random_points_then_resume_gives_the_same_report(reference_run, world_config, tmp_path):
    """Killed at several points, rerun: the report equals the uninterrupted run's. This campaign trains its two
    RMs at once (a worker process for the safety RM, workers.py), the reference one after the other: the
    same weights bit for bit, and a killed campaign's worker dies with it."""
    out = tmp_path / "killed"
    args = ["round", "--n", str(ROUNDS), "--out", str(out), *small_args(world_config)]
    at_once = {"ITERATIVE_RLHF_AT_ONCE": "1"}
    rng = random.Random(0)
    # Kill inside: RM training, v0 eval, RS sampling, SFT, PPO (after a saved iteration), the last report.
    points = [set(), {"rm/safety"}, {"v1/rs_sample"}, {"v1/rs_select"}, {"v1/ppo"}, {"v2/sft"}, {"v2/eval"}]
    kills = 0
    for wanted in points:
        if wanted <= stages_done(out) and wanted:
            continue
        delay = rng.uniform(0.5, 3.0)
        reached: list[float] = []

        def kill_when(wanted=wanted, delay=delay, reached=reached) -> bool:
            if not wanted <= stages_done(out):
                return False
            if not reached:
                reached.append(time.time())
            return time.time() - reached[0] > delay

        if run_cli(args, kill_when, env=at_once) == -9:
            kills += 1
    run_cli(args, env=at_once)  # finish
    assert kills >= 4
    summary = json.loads((out / "rm" / "safety" / "train_summary.json").read_text())
    assert summary["at_once"] and not json.loads((reference_run / "rm" / "safety" / "train_summary.json")
                                                  .read_text())["at_once"]
    ref = json.loads((reference_run / "report.json").read_text())
    got = json.loads((out / "report.json").read_text())
    assert comparable(got) == comparable(ref)


def test_rs_and_ppo_stages_on_their_own(world, world_config, tmp_path):
    from iterative_rlhf.cli import main

    out = tmp_path / "stages"
    args = ["--out", str(out), *small_args(world_config)]
    assert main(["rs", "--round", "1", *args]) == 0
    for name in ("samples.jsonl", "scored.jsonl", "selected.jsonl", "rs.json"):
        assert (out / "v1" / name).is_file()
    rs = json.loads((out / "v1" / "rs.json").read_text())
    assert [row["n"] for row in rs["reward_vs_n"]] == [1, 2, 4]
    assert rs["reward_vs_n"][-1]["max"] >= rs["reward_vs_n"][0]["max"]  # best-of-4 >= best-of-1
    assert main(["ppo", "--round", "1", *args]) == 0
    assert (out / "v1" / "ppo" / "policy" / "config.json").is_file()
    assert main(["rs", "--round", "3", *args]) == 2  # round 2 has not finished


@pytest.mark.parametrize("holdout_from", ["rs+ppo", "ppo"])
def test_held_out_prompts_never_reach_ppo(world, world_config, tmp_path, holdout_from):
    """campaign.holdout_from: PPO never trains on its held-out prompts; 'ppo' lets rejection sampling use them."""
    from iterative_rlhf.campaign import Campaign
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.tinyworld.world import get_prompts

    sets = [f"tinyworld.{k}={v}" for k, v in vars(world_config).items()] + [f"campaign.holdout_from={holdout_from}"]
    campaign = Campaign(load_recipe(None, sets), tmp_path / "run")
    campaign.prepare()
    held = {p["prompt"] for p in campaign.holdout_prompts}
    ppo = {p["prompt"] for p in campaign.ppo_prompts}
    rs = {p["prompt"] for p in campaign.train_prompts}
    assert held and ppo and not held & ppo
    assert ppo | held == {p.text for p in get_prompts("train")}
    assert rs == (ppo | held if holdout_from == "ppo" else ppo)


def test_a_campaign_on_the_users_own_data_with_people_annotating_each_round(world, tmp_path):
    """No TinyWorld: a local policy checkpoint, preference files without test_data, prompt files made by
    `iterative-rlhf prompts`, and a refresh on people's comparisons (reward.refresh_data; TinyWorld's annotators
    stand in for the people here). Two rs+ppo rounds end to end: RMs, RS, SFT, PPO, evaluation and report; the
    campaign stops where round 2 waits for the annotations and goes on when they are there."""
    import random
    import shutil

    import yaml
    from transformers import AutoModelForCausalLM

    from iterative_rlhf.cli import main
    from iterative_rlhf.io import read_jsonl
    from iterative_rlhf.tinyworld.annotators import make_comparisons
    from iterative_rlhf.tinyworld.world import find_prompt

    data = tmp_path / "data"
    data.mkdir()
    for kind in ("helpful", "safety"):  # the user's own comparisons, in the canonical format
        shutil.copy(world.comparisons(kind, "train"), data / f"{kind}.jsonl")
    recipe = {
        "name": "users-data", "model": {"policy": str(world.policy)},
        "reward": {**{k: {"data": [str(data / f"{k}.jsonl")], "max_length": 64} for k in ("helpful", "safety")},
                   "refresh_data": str(tmp_path / "annotations" / "v{round}_{kind}.jsonl")},
        "rs": {"n": 2}, "sft": {"epochs": 1.0},
        "ppo": {"iterations": 2, "batch_size": 16, "mini_batch_size": 8, "eval_every": 1},
        "campaign": {"eval_samples": 1, "prompts": str(data / "train.jsonl"), "eval_prompts": str(data / "eval.jsonl")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    assert main(["prompts", "--recipe", str(path)]) == 0
    train, evals = read_jsonl(data / "train.jsonl"), read_jsonl(data / "eval.jsonl")
    assert train and evals and not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    harmful = {p["prompt"] for p in read_jsonl(world.prompts("train")) if p["family"] == "harmful"}
    for rows in (train, evals):
        assert {r["prompt"] for r in rows if r["is_safety"]} >= harmful & {r["prompt"] for r in rows}
    assert main(["prompts", "--recipe", str(path)]) == 2  # never overwrites without --force

    out = tmp_path / "run"
    args = [sys.executable, "-m", "iterative_rlhf.cli", "round", "--n", "2", "--recipe", str(path), "--out", str(out)]
    waiting = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert waiting.returncode == 3, waiting.stderr[-2000:]  # waiting, not failing
    pairs = out / "v2" / "rm" / "pairs.jsonl"
    assert "waiting: v2: the RM refresh waits for people's comparisons" in waiting.stderr
    assert str(pairs) in waiting.stderr
    assert "v1/report" in stages_done(out) and "v2/rm" not in stages_done(out)

    rng = random.Random(0)
    rows = read_jsonl(pairs)
    assert rows and all(r["response_0"] != r["response_1"] for r in rows)
    (tmp_path / "annotations").mkdir()
    made = {}
    for kind in ("helpful", "safety"):
        made[kind] = [c for r in rows for c in make_comparisons(
            kind, {find_prompt(r["prompt"]): [r["response_0"], r["response_1"]]}, 1, rng, 0.35, 0.01, "people")]
        (tmp_path / "annotations" / f"v2_{kind}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in made[kind]))
    leak = {"prompt": evals[0]["prompt"], "chosen": "a", "rejected": "b", "level": "better"}  # an eval prompt
    with open(tmp_path / "annotations" / "v2_helpful.jsonl", "a") as f:
        f.write(json.dumps(leak) + "\n")
    made["helpful"].append(leak)
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    said = "".join(done.stderr.split())  # the console wraps long lines
    assert "v2_helpful.jsonl:1of" in said and "comparisonsareonevalprompts" in said
    assert made["helpful"] and made["safety"]
    for kind in ("helpful", "safety"):
        assert len(read_jsonl(out / "v2" / "rm" / f"comparisons_{kind}.jsonl")) == len(made[kind])
        assert (out / "v2" / "rm" / kind / "train_log.jsonl").is_file()  # trained, not copied
    report = json.loads((out / "report.json").read_text())
    v0, v1, v2 = report["rounds"]
    assert v2["eval"]["n_prompts"] == len(evals) and v2["eval"]["gold"] is None and v0["eval"]["gold"] is None
    assert v2["policy"] == "v2/policy" and v2["merge"]["trained"] == "v2/ppo/policy"  # (campaign.merge=0.5)
    assert v2["selection"] and v2["ppo"]["history"] and v2["times"]["rm"] > 0
    batch = v2["rm_new_batch"]["rm"]  # people's comparisons, scored by the RMs before the refresh
    assert batch["helpful"]["n"]["all"] == len(made["helpful"]) and batch["helpful"]["rm"] == "rm/helpful"
    assert v1["eval"]["kl_to_base"] > 0
    rm_eval = json.loads((out / "rm" / "eval" / "rm_eval.json").read_text())
    assert all(rm_eval["test_sets"][kind] > 0 for kind in ("helpful", "safety"))  # the held-out comparisons
    AutoModelForCausalLM.from_pretrained(out / "v2" / "policy")


def test_rs_temperature_search_samples_at_the_best_of_n_winner(world, world_config, tmp_path):
    """rs.temperature_search: a probe at each candidate, scored by the RMs of the round before; the round
    samples at the temperature with the highest mean best-of-N R_c (Llama 2 re-tuned it every round)."""
    from iterative_rlhf.cli import main

    out = tmp_path / "search"
    args = ["--out", str(out), *small_args(world_config), "--set", "rs.temperature_search=[0.3,1.0,2.0]",
            "--set", "rs.temperature_search_prompts=6"]
    assert main(["rs", "--round", "1", *args]) == 0
    ts = json.loads((out / "v1" / "temperature.json").read_text())
    assert [c["temperature"] for c in ts["candidates"]] == [0.3, 1.0, 2.0] and ts["prompts"] == 6
    assert ts["rm"] == "rm" and ts["n"] == 4
    assert ts["chosen"] == max(ts["candidates"], key=lambda c: c["best_of_n"])["temperature"]
    assert all(c["best_of_n"] >= c["median"] for c in ts["candidates"])
    distinct = {c["temperature"]: c["distinct"] for c in ts["candidates"]}
    assert distinct[0.3] < distinct[2.0] <= 4  # a cold policy repeats itself
    assert json.loads((out / "v1" / "rs.json").read_text())["selection"]["temperature"] == ts["chosen"]
