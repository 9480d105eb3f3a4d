"""Quiet the libraries' own progress bars and log spam (console.py owns console output).

Also sets the CPU threads of small models (:func:`cpu_threads`, :func:`small_model_threads`,
:func:`training_threads`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: Whether workers train beside this process (``siblings``), or this process is one of them.
_SIBLINGS = False


@contextmanager
def siblings() -> Iterator[None]:
    """Inside, workers train beside this process (:mod:`iterative_rlhf.workers`)."""
    global _SIBLINGS
    before, _SIBLINGS = _SIBLINGS, True
    try:
        yield
    finally:
        _SIBLINGS = before


_WORKER = False


def become_worker() -> None:
    global _SIBLINGS, _WORKER
    _SIBLINGS = _WORKER = True


def in_worker() -> bool:
    """Whether this process is a worker of :mod:`iterative_rlhf.workers` (it starts no helper of its own)."""
    return _WORKER


def sharing_cores() -> bool:
    """Whether workers train beside this process, or this process is one of them."""
    return _SIBLINGS


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _env_threads() -> int | None:
    """``$ITERATIVE_RLHF_THREADS`` as a thread count; None when it is unset or 'auto'."""
    value = os.environ.get("ITERATIVE_RLHF_THREADS", "").strip()
    if value in ("", "auto"):
        return None
    if not value.isdigit() or int(value) < 1:
        from .errors import UserError

        raise UserError(f"ITERATIVE_RLHF_THREADS={value!r}: expected a whole number of threads above 0 or 'auto'; "
                        "unset it for the default")
    return int(value)


def cpu_threads() -> None:
    """One torch thread on CPU-only machines unless OMP_NUM_THREADS says otherwise.

    TinyWorld's models are far too small to gain from intra-op parallelism, and on
    shared cores OpenMP spin-waiting made 2 threads 3-28x slower than 1 (bench/README.md).
    """
    threads = _env_threads()  # checked first: a bad value is a one-line error
    if "OMP_NUM_THREADS" in os.environ or os.environ.get("ITERATIVE_RLHF_THREADS", "").strip() == "auto":
        return
    # Idle OpenMP threads sleep instead of spin-waiting: set before torch loads its OpenMP runtime, it lets
    # reward-model training use 2 threads (training_threads) without the collapse described above.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(threads or 1)


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


#: Below this many parameters a model's matmuls are too small to split across CPU threads.
SMALL_MODEL_PARAMS = 20_000_000


def training_threads(bf16: bool = False) -> int:
    """Torch threads for a small reward model's training steps on CPU: 2 where it pays, else 1.

    A reward-model step (64 sequences) is big enough for 2 threads: 1.2x faster than 1 on an idle 2-core
    machine, with bit-identical weights, and within 10 % of 1 when another process holds the other core, as
    long as idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``, which :func:`cpu_threads` sets). With
    spin-waiting threads it was 14x slower than 1 under contention, so without that policy it stays 1
    (``bench/rm_threads.py``).
    Under bf16 autocast (``reward.<kind>.mixed_precision=bf16``) it is 1: the bf16 step's smaller products
    do not pay for a second thread (1.52x float32's speed on 1 thread, 1.25x on 2: ``bench/rm_precision.py``).
    ``ITERATIVE_RLHF_THREADS`` overrides it. RMs trained at once in several processes
    (:mod:`iterative_rlhf.workers`) keep it: the thread count can change a small model's last bits.
    """
    threads = _env_threads()
    if threads:
        return threads
    if bf16:
        return 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        return 1
    return max(1, min(2, cores()))


def reset_mixed_precision() -> None:
    """Forget a trainer's mixed precision once its stage is over.

    accelerate keeps it in a process-wide ``AcceleratorState``: after an RM trained under bf16 autocast, a plain
    ``Accelerator()`` later in the same process (PPO's) inherited ``bf16`` and ran the policy's and the value
    model's forward passes under autocast too (slower on a CPU, and not what ``ppo.mixed_precision`` said).
    The process group (``PartialState``) stays.
    """
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != "no":
        AcceleratorState._reset_state(reset_partial_state=False)


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 matrix products natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (where a small RM's training step under bf16 autocast ran 1.5x faster than in float32;
    elsewhere the CPU emulates bf16 and is slower)."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


@contextmanager
def small_model_threads(model, device=None, threads: int = 1) -> Iterator[None]:  # noqa: ANN001
    """``threads`` torch threads (default one) while a small model runs on CPU (unless OMP_NUM_THREADS is set).

    A TinyWorld-sized model's matmuls are too small to split: extra intra-op
    threads only spin-wait, and on a shared 2-core machine a training step was
    measured 10-40x slower with 2 threads than with 1 (0.1 s vs 1-4 s for 64
    sequences of 40 tokens). Large models and GPUs are left alone.
    """
    import torch

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS
    if dev.type != "cpu" or not small or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' and datasets' own tqdm bars (weights loading, map/filter): console.py owns output."""
    import datasets.utils.logging as ds_logging
    import transformers.utils.logging as tf_logging

    tf_on, ds_on = tf_logging.is_progress_bar_enabled(), ds_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if tf_on:
            tf_logging.enable_progress_bar()
        if ds_on:
            ds_logging.enable_progress_bar()
