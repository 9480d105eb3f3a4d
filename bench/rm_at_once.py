"""The helpfulness and safety RMs trained one after the other vs at once (a process each), side by side.

A campaign on a CPU machine with 2+ cores trains its two RMs at once (``iterative_rlhf/workers.py``): the
helpfulness RM in the campaign's process, the safety RM in a worker from a fork server (started on first use:
it imports torch, transformers and TRL once), each with the threads it has alone (2 sleeping threads on 2
cores). One after the other (``ITERATIVE_RLHF_AT_ONCE=0``) is what campaigns did before.

Trains the default TinyWorld's initial RMs (its train comparisons, the recipe's epochs) in a fresh process per
run, the two ways interleaved (A B A B ...). At once, the fork server is started and waited for first (a
campaign starts it at its beginning, beside the world's build), and its start is printed apart. Prints each
way's median seconds, the ratio, and whether the trained weights of both RMs are equal bit for bit; ``--out``
also writes them as JSON.

    python bench/rm_at_once.py --out bench/results/rm_at_once_cpu.json
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

WAYS = {"one after the other": "0", "at once": "1"}


def worker(out: str, epochs: float) -> None:
    """Both RMs' training, as the campaign does it (run in its own process; ITERATIVE_RLHF_AT_ONCE says how)."""
    import dataclasses
    import functools

    from iterative_rlhf._quiet import cpu_threads

    cpu_threads()  # as the CLI: sleeping OpenMP threads, set before torch loads
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.reward import rm_datasets, train_reward_model
    from iterative_rlhf.tinyworld.build import build_world
    from iterative_rlhf.workers import at_once

    recipe = load_recipe(None, [])
    if epochs:
        recipe.reward = dataclasses.replace(
            recipe.reward, helpful=dataclasses.replace(recipe.reward.helpful, epochs=epochs),
            safety=dataclasses.replace(recipe.reward.safety, epochs=epochs))
    world = build_world(recipe.tinyworld)
    jobs = []
    for kind in ("helpful", "safety"):
        train, _ = rm_datasets(recipe, kind, world)
        jobs.append((kind, functools.partial(train_reward_model, recipe, kind, Path(out) / kind,
                                             init_path=str(world.policy), train_ds=train)))
    start = 0.0
    if os.environ["ITERATIVE_RLHF_AT_ONCE"] == "1":  # as in a campaign: the fork server is up by the RM stages
        t0 = time.perf_counter()
        at_once([("a", int), ("b", int)])
        start = time.perf_counter() - t0
    t0 = time.perf_counter()
    at_once(jobs)
    print(json.dumps({"seconds": time.perf_counter() - t0, "server_start_s": start}))


def launch(setting: str, out: Path, epochs: float) -> dict:
    env = {**os.environ, "ITERATIVE_RLHF_AT_ONCE": setting, "HF_HUB_OFFLINE": "1", "ITERATIVE_RLHF_NO_PROGRESS": "1"}
    for name in ("OMP_NUM_THREADS", "ITERATIVE_RLHF_THREADS"):  # the defaults decide the threads
        env.pop(name, None)
    proc = subprocess.run([sys.executable, __file__, "--worker", str(out), "--epochs", str(epochs)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"a training process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    for kind in ("helpful", "safety"):
        wa, wb = load_file(a / kind / "model.safetensors"), load_file(b / kind / "model.safetensors")
        if wa.keys() != wb.keys() or not all(bool((wa[k] == wb[k]).all()) for k in wa):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way, interleaved")
    ap.add_argument("--epochs", type=float, default=0.0, help="epochs of both RMs (0: the recipe's)")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.epochs)
        return
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    starts: list[float] = []
    with tempfile.TemporaryDirectory(prefix="rm_at_once.") as tmp:
        work = Path(tmp)
        for r in range(a.repeats):
            for way, setting in WAYS.items():
                run = launch(setting, work / f"{setting}-{r}", a.epochs)
                times[way].append(run["seconds"])
                if setting == "1":
                    starts.append(run["server_start_s"])
                print(f"{way}: {times[way][-1]:.1f} s", flush=True)
        equal = all(same_weights(work / "0-0", work / f"{s}-{r}") for s in WAYS.values() for r in range(a.repeats))
    medians = {way: statistics.median(t) for way, t in times.items()}
    ratio = medians["one after the other"] / medians["at once"]
    print(f"\nthe initial helpfulness and safety RMs, {os.cpu_count()} cores, medians of {a.repeats}:")
    for way, m in medians.items():
        print(f"  {way:22} {m:7.1f} s")
    print(f"  at once is {ratio:.2f}x as fast; weights equal bit for bit: {equal}")
    print(f"  (before that, the fork server's start: {statistics.median(starts):.1f} s, once per process)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"cores": os.cpu_count(), "seconds": times,
                                           "median_s": {k: round(v, 2) for k, v in medians.items()},
                                           "server_start_s": starts,
                                           "speedup": round(ratio, 3), "same_weights": equal}, indent=2) + "\n")


if __name__ == "__main__":
    main()
