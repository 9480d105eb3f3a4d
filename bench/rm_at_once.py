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
import tempfile
import time
from pathlib import Path

from interleaved import interleave, same_weights, server_start, summary

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
    start = server_start()  # as in a campaign: the fork server is up by the RM stages
    t0 = time.perf_counter()
    at_once(jobs)
    print(json.dumps({"seconds": time.perf_counter() - t0, "server_start_s": start}))


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
    with tempfile.TemporaryDirectory(prefix="rm_at_once.") as tmp:
        work = Path(tmp)
        times, starts = interleave(__file__, WAYS, a.repeats, work, "--epochs", str(a.epochs))
        equal = all(same_weights(work / "0-0" / kind, work / f"{s}-{r}" / kind)
                    for kind in ("helpful", "safety") for s in WAYS.values() for r in range(a.repeats))
    summary("the initial helpfulness and safety RMs", times, starts, equal, a.out)


if __name__ == "__main__":
    main()
