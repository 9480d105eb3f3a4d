"""Reward-model training with and without ``group_by_length``, side by side in one run.

Trains the default TinyWorld helpfulness RM (the initial campaign RM: all its train comparisons, the recipe's
epochs) with plain shuffled batches and with length-grouped batches (``reward.helpful.group_by_length``),
alternating the order over ``--repeats``. Prints per setting the seconds, the padded tokens per real token of
its batches, and the held-out quality of the trained RM (accuracy on the eval-split comparisons, and how often
it scores a correct answer above a wrong one), then the speed ratio. ``--out`` also writes them as JSON.

    python bench/rm_group_by_length.py --out bench/results/rm_group_by_length_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path


def padding_ratio(lengths: list[int], batch: int, grouped: bool, seed: int) -> float:
    """Padded tokens / real tokens of one epoch's batches (both sequences of a pair padded to the longest)."""
    import torch

    from iterative_rlhf.reward import LengthBucketSampler

    order = (list(LengthBucketSampler(lengths, batch, seed=seed)) if grouped
             else torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist())
    padded = sum(2 * len(b) * max(lengths[i] for i in b) for b in
                 (order[i:i + batch] for i in range(0, len(order), batch)))
    return padded / (2 * sum(lengths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="Trainings per setting (orders alternate).")
    ap.add_argument("--out", help="Also write the figures here (JSON).")
    args = ap.parse_args()

    from iterative_rlhf.checkpoint import load_tokenizer
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.reward import _tokenize_pairs, evaluate_reward_models, rm_datasets, train_reward_model
    from iterative_rlhf.tinyworld.build import build_world

    recipe = load_recipe(None, [])
    world = build_world(recipe.tinyworld)
    train, test = rm_datasets(recipe, "helpful", world)
    tok = _tokenize_pairs(train, load_tokenizer(str(world.policy)), recipe.reward.helpful.max_length, "helpful")
    lengths = [max(len(c), len(r)) for c, r in zip(tok["chosen_ids"], tok["rejected_ids"], strict=True)]
    batch = recipe.reward.helpful.batch_size

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for grouped in order:
                name = "length-grouped" if grouped else "plain"
                cfg = dataclasses.replace(recipe.reward.helpful, group_by_length=grouped)
                r = dataclasses.replace(recipe, reward=dataclasses.replace(recipe.reward, helpful=cfg))
                out = Path(tmp) / f"{name}-{rep}"
                t0 = time.perf_counter()
                train_reward_model(r, "helpful", out, init_path=str(world.policy), train_ds=train)
                sec = time.perf_counter() - t0
                ev = evaluate_reward_models({"helpful": out}, {"helpful": test}, Path(tmp) / f"eval-{name}-{rep}",
                                            world=world)
                acc = next(row for row in ev["accuracy"] if row["model"] == "helpful")["avg"]
                cow = ev["tinyworld"]["correct_over_wrong"]["rate"]
                res = results.setdefault(name, {"seconds": [], "test_accuracy": [], "correct_over_wrong": [],
                                                "padded_per_real_token": padding_ratio(lengths, batch, grouped, 0)})
                res["seconds"].append(round(sec, 2))
                res["test_accuracy"].append(round(acc, 4))
                res["correct_over_wrong"].append(round(cow, 4))
                print(f"{name:15s} repeat {rep}: {sec:6.1f} s, test accuracy {acc:.3f}, correct over wrong {cow:.3f}",
                      flush=True)

    plain, grouped = (statistics.median(results[k]["seconds"]) for k in ("plain", "length-grouped"))
    summary = {"pairs": len(train), "batch_size": batch, "epochs": recipe.reward.helpful.epochs,
               "settings": results, "speedup": round(plain / grouped, 3)}
    print(f"\n{len(train)} pairs, batch {batch}: padded/real tokens "
          f"{results['plain']['padded_per_real_token']:.2f} plain vs "
          f"{results['length-grouped']['padded_per_real_token']:.2f} grouped; "
          f"training {plain:.1f} s vs {grouped:.1f} s: length-grouped is {plain / grouped:.2f}x as fast")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
