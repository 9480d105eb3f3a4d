"""Quiet the libraries' own progress bars and log spam: console.py owns console output."""

from __future__ import annotations

import logging
import os
import warnings


def cpu_threads() -> None:
    """One torch thread on CPU-only machines unless OMP_NUM_THREADS says otherwise.

    TinyWorld's models are far too small to gain from intra-op parallelism, and on
    shared cores OpenMP spin-waiting made 2 threads 3-28x slower than 1 (bench/README.md).
    """
    if "OMP_NUM_THREADS" in os.environ or os.environ.get("ITERATIVE_RLHF_THREADS") == "auto":
        return
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("ITERATIVE_RLHF_THREADS", "1")))


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    for name in ("bitsandbytes", "vllm", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")
