"""Reward-model training in float32 vs bfloat16 autocast (``reward.<kind>.mixed_precision``), side by side.

Trains the default TinyWorld helpfulness RM on its first ``--pairs`` train comparisons (one epoch, about half
a campaign refresh) on one torch thread (two in the last two settings, idle threads sleeping as the CLI
sets them), in a fresh process per run, the settings interleaved ``--repeats``
times (A B C ... A B C ...) so that a slow spell of a shared machine hits them all. Prints each setting's median
seconds, its ratio to float32, and the trained RM's accuracy on the world's held-out helpfulness comparisons
(all levels, and the clearest level), so speed and quality read in one table; ``--out`` also writes JSON.

    python bench/rm_precision.py --out bench/results/rm_precision_cpu.json

Settings: ``float32`` (``mixed_precision=none``); ``bf16, SDPA attention`` (autocast with the model's default
attention kernel: on the CPU its bf16 backward is slow); ``bf16, eager attention`` (what
``mixed_precision=bf16`` does on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {  # name: (reward.helpful.mixed_precision, keep SDPA attention, torch threads)
    "float32": ("none", False, 1),
    "bf16, SDPA attention": ("bf16", True, 1),
    "bf16, eager attention": ("bf16", False, 1),
    "float32, 2 threads": ("none", False, 2),
    "bf16 eager, 2 threads": ("bf16", False, 2),
}


def worker(out: str, pairs: int, precision: str, keep_sdpa: bool) -> None:
    """One RM training and its test accuracy (run in its own process)."""
    import dataclasses

    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.io import read_jsonl
    from iterative_rlhf.reward import new_batch_accuracy, rm_datasets, train_reward_model
    from iterative_rlhf.tinyworld.build import build_world

    if keep_sdpa:  # leave the attention kernel as loaded
        from transformers import PreTrainedModel

        PreTrainedModel.set_attn_implementation = lambda self, *a, **k: None
    recipe = load_recipe(None, [])
    world = build_world(recipe.tinyworld)
    helpful = dataclasses.replace(recipe.reward.helpful, epochs=1.0, mixed_precision=precision)
    recipe.reward = dataclasses.replace(recipe.reward, helpful=helpful)
    train, _ = rm_datasets(recipe, "helpful", world)
    train = train.select(range(min(pairs, len(train))))
    t0 = time.perf_counter()
    train_reward_model(recipe, "helpful", Path(out), init_path=str(world.policy), train_ds=train)
    secs = time.perf_counter() - t0
    acc = new_batch_accuracy(out, list(read_jsonl(world.comparisons("helpful", "test"))), limit=100_000)
    print(json.dumps({"seconds": secs, "accuracy": acc}))


def launch(out: Path, pairs: int, precision: str, keep_sdpa: bool, threads: int = 1) -> dict:
    # Idle OpenMP threads sleep, as the CLI sets it (bench/README.md, "Threads").
    env = {**os.environ, "ITERATIVE_RLHF_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, __file__, "--worker", str(out), "--pairs", str(pairs), "--precision", precision]
    if keep_sdpa:
        cmd.append("--keep-sdpa")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"a training process failed (exit {proc.returncode}); run it alone: "
                         f"python {__file__} --worker DIR --precision {precision}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6400, help="comparisons to train on (one epoch)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    ap.add_argument("--skip", nargs="*", default=[], help="settings to leave out (names as printed)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--keep-sdpa", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.pairs, a.precision, a.keep_sdpa)
        return
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="rm_precision.") as tmp:
        work = Path(tmp)
        launch(work / "warm", 64, "none", False)  # builds or finds the world first
        for r in range(a.repeats):
            for i, (name, (precision, keep_sdpa, threads)) in enumerate(SETTINGS.items()):
                if name not in a.skip:
                    runs[name].append(launch(work / f"{i}-{r}", a.pairs, precision, keep_sdpa, threads))
    rows = []
    for name, (precision, keep_sdpa, threads) in SETTINGS.items():
        if name in a.skip:
            continue
        acc = runs[name][-1]["accuracy"]  # the same weights every repeat (seeded): the last one's
        rows.append({"setting": name, "mixed_precision": precision, "sdpa": keep_sdpa, "threads": threads,
                     "seconds": [round(x["seconds"], 2) for x in runs[name]],
                     "median_s": round(statistics.median(x["seconds"] for x in runs[name]), 2),
                     "accuracy": round(acc["avg"], 4), "accuracy_clearest": round(acc["significantly_better"], 4)})
    base = rows[0]["median_s"]
    print(f"helpful RM, {a.pairs} pairs, one epoch, median of {a.repeats}")
    print(f"{'setting':24} {'s':>7} {'vs float32':>11} {'test acc':>9} {'clearest':>9}")
    for r in rows:
        r["speedup"] = round(base / r["median_s"], 2)
        print(f"{r['setting']:24} {r['median_s']:7.1f} {r['speedup']:10.2f}x {r['accuracy']:9.3f} "
              f"{r['accuracy_clearest']:9.3f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"pairs": a.pairs, "repeats": a.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
