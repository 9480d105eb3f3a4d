"""PPO from a campaign's last policy with the TinyWorld gold judge (or learned RMs) as the reward.

What more PPO could give at temperature 1.0 if its reward were perfect: PPO (the
recipe's settings, ``--set`` to change them) on the train prompts less the held-out
1 in 8 (its early stopping reads their gold), starting from ``--policy``; the
reward is ``2 * gold - 1`` (whitened), or the gated score of ``--rm-dir``'s RMs.
The returned policy (PPO's best held-out iteration) is sampled 128 times per eval
prompt at temperature 1.0. Prints gold per evaluation and writes OUT/result.json.

    python scripts/ppo_ceiling.py --policy runs/tinyworld-rs+ppo/v5/ppo/policy --out runs/ppo-ceiling/gold-b256 \\
        --set ppo.iterations=48 --set ppo.early_stopping_patience=100 --set ppo.value_init=policy \\
        --set ppo.batch_size=256 --set ppo.mini_batch_size=64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("ITERATIVE_RLHF_NO_PROGRESS", "1")

from iterative_rlhf.campaign import is_held_out  # noqa: E402
from iterative_rlhf.config import load_recipe  # noqa: E402
from iterative_rlhf.ppo import run_ppo  # noqa: E402
from iterative_rlhf.tinyworld.evaluate import GoldScorer, evaluate_policy  # noqa: E402
from iterative_rlhf.tinyworld.world import get_prompts, metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="checkpoint PPO starts from (and its KL reference)")
    ap.add_argument("--rm-dir", default="", help="folder with helpful/ and safety/: learned RMs instead of gold")
    ap.add_argument("--out", required=True, help="PPO's folder (emptied first)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    recipe = load_recipe(None, overrides=a.overrides)
    rows = [{"prompt": p.text, "is_safety": p.is_safety} for p in get_prompts("train")]
    train = [r for r in rows if not is_held_out(r["prompt"])]
    held = [r for r in rows if is_held_out(r["prompt"])]
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    rms = Path(a.rm_dir) if a.rm_dir else None
    t0 = time.perf_counter()
    policy = run_ppo(recipe, policy_path=a.policy, helpful_rm=str(rms / "helpful") if rms else "-",
                     safety_rm=str(rms / "safety") if rms else "-", out_dir=out, prompts=train, eval_prompts=held,
                     scorer=None if rms else GoldScorer(), seed=a.seed,
                     eval_metrics=lambda rs, xs: metrics([(r["prompt"], x) for r, x in zip(rs, xs, strict=True)]))
    res = {"policy": a.policy, "reward": "learned RMs " + a.rm_dir if rms else "gold judge", "set": a.overrides,
           "wall_seconds": time.perf_counter() - t0}
    m = evaluate_policy(str(policy), recipe, split="eval", samples=128, seed=0, temperature=1.0)
    res["eval_t1"] = {k: m[k] for k in ("gold", "helpful_rate", "violation_rate", "false_refusal_rate",
                                         "false_refusal_rate_borderline")}
    res["held_out"] = [{k: r.get(k) for k in ("iteration", "eval_gold", "eval_violation_rate")}
                       for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_gold" in r]
    for r in res["held_out"]:
        print(f"iteration {r['iteration']}: held-out gold {r['eval_gold']:.3f}")
    print(json.dumps(res["eval_t1"]))
    (out / "result.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
