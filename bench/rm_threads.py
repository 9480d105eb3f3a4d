"""Reward-model training on 1 vs 2 CPU threads, with spinning and with sleeping OpenMP threads, side by side.

"Short spins" leaves the wait policy to libgomp with ``GOMP_SPINCOUNT=10000``: threads spin briefly, then sleep.
Each setting also comes with batches of independent pairs (TRL's way) or of a few prompts' pairs, each
distinct response scored once (``reward.<kind>.prompts_per_batch``).

Trains the default TinyWorld helpfulness RM on its first ``--pairs`` train comparisons (one epoch, the size
of one campaign refresh) in a fresh process per setting, because OpenMP reads ``OMP_WAIT_POLICY`` only when
torch loads. Each setting runs alone, then as two copies at once (another job holding the other core).
Prints the seconds, each setting's ratio to 1 thread alone, and whether the trained weights equal those of
1 thread with the same batches bit for bit; ``--out`` also writes them as JSON.

    python bench/rm_threads.py --out bench/results/rm_threads_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from interleaved import same_weights

SETTINGS = {  # name: (threads, OMP_WAIT_POLICY, reward.helpful.prompts_per_batch)
    "1 thread": (1, "PASSIVE", 0),
    "2 threads, sleeping": (2, "PASSIVE", 0),
    "2 threads, spinning": (2, "ACTIVE", 0),
    "2 threads, short spins": (2, "spin:10000", 0),  # libgomp's wait policy unset, GOMP_SPINCOUNT=10000
    "1 thread, 4 prompts per batch": (1, "PASSIVE", 4),
    "2 threads sleeping, 4 prompts": (2, "PASSIVE", 4),
}


def worker(out: str, pairs: int, prompts_per_batch: int) -> None:
    """One RM training (run in its own process, threads and wait policy set by the caller's environment)."""
    import dataclasses

    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.reward import rm_datasets, train_reward_model
    from iterative_rlhf.tinyworld.build import build_world

    recipe = load_recipe(None, [])
    world = build_world(recipe.tinyworld)
    helpful = dataclasses.replace(recipe.reward.helpful, epochs=1.0, prompts_per_batch=prompts_per_batch)
    recipe.reward = dataclasses.replace(recipe.reward, helpful=helpful)
    train, _ = rm_datasets(recipe, "helpful", world)
    train = train.select(range(min(pairs, len(train))))
    t0 = time.perf_counter()
    train_reward_model(recipe, "helpful", Path(out), init_path=str(world.policy), train_ds=train)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def launch(threads: int, policy: str, out: Path, pairs: int, prompts_per_batch: int = 0) -> subprocess.Popen:
    env = {**os.environ, "ITERATIVE_RLHF_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("GOMP_SPINCOUNT", None)
    if policy.startswith("spin:"):  # spin that many times, then sleep
        env.pop("OMP_WAIT_POLICY", None)
        env["GOMP_SPINCOUNT"] = policy.removeprefix("spin:")
    else:
        env["OMP_WAIT_POLICY"] = policy
    env.pop("OMP_NUM_THREADS", None)  # small_model_threads leaves torch alone when it is set
    return subprocess.Popen([sys.executable, __file__, "--worker", str(out), "--pairs", str(pairs),
                             "--prompts-per-batch", str(prompts_per_batch)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def seconds(proc: subprocess.Popen) -> float:
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a training process failed (exit {proc.returncode}); run it alone: python {__file__} "
                         "--worker DIR")
    return json.loads(stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6400, help="comparisons to train on (one epoch)")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    ap.add_argument("--skip", nargs="*", default=[], help="settings to leave out (names as printed)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-per-batch", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.pairs, a.prompts_per_batch)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="rm_threads.") as tmp:
        work = Path(tmp)
        launch(1, "PASSIVE", work / "warm", 64).communicate()  # builds or finds the world first
        first: dict[int, int] = {}  # prompts_per_batch -> the first setting run with it
        for i, (name, (threads, policy, ppb)) in enumerate(SETTINGS.items()):
            if name in a.skip:
                continue
            first.setdefault(ppb, i)
            alone = seconds(launch(threads, policy, work / f"{i}-alone", a.pairs, ppb))
            pair = [launch(threads, policy, work / f"{i}-pair{j}", a.pairs, ppb) for j in range(2)]
            beside = max(seconds(p) for p in pair)
            rows.append({"setting": name, "threads": threads, "wait_policy": policy, "prompts_per_batch": ppb,
                         "alone_s": round(alone, 2), "two_at_once_s": round(beside, 2),
                         "same_weights_as_1_thread": same_weights(work / f"{first[ppb]}-alone",
                                                                  work / f"{i}-alone")})
    base = rows[0]["alone_s"]
    print(f"helpful RM, {a.pairs} pairs, one epoch")
    print(f"{'setting':32} {'alone s':>8} {'vs row 1':>11} {'2 at once s':>12} {'same weights':>13}")
    for r in rows:
        r["speedup_alone"] = round(base / r["alone_s"], 2)
        print(f"{r['setting']:32} {r['alone_s']:8.1f} {r['speedup_alone']:10.2f}x {r['two_at_once_s']:12.1f} "
              f"{str(r['same_weights_as_1_thread']):>13}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"pairs": a.pairs, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
