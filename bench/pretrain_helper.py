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
import tempfile
import time
from pathlib import Path

from interleaved import interleave, same_weights, server_start, summary

WAYS = {"alone": "0", "with a helper": "1"}


def worker(out: str, steps: int) -> None:
    """One pre-training, as a campaign's world build does it (run in its own process)."""
    import dataclasses

    from iterative_rlhf._quiet import cpu_threads

    cpu_threads()  # as the CLI: one torch thread, sleeping OpenMP threads, set before torch loads
    from iterative_rlhf.config import TinyWorldConfig
    from iterative_rlhf.tinyworld.policy import train_policy
    from iterative_rlhf.tinyworld.world import get_prompts
    from iterative_rlhf.tinyworld.writer import write_corpus

    cfg = TinyWorldConfig()
    if steps:
        cfg = dataclasses.replace(cfg, train_steps=steps)
    corpus = write_corpus(get_prompts("all"), cfg.corpus_size, cfg.seed, cfg.writer_correct, cfg.harmful_comply)
    start = server_start()  # as in a campaign: the fork server is up by then
    t0 = time.perf_counter()
    train_policy(cfg, corpus, Path(out))
    print(json.dumps({"seconds": time.perf_counter() - t0, "server_start_s": start}))


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
    with tempfile.TemporaryDirectory(prefix="pretrain_helper.") as tmp:
        work = Path(tmp)
        times, starts = interleave(__file__, WAYS, a.repeats, work, "--steps", str(a.steps))
        equal = all(same_weights(work / "0-0", work / f"{s}-{r}") for s in WAYS.values() for r in range(a.repeats))
    summary("TinyWorld policy pre-training", times, starts, equal, a.out, {"steps": a.steps or 1500})


if __name__ == "__main__":
    main()
