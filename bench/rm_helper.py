"""Reward-model training in micro-batches with a helper process, against one pass per step, side by side.

With ``reward.<kind>.per_device_batch_size`` below ``batch_size`` on a CPU (one process, float32), each step's
micro-batches are accumulated by the training itself (``reward._micro_batched``): their gradients summed in
order, as ``backward`` accumulates them. On a machine with 2+ cores a helper process (``workers.Helper``)
computes the second of two micro-batches while the training process computes the first, so the weights are those
of the same training alone bit for bit, and of transformers' own gradient accumulation.

Trains the default TinyWorld helpfulness RM on its first ``--pairs`` train comparisons (one epoch) in a fresh
process per run, three ways interleaved:

* ``32 pairs per pass``: ``per_device_batch_size=32``, the default before (one forward and backward of 32
  pairs, 2 sleeping threads);
* ``2 x 16, alone``: ``per_device_batch_size=16`` (the default), ``ITERATIVE_RLHF_AT_ONCE=0`` (one thread);
* ``2 x 16, helper``: the same with a helper process, the default on a CPU machine with 2+ cores (the fork
  server started and waited for first, as a campaign starts it at its beginning; its start is printed apart).

Prints each way's median seconds, the ratios to one pass, and whether the two ``2 x 16`` ways' weights are
equal bit for bit; ``--out`` also writes them as JSON.

    python bench/rm_helper.py --out bench/results/rm_helper_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from interleaved import launch, same_weights, server_start

WAYS = {  # name: (ITERATIVE_RLHF_AT_ONCE, pairs per forward pass)
    "32 pairs per pass": ("0", 32),
    "2 x 16, alone": ("0", 16),
    "2 x 16, helper": ("1", 16),
}


def worker(out: str, pairs: int, per_device: int) -> None:
    """One RM training (run in its own process)."""
    import dataclasses

    from iterative_rlhf._quiet import cpu_threads

    cpu_threads()  # as the CLI: sleeping OpenMP threads, set before torch loads
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.reward import rm_datasets, train_reward_model
    from iterative_rlhf.tinyworld.build import build_world

    recipe = load_recipe(None, [])
    world = build_world(recipe.tinyworld)
    helpful = dataclasses.replace(recipe.reward.helpful, epochs=1.0, per_device_batch_size=per_device)
    recipe.reward = dataclasses.replace(recipe.reward, helpful=helpful)
    train, _ = rm_datasets(recipe, "helpful", world)
    train = train.select(range(min(pairs, len(train))))
    start = server_start()
    t0 = time.perf_counter()
    train_reward_model(recipe, "helpful", Path(out), init_path=str(world.policy), train_ds=train)
    print(json.dumps({"seconds": time.perf_counter() - t0, "server_start_s": start}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8480, help="training pairs (default: all the initial ones)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way, interleaved")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--per-device", type=int, default=32, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.pairs, a.per_device)
        return
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    starts: list[float] = []
    with tempfile.TemporaryDirectory(prefix="rm_helper.") as tmp:
        work = Path(tmp)
        for r in range(a.repeats):
            for i, (way, (setting, per_device)) in enumerate(WAYS.items()):
                run = launch(__file__, setting, work / f"{i}-{r}", "--pairs", str(a.pairs),
                             "--per-device", str(per_device))
                times[way].append(run["seconds"])
                if run["server_start_s"]:
                    starts.append(run["server_start_s"])
                print(f"{way}: {run['seconds']:.1f} s", flush=True)
        equal = all(same_weights(work / "1-0", work / f"{i}-{r}") for i in (1, 2) for r in range(a.repeats))
    medians = {way: statistics.median(t) for way, t in times.items()}
    base = medians["32 pairs per pass"]
    print(f"\nhelpfulness RM, {a.pairs} pairs, {os.cpu_count()} cores, medians of {a.repeats}:")
    for way, m in medians.items():
        print(f"  {way:20} {m:7.1f} s  {base / m:5.2f}x as fast as one pass")
    print(f"  2 x 16 alone and with a helper: weights equal bit for bit: {equal}")
    print(f"  (before that, the fork server's start: {statistics.median(starts):.1f} s, once per process)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "cores": os.cpu_count(), "pairs": a.pairs, "seconds": times,
            "median_s": {k: round(v, 2) for k, v in medians.items()},
            "speed_vs_one_pass": {k: round(base / v, 3) for k, v in medians.items()},
            "server_start_s": starts, "same_weights": equal}, indent=2) + "\n")


if __name__ == "__main__":
    main()
