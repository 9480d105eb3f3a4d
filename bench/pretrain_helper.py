"""TinyWorld's base-policy pre-training alone vs with a helper process, side by side.

A pre-training step is four length-sorted micro-batches whose gradients add up to the batch's. On a CPU machine
with 2+ cores a helper process (``workers.Helper``, from the fork server) computes the middle two while the
training process computes the first and the last; the four are summed in their order, as ``backward`` accumulates
them, so every step, and the trained weights, are those of one process alone bit for bit
(``iterative_rlhf/tinyworld/policy.py``). A second torch thread gives this model nothing (a micro-batch is 16
sequences of a 0.35M-parameter model), so the second core idled before.

Pre-trains the default TinyWorld policy (its corpus, 1,500 steps of 64 sequences; ``--steps`` to shorten) in a
fresh process per run, the two ways interleaved (A B A B ...). With the helper, the fork server is started and
waited for first (a campaign starts it at its beginning; until the helper is up the training process computes
every micro-batch itself), and its start is printed apart. Prints each way's median seconds, the ratio, and
whether all runs' weights are equal bit for bit; ``--out`` also writes them as JSON.

    python bench/pretrain_helper.py --out bench/results/pretrain_helper_cpu.json
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

WAYS = {"alone": "0", "with a helper": "1"}


def worker(out: str, steps: int) -> None:
    """One pre-training, as a campaign's world build does it (run in its own process)."""
    import dataclasses

    from iterative_rlhf._quiet import cpu_threads

    cpu_threads()  # as the CLI: one torch thread, sleeping OpenMP threads, set before torch loads
    from iterative_rlhf import workers
    from iterative_rlhf.config import TinyWorldConfig
    from iterative_rlhf.tinyworld.policy import train_policy
    from iterative_rlhf.tinyworld.world import get_prompts
    from iterative_rlhf.tinyworld.writer import write_corpus

    cfg = TinyWorldConfig()
    if steps:
        cfg = dataclasses.replace(cfg, train_steps=steps)
    corpus = write_corpus(get_prompts("all"), cfg.corpus_size, cfg.seed, cfg.writer_correct, cfg.harmful_comply)
    start = 0.0
    if os.environ["ITERATIVE_RLHF_AT_ONCE"] == "1":  # as in a campaign: the fork server is up by then
        t0 = time.perf_counter()
        workers.at_once([("a", int), ("b", int)])
        start = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_policy(cfg, corpus, Path(out))
    print(json.dumps({"seconds": time.perf_counter() - t0, "server_start_s": start}))


def launch(setting: str, out: Path, steps: int) -> dict:
    env = {**os.environ, "ITERATIVE_RLHF_AT_ONCE": setting, "HF_HUB_OFFLINE": "1", "ITERATIVE_RLHF_NO_PROGRESS": "1"}
    for name in ("OMP_NUM_THREADS", "ITERATIVE_RLHF_THREADS"):  # the defaults decide the threads
        env.pop(name, None)
    proc = subprocess.run([sys.executable, __file__, "--worker", str(out), "--steps", str(steps)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"a training process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way, interleaved")
    ap.add_argument("--steps", type=int, default=0, help="pre-training steps (0: the default TinyWorld's)")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.steps)
        return
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    starts: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pretrain_helper.") as tmp:
        work = Path(tmp)
        for r in range(a.repeats):
            for way, setting in WAYS.items():
                run = launch(setting, work / f"{setting}-{r}", a.steps)
                times[way].append(run["seconds"])
                if setting == "1":
                    starts.append(run["server_start_s"])
                print(f"{way}: {times[way][-1]:.1f} s", flush=True)
        equal = all(same_weights(work / "0-0", work / f"{s}-{r}") for s in WAYS.values() for r in range(a.repeats))
    medians = {way: statistics.median(t) for way, t in times.items()}
    ratio = medians["alone"] / medians["with a helper"]
    print(f"\nTinyWorld policy pre-training, {os.cpu_count()} cores, medians of {a.repeats}:")
    for way, m in medians.items():
        print(f"  {way:14} {m:7.1f} s")
    print(f"  with a helper it is {ratio:.2f}x as fast; weights equal bit for bit: {equal}")
    print(f"  (before that, the fork server's start: {statistics.median(starts):.1f} s, once per process)")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"cores": os.cpu_count(), "steps": a.steps or 1500, "seconds": times,
                                           "median_s": {k: round(v, 2) for k, v in medians.items()},
                                           "server_start_s": starts,
                                           "speedup": round(ratio, 3), "same_weights": equal}, indent=2) + "\n")


if __name__ == "__main__":
    main()
