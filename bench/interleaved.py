"""Shared by the benches that time one setting of ``ITERATIVE_RLHF_AT_ONCE`` against another, each run in a fresh
process, the two ways interleaved (A B A B ...): ``rm_at_once.py``, ``pretrain_helper.py``; ``rm_helper.py`` uses
``launch``, and ``same_weights`` is also ``rm_threads.py``'s. Not a benchmark itself."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def server_start() -> float:
    """Where the way is "at once" (``ITERATIVE_RLHF_AT_ONCE=1``): start the workers' fork server and wait for it,
    as a campaign starts it at its beginning; its seconds (0 otherwise)."""
    if os.environ["ITERATIVE_RLHF_AT_ONCE"] != "1":
        return 0.0
    from iterative_rlhf.workers import at_once

    t0 = time.perf_counter()
    at_once([("a", int), ("b", int)])
    return time.perf_counter() - t0


def launch(script: str, setting: str, out: Path, *args: str) -> dict:
    """Run ``script --worker OUT ARGS`` with ``ITERATIVE_RLHF_AT_ONCE=setting``; the JSON its last line prints."""
    env = {**os.environ, "ITERATIVE_RLHF_AT_ONCE": setting, "HF_HUB_OFFLINE": "1", "ITERATIVE_RLHF_NO_PROGRESS": "1"}
    for name in ("OMP_NUM_THREADS", "ITERATIVE_RLHF_THREADS"):  # the defaults decide the threads
        env.pop(name, None)
    proc = subprocess.run([sys.executable, script, "--worker", str(out), *args], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"a training process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleave(script: str, ways: dict[str, str], repeats: int, work: Path,
               *args: str) -> tuple[dict[str, list[float]], list[float]]:
    """Each way (name: setting) ``repeats`` times, interleaved, into ``work/SETTING-R``; the seconds per way and
    the fork server's starts."""
    times: dict[str, list[float]] = {way: [] for way in ways}
    starts: list[float] = []
    for r in range(repeats):
        for way, setting in ways.items():
            run = launch(script, setting, work / f"{setting}-{r}", *args)
            times[way].append(run["seconds"])
            if setting == "1":
                starts.append(run["server_start_s"])
            print(f"{way}: {times[way][-1]:.1f} s", flush=True)
    return times, starts


def summary(title: str, times: dict[str, list[float]], starts: list[float], equal: bool, out: str,
            extra: dict | None = None) -> None:
    """Print each way's median, the first way's over the second's, and whether the weights are equal; ``out``:
    also write them as JSON (with ``extra``)."""
    medians = {way: statistics.median(t) for way, t in times.items()}
    slow, fast = medians
    ratio = medians[slow] / medians[fast]
    print(f"\n{title}, {os.cpu_count()} cores, medians of {len(times[slow])}:")
    for way, m in medians.items():
        print(f"  {way:22} {m:7.1f} s")
    print(f"  {fast}: {ratio:.2f}x as fast; weights equal bit for bit: {equal}")
    print(f"  (before that, the fork server's start: {statistics.median(starts):.1f} s, once per process)")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"cores": os.cpu_count(), **(extra or {}), "seconds": times,
                                         "median_s": {k: round(v, 2) for k, v in medians.items()},
                                         "server_start_s": starts,
                                         "speedup": round(ratio, 3), "same_weights": equal}, indent=2) + "\n")


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints' weights (``model.safetensors``) are equal bit for bit."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
