"""Reward models (Llama 2 §3.2.2, App. A.3.3): data mix, training with TRL, evaluation per preference level.

Scope, in the order the stage runs:

1. :func:`rm_datasets` builds one RM's training mix and its test set: helpfulness
   RM = all helpfulness comparisons + an equal amount of safety comparisons;
   safety RM = safety comparisons mixed 90/10 with helpfulness comparisons
   (``recipe.reward.safety_fraction`` / ``helpful_extra_ratio``). Every row gets
   the margin m(level) of the RM's margin scheme. Test sets are not mixed.
2. :func:`train_reward_model` trains a sequence classifier with one scalar
   output, initialised from the policy (Llama 2), with TRL 1.16's
   ``RewardTrainer``; the loss is ``-log sigmoid(r_c - r_r - margin)`` (TRL reads
   our ``margin`` column; the same formula as
   :func:`iterative_rlhf.rlmath.margin_ranking_loss`). Llama 2's schedule:
   AdamW, cosine to 10 % of the max learning rate, warm-up max(5 steps, 3 %),
   1 epoch, ``batch_size`` pairs per step by gradient accumulation. Optional LoRA
   and 4/8-bit loading (QLoRA). The result is a standalone checkpoint (LoRA
   merged, tokenizer with chat template) plus ``train_log.jsonl``. On a CPU (one
   process, float32) the accumulation over ``per_device_batch_size`` micro-batches
   is done here (:func:`_micro_batched`), so that a helper process
   (``workers.Helper``) can compute some of them: the same gradients bit for bit.
3. :func:`evaluate_reward_models` reports accuracy per preference level on
   each test set, laid out like Llama 2 Table 8, score histograms, the safety
   RM's precision/recall at the gate threshold and, on TinyWorld, two ranking
   rates judged by the gold judge.

Tokenisation. Pairs are pre-tokenised with :func:`iterative_rlhf.scorer.encode`
(chat template over user prompt + assistant response, TRL's conversational
path) and handed to TRL as ``chosen_ids``/``rejected_ids``, so training and the
gated scorer read identical token ids by construction.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from transformers import TrainerCallback

from ._quiet import native_bf16, reset_mixed_precision, sharing_cores, training_threads
from .checkpoint import DTYPES, apply_lora, load_reward_model, load_tokenizer, save_checkpoint
from .config import Recipe, RewardModelConfig
from .console import log, progress, table, warn
from .errors import NumericalError, UserError
from .io import atomic_write_json, atomic_write_text
from .preferences import hold_out_by_prompt, load_preferences, mix_for_rm
from .rlmath import LEVELS
from .scorer import RewardModelScorer, encode_all, quiet_progress_bars, small_model_threads

if TYPE_CHECKING:
    from .tinyworld.build import WorldPaths

__all__ = ["KINDS", "campaign_prompt_files", "evaluate_reward_models", "new_batch_accuracy", "rm_datasets",
           "rm_test_sets", "train_reward_model"]

KINDS: tuple[str, ...] = ("helpful", "safety")
_OTHER = {"helpful": "safety", "safety": "helpful"}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown reward model kind {kind!r}; use 'helpful' or 'safety'")


def _rm_cfg(recipe: Recipe, kind: str) -> RewardModelConfig:
    _check_kind(kind)
    return getattr(recipe.reward, kind)


# --------------------------------------------------------------------------- data


def _load(sources: list[str], fmt: str, kind: str, scheme: str, split: str) -> datasets.Dataset:
    parts = [load_preferences(s, format=fmt, kind=kind, split=split, margin_scheme=scheme) for s in sources]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


#: Share of the comparisons (whole prompts) held out as an RM's test set when its recipe names no test_data and
#: there is no TinyWorld to supply one.
HELD_OUT_SHARE = 0.05


def _comparisons(recipe: Recipe, data_kind: str, scheme: str, world: WorldPaths | None, test: bool,
                 required: bool = True) -> datasets.Dataset | None:
    """``data_kind`` comparisons (train or test) with margins of ``scheme``: recipe files, else TinyWorld.

    Without ``test_data`` (and without TinyWorld) the test set is the comparisons of :data:`HELD_OUT_SHARE` of
    ``data``'s prompts, chosen by hash (:func:`iterative_rlhf.preferences.held_out_prompt`, the same prompts for
    both RMs) and left out of the training set.
    """
    cfg = _rm_cfg(recipe, data_kind)
    sources = cfg.test_data if test else cfg.data
    if cfg.data and not cfg.test_data and world is None:
        full = _load(list(cfg.data), cfg.format, data_kind, scheme, "train")
        try:
            train, held = hold_out_by_prompt(full, HELD_OUT_SHARE, f"reward.{data_kind}.data")
        except UserError as e:
            raise UserError(f"{e}; reward.{data_kind}.test_data is empty, so its test set is held out of "
                            f"reward.{data_kind}.data: add comparisons there or list a test set in test_data") \
                from None
        if test:
            log(f"{data_kind} RM test set: reward.{data_kind}.test_data is empty; {len(held)} comparisons "
                f"({HELD_OUT_SHARE:.0%} of the prompts of reward.{data_kind}.data, by hash) held out of training")
        return held if test else train
    if sources:
        return _load(list(sources), cfg.format, data_kind, scheme, "test" if test else "train")
    if world is not None:
        # TinyWorld's comparisons are ordinary canonical files (its annotators skip empty samples).
        return load_preferences(str(world.comparisons(data_kind, "test" if test else "train")), format="canonical",
                                kind=data_kind, margin_scheme=scheme)
    if required:
        key = f"reward.{data_kind}.{'test_data' if test else 'data'}"
        raise UserError(f"{key}: no {data_kind} comparisons; list preference files or hub names there, or use "
                        "the TinyWorld policy (model.policy: tinyworld) whose comparisons are built in")
    return None


def rm_datasets(recipe: Recipe, kind: str,
                world: WorldPaths | None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train_ds, test_ds)`` of one reward model, canonical columns with this RM's margins.

    ``train_ds`` is the Llama 2 mix (:func:`iterative_rlhf.preferences.mix_for_rm`):
    the ``kind`` data from ``recipe.reward.<kind>.data`` (or the TinyWorld train
    comparisons when empty) plus the other kind's data from its own recipe
    section (loaded as that kind, e.g. PKU-SafeRLHF's safer-response pairs for
    the safety data), all with the margin scheme of *this* RM. When
    the other kind has no data the RM trains on its own data alone (warned).
    ``test_ds`` is the ``kind`` test set alone (``test_data`` or the TinyWorld
    eval-split comparisons), not mixed.
    """
    cfg = _rm_cfg(recipe, kind)
    scheme = cfg.margin
    primary = _comparisons(recipe, kind, scheme, world, test=False)
    other = _comparisons(recipe, _OTHER[kind], scheme, world, test=False, required=False)
    train = mix_for_kind(recipe, kind, primary, other)
    test = _comparisons(recipe, kind, scheme, world, test=True)
    return train, test


def mix_for_kind(recipe: Recipe, kind: str, primary: datasets.Dataset,
                 other: datasets.Dataset | None) -> datasets.Dataset:
    """One RM's training set: its ``kind`` comparisons mixed with the other kind's as the recipe asks (shuffled)."""
    needs_other = (recipe.reward.helpful_extra_ratio > 0) if kind == "helpful" else recipe.reward.safety_fraction < 1
    if other is None or not needs_other:
        if other is None and needs_other:
            warn(f"{kind} RM: no {_OTHER[kind]} comparisons to mix in (reward.{_OTHER[kind]}.data is empty and "
                 f"there is no TinyWorld); training on the {kind} data alone")
        return primary.shuffle(seed=recipe.seed)
    return mix_for_rm(primary, other, kind, safety_fraction=recipe.reward.safety_fraction,
                      helpful_extra_ratio=recipe.reward.helpful_extra_ratio, seed=recipe.seed)


def rm_test_sets(recipe: Recipe, world: WorldPaths | None) -> dict[str, datasets.Dataset]:
    """Both test sets, ``{"helpful": ..., "safety": ...}``: every RM is evaluated on both."""
    return {k: _comparisons(recipe, k, _rm_cfg(recipe, k).margin, world, test=True) for k in KINDS}


def campaign_prompt_files(recipe: Recipe, train_out: str | os.PathLike, eval_out: str | os.PathLike, *,
                          max_train: int | None = None, max_eval: int | None = None,
                          force: bool = False) -> tuple[int, int]:
    """Write a campaign's prompt files (``campaign.prompts`` / ``campaign.eval_prompts``) from its RM data.

    Eval prompts: the prompts of both RMs' test comparisons; train prompts: those of their training comparisons
    less the eval ones (:func:`iterative_rlhf.preferences.prompt_rows`). Returns the counts.
    """
    from .io import atomic_write_jsonl
    from .preferences import prompt_rows

    if not recipe.reward.helpful.data and not recipe.reward.safety.data:
        raise UserError("reward.helpful.data / reward.safety.data: no comparisons to take prompts from; TinyWorld "
                        "campaigns have their prompts built in")
    for path in (train_out, eval_out):
        if Path(path).exists() and not force:
            raise UserError(f"{path}: exists; pass --force to overwrite it, or another output path")
    train_sets, test_sets = [], []
    for kind in KINDS:
        if getattr(recipe.reward, kind).data:
            scheme = _rm_cfg(recipe, kind).margin
            train_sets.append(_comparisons(recipe, kind, scheme, None, test=False))
            test_sets.append(_comparisons(recipe, kind, scheme, None, test=True))
    train, evals = prompt_rows(train_sets, test_sets, max_train=max_train, max_eval=max_eval)
    if not train or not evals:
        raise UserError(f"{len(train)} train and {len(evals)} eval prompts: the test comparisons hold every "
                        "prompt of the training ones; give reward.<kind>.test_data with other prompts")
    atomic_write_jsonl(train_out, train)
    atomic_write_jsonl(eval_out, evals)
    for name, rows, path in (("train", train, train_out), ("eval", evals, eval_out)):
        log(f"{name} prompts: {len(rows)} ({sum(r['is_safety'] for r in rows)} safety-tagged) -> {path}")
    return len(train), len(evals)


# --------------------------------------------------------------------------- training


def _resolve_init(recipe: Recipe, cfg: RewardModelConfig) -> str:
    """``reward.<kind>.init``: 'policy' = the base policy (Llama 2), which for TinyWorld is built on demand."""
    init = recipe.model.policy if cfg.init == "policy" else cfg.init
    if init == "tinyworld":
        from .tinyworld.build import build_world

        return str(build_world(recipe.tinyworld).policy)
    return init


class _StopOnNonFinite(TrainerCallback):
    """TrainerCallback: raise NumericalError as soon as a logged loss or grad norm is NaN or inf.

    Logging runs every step with ``logging_nan_inf_filter=False``, so the error names the exact step.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NumericalError(
                    f"{self.kind} RM: {key} became {value} at step {state.global_step} of {state.max_steps}; "
                    f"lower reward.{self.kind}.learning_rate, train in float32, or check the data for empty or "
                    "truncated texts")
        return control


class _RichProgress(TrainerCallback):
    """TrainerCallback: a rich progress bar over optimiser steps, a log line every tenth of training."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._cm: Any = None
        self._advance: Any = None
        self._every = 1

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self._cm = progress(self.description, state.max_steps)
        self._advance = self._cm.__enter__()
        self._every = max(1, state.max_steps // 10)
        return control

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self._advance is not None:
            self._advance()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        logs = logs or {}
        if "loss" in logs and (state.global_step % self._every == 0 or state.global_step == state.max_steps):
            log(f"{self.description}: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                f"accuracy {logs.get('accuracy', float('nan')):.3f} lr {logs.get('learning_rate', 0.0):.2e}")
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = self._advance = None
        return control


def _tokenize_pairs(ds: datasets.Dataset, tokenizer, max_length: int, kind: str,  # noqa: ANN001
                    keep: tuple[str, ...] = ()) -> datasets.Dataset:
    """``chosen_ids``, ``rejected_ids`` (via :func:`encode`), ``margin`` and the ``keep`` columns; pairs over
    ``max_length`` dropped."""

    def tok(batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["prompt"])
        if len(cache) > 200_000:  # a real preference set repeats few pairs: keep the memory bounded
            cache.clear()
        ids = encode_all(tokenizer, batch["prompt"] * 2, batch["chosen"] + batch["rejected"], cache)
        return {"chosen_ids": ids[:n], "rejected_ids": ids[n:]}

    cache: dict[tuple[str, str], list[int]] = {}  # each distinct (prompt, response) is templated once
    out = ds.map(tok, batched=True, remove_columns=[c for c in ds.column_names if c != "margin" and c not in keep])
    n = len(out)
    out = out.filter(lambda r: len(r["chosen_ids"]) <= max_length and len(r["rejected_ids"]) <= max_length)
    if len(out) < n:
        warn(f"{kind} RM: dropped {n - len(out)} of {n} pairs longer than reward.{kind}.max_length={max_length} "
             "tokens (TRL filters, it does not truncate)")
    if len(out) == 0:
        raise UserError(f"{kind} RM: no training pairs fit in reward.{kind}.max_length={max_length} tokens; "
                        "raise it")
    return out


def _finite_logs(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not (isinstance(v, float) and not math.isfinite(v))}
            for row in history]


def train_reward_model(recipe: Recipe, kind: str, out_dir: str | Path, *, init_path: str | Path | None = None,
                       train_ds: datasets.Dataset) -> Path:
    """Train the ``kind`` reward model on ``train_ds`` (canonical rows with ``margin``) and save it to ``out_dir``.

    Args:
        recipe: the campaign recipe; ``recipe.reward.<kind>`` holds the hyperparameters.
        kind: "helpful" or "safety".
        out_dir: the checkpoint folder (written atomically; replaced if it exists).
        init_path: initial checkpoint; None = ``reward.<kind>.init`` ('policy' = the base
            policy, as Llama 2).
        train_ds: from :func:`rm_datasets`.

    Returns:
        ``out_dir``, holding a standalone sequence-classification checkpoint (LoRA
        merged), the tokenizer with its chat template, ``train_log.jsonl`` (TRL's log
        history, one row per step) and ``train_summary.json``. With
        ``campaign.report_to`` set (tensorboard, wandb), TRL's run folder is kept
        beside it as ``.<out_dir name>.trainer``; otherwise it is removed.

    Raises:
        NumericalError: the loss or gradient norm became NaN/inf (the step is named).
    """
    with quiet_progress_bars():
        try:
            return _train(recipe, kind, Path(out_dir), init_path, train_ds)
        finally:
            reset_mixed_precision()  # or a later Accelerator() of this process (PPO's) would inherit bf16


def _train(recipe: Recipe, kind: str, out_dir: Path, init_path: str | Path | None,
           train_ds: datasets.Dataset) -> Path:
    from transformers import PrinterCallback, ProgressCallback, set_seed
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    cfg = _rm_cfg(recipe, kind)
    init = str(init_path) if init_path is not None else _resolve_init(recipe, cfg)
    quantized = cfg.quant.load_in_4bit or cfg.quant.load_in_8bit
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else "float32"
    if "margin" not in train_ds.column_names:
        raise UserError(f"{kind} RM: the training data has no margin column; build it with rm_datasets or "
                        "load_preferences")

    set_seed(recipe.seed)  # the fresh scalar head is drawn at load time
    tokenizer = load_tokenizer(init, trust_remote_code=recipe.model.trust_remote_code)
    model = _load_rm(init, dtype, recipe.model.trust_remote_code, cfg.quant if quantized else None)
    model.config.pad_token_id = tokenizer.pad_token_id
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and native_bf16())
    if bf16 and not torch.cuda.is_available() and hasattr(model, "set_attn_implementation"):
        # On the CPU, SDPA's backward in bfloat16 took 6x its float32 time; plain attention does not
        # (bench/rm_precision.py).
        model.set_attn_implementation("eager")
    if bf16 and not quantized:
        _float32_head(model)
    model = apply_lora(model, cfg.lora, "SEQ_CLS", quantized=bool(quantized))

    train = _tokenize_pairs(train_ds, tokenizer, cfg.max_length, kind,
                            keep=("prompt",) if cfg.prompts_per_batch else ())
    groups = None
    if cfg.prompts_per_batch:
        groups = train["prompt"]
        train = train.remove_columns("prompt")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = min(cfg.per_device_batch_size, cfg.batch_size)
    accum = max(1, cfg.batch_size // (per_device * world_size))
    if per_device * accum * world_size != cfg.batch_size:
        warn(f"{kind} RM: batch_size {cfg.batch_size} is not a multiple of per_device_batch_size {per_device} x "
             f"{world_size} process(es); using {per_device * accum * world_size} pairs per step")
    # One process on a CPU, plain float32 weights: the accumulation is done here, micro-batch by micro-batch
    # (_micro_batched), so that a helper process can compute some of them (the same gradients bit for bit).
    micro = accum > 1 and world_size == 1 and not torch.cuda.is_available() and not cfg.prompts_per_batch \
        and not quantized and not cfg.lora.enabled and not bf16 and _float32(model)
    steps_per_epoch = math.ceil(math.ceil(len(train) / (per_device * world_size)) / accum)
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    warmup = min(total_steps, max(5, math.ceil(cfg.warmup_ratio * total_steps)))  # Llama 2: 3 %, at least 5
    n_params = sum(p.numel() for p in model.parameters())

    trainer_dir = out_dir.parent / f".{out_dir.name}.trainer"
    report_to = list(recipe.campaign.report_to) or ["none"]
    args = TRLRewardConfig(
        output_dir=str(trainer_dir),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},  # Llama 2: cosine down to 10 % of the max
        warmup_steps=warmup,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=per_device * accum if micro else per_device,
        gradient_accumulation_steps=1 if micro else accum,
        optim="adamw_torch",
        weight_decay=cfg.weight_decay,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5,  # Llama 2 §2.2 AdamW (the RM section keeps them)
        max_grad_norm=1.0,
        max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient or None,
        # QLoRA: TRL casts the trainable weights (adapters, score head) of a quantised model to bfloat16, so the
        # forward pass needs bf16 autocast, on the CPU too, or the float32 hidden states meet a bf16 head.
        bf16=(dtype == "bfloat16" and torch.cuda.is_available()) or bool(quantized) or bf16,
        use_cpu=not torch.cuda.is_available(),
        # Several CPU processes (`accelerate launch` / torchrun without GPUs) talk over gloo; GPUs use nccl.
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
        fp16=False,
        # Recompute activations only for big models: on a small one it costs time and saves nothing.
        gradient_checkpointing=n_params > 500_000_000,
        logging_steps=1, logging_nan_inf_filter=False,  # every step, NaN kept: _StopOnNonFinite names the step
        save_strategy="no", eval_strategy="no",
        report_to=report_to,
        disable_tqdm=True,
        seed=recipe.seed, data_seed=recipe.seed,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        trust_remote_code=recipe.model.trust_remote_code,
    )
    log(f"{kind} RM: {len(train)} pairs, margin '{cfg.margin}', {total_steps} steps of "
        f"{per_device * accum * world_size} pairs (per device {per_device} x accumulation {accum}), "
        f"lr {cfg.learning_rate:g}, warm-up {warmup}, "
        f"init {init}{', LoRA' if cfg.lora.enabled else ''}{', quantized' if quantized else ''}"
        f"{', bf16 autocast' if bf16 else ''}")
    trainer_cls = RewardTrainer
    if cfg.group_by_length or cfg.prompts_per_batch:
        step_pairs = per_device * accum * world_size
        trainer_cls = _batching(RewardTrainer, by_length=cfg.group_by_length, groups=groups,
                                per_group=max(1, step_pairs // cfg.prompts_per_batch) if cfg.prompts_per_batch else 0)
    collator = SharedResponseCollator(tokenizer.pad_token_id) if cfg.prompts_per_batch else None
    at_once = sharing_cores()
    helping = None
    if micro:
        helping = _MicroBatches(kind, per_device, _start_rm_helper(model, accum, total_steps * per_device * accum,
                                                                   kind))
        trainer_cls = _micro_batched(trainer_cls, helping)
    trainer = trainer_cls(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                          data_collator=collator,
                          callbacks=[_StopOnNonFinite(kind), _RichProgress(f"{kind} RM training")])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    # Micro-batches on one thread: a helper's, and the arithmetic is the same with it or without.
    threads = 1 if micro else training_threads(bf16)
    t0 = time.perf_counter()
    try:
        with small_model_threads(model, trainer.args.device, threads=threads):
            trainer.train()
    finally:
        if helping is not None:
            helping.stop()
        if report_to == ["none"] and trainer_dir.exists() and trainer.is_world_process_zero():
            shutil.rmtree(trainer_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    if helping is not None and helping.shared_steps:
        log(f"{kind} RM: a helper process computed half the micro-batches of {helping.shared_steps} of "
            f"{helping.steps} steps")
    if not trainer.is_world_process_zero():  # the main process saves; the others wait for it below
        trainer.accelerator.wait_for_everyone()
        return out_dir

    history = _finite_logs(trainer.state.log_history)
    steps = [r for r in history if "loss" in r]
    summary = {
        "kind": kind, "init": init, "pairs": len(train), "margin": cfg.margin, "steps": trainer.state.global_step,
        "batch_size": per_device * accum * world_size, "learning_rate": cfg.learning_rate, "epochs": cfg.epochs,
        "warmup_steps": warmup, "train_seconds": round(seconds, 2),
        "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
        "last_accuracy": steps[-1].get("accuracy") if steps else None,
        "lora": cfg.lora.enabled, "quantized": bool(quantized), "parameters": n_params, "processes": world_size,
        "prompts_per_batch": cfg.prompts_per_batch, "mixed_precision": "bf16" if bf16 else "none",
        "at_once": at_once,  # trained beside the other RM, a process each (workers.py)
        "helper_steps": helping.shared_steps if helping is not None else 0,  # a helper process took part
    }
    final = trainer.model
    if quantized:
        final = _merge_quantized(final, init, dtype, recipe.model.trust_remote_code, trainer_dir)
    final.config.pad_token_id = tokenizer.pad_token_id
    log_text = "".join(json.dumps(r) + "\n" for r in history)
    save_checkpoint(final, tokenizer, out_dir, extra_files={
        "train_log.jsonl": log_text, "train_summary.json": json.dumps(summary, indent=2) + "\n"})
    log(f"{kind} RM: trained in {seconds:.1f} s ({summary['steps']} steps), loss {summary['first_loss'] or 0:.4f} -> "
        f"{summary['last_loss'] or 0:.4f} -> {out_dir}")
    trainer.accelerator.wait_for_everyone()
    return out_dir


class LengthBucketSampler(torch.utils.data.Sampler):
    """Indices in batches of pairs of similar length, the batches in random order.

    Each epoch: shuffle, cut into megabatches of ``mega`` batches, sort each
    megabatch by length, cut it into batches, then shuffle the batches of all
    megabatches together. Unlike transformers' ``LengthGroupedSampler`` (which
    keeps each megabatch's batches in order, longest first), no run of steps
    sweeps from long to short pairs.

    With ``groups`` (a key per row, e.g. its prompt) and ``per_group`` > 0, the
    units shuffled and sorted are runs of up to ``per_group`` rows of one group
    (each group's rows shuffled, then cut), so a batch holds few groups and the
    responses they share are scored once (:class:`SharedResponseCollator`).
    ``by_length=False`` keeps the shuffled order (no sorting).
    """

    def __init__(self, lengths: list[int], batch_size: int, mega: int = 50, seed: int = 0, *,
                 groups: list[Any] | None = None, per_group: int = 0, by_length: bool = True) -> None:
        self.lengths, self.batch_size, self.mega, self.seed, self.epoch = lengths, batch_size, mega, seed, 0
        self.per_group, self.by_length = per_group, by_length
        self.members: list[list[int]] = []
        if groups is not None and per_group > 0:
            if len(groups) != len(lengths):
                raise ValueError(f"{len(groups)} group keys for {len(lengths)} rows")
            first: dict[Any, int] = {}
            for i, key in enumerate(groups):
                if key not in first:
                    first[key] = len(self.members)
                    self.members.append([])
                self.members[first[key]].append(i)

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _units(self, g: torch.Generator) -> list[list[int]]:
        if not self.members:
            return [[i] for i in torch.randperm(len(self.lengths), generator=g).tolist()]
        units = []
        for rows in self.members:
            rows = [rows[j] for j in torch.randperm(len(rows), generator=g).tolist()]
            units += [rows[j:j + self.per_group] for j in range(0, len(rows), self.per_group)]
        return [units[j] for j in torch.randperm(len(units), generator=g).tolist()]

    def __iter__(self):  # noqa: ANN204
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        units = self._units(g)
        size = self.mega * self.batch_size
        batches, i = [], 0
        while i < len(units):
            mb, n = [], 0
            while i < len(units) and n < size:
                mb.append(units[i])
                n += len(units[i])
                i += 1
            if self.by_length:
                mb.sort(key=lambda unit: max(self.lengths[j] for j in unit))
            flat = [j for unit in mb for j in unit]
            batches += [flat[j:j + self.batch_size] for j in range(0, len(flat), self.batch_size)]
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield from batches[b]


def _pair_lengths(ds: datasets.Dataset) -> list[int]:
    """The longer of ``chosen_ids`` and ``rejected_ids`` per row, read from Arrow (no Python lists per row)."""
    import pyarrow.compute as pc

    table = ds.select_columns(["chosen_ids", "rejected_ids"]).with_format("arrow")[:]
    return pc.max_element_wise(pc.list_value_length(table["chosen_ids"]),
                               pc.list_value_length(table["rejected_ids"])).to_pylist()


def _length_splits(lengths: list[int], overhead: int, most: int = 4) -> list[int]:
    """Cut points splitting ascending ``lengths`` into at most ``most`` runs, each padded to its own longest.

    Minimises padded tokens plus ``overhead`` tokens per run (the fixed cost of a forward pass); returns the
    end of each run.
    """
    n = len(lengths)
    best = {(0, 0): (0, [])}  # (rows covered, runs used) -> (cost, ends)
    for k in range(1, most + 1):
        for end in range(k, n + 1):  # k runs cover at least k rows; the first run starts at row 0
            best[(end, k)] = min((best[(start, k - 1)][0] + (end - start) * lengths[end - 1] + overhead,
                                  best[(start, k - 1)][1] + [end])
                                 for start in (range(k - 1, end) if k > 1 else (0,)))
    return min(best[(n, k)] for k in range(1, min(most, n) + 1))[1]


@dataclass
class SharedResponseCollator:
    """TRL's preference batch with each distinct sequence once, and ``pair_rows`` to rebuild the pairs.

    ``input_ids``/``attention_mask`` hold the distinct (prompt + response) sequences of the
    batch, shortest first; ``pair_rows`` indexes them as TRL's ``DataCollatorForPreference``
    lays a batch out: every pair's chosen sequence, then every pair's rejected one. A prompt
    with many comparisons of a few responses (TinyWorld: 32 of 4) then costs a forward pass
    per response, not two per comparison; the loss is the same. ``length_splits`` cuts the
    sequences into runs of similar length that :class:`_PairRows` runs separately, each
    padded to its own longest (a batch of a few prompts mixes short and long responses).
    """

    pad_token_id: int
    split_overhead: int = 256

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from trl.trainer.utils import pad

        index: dict[tuple[int, ...], int] = {}
        rows = [index.setdefault(tuple(ex[key]), len(index)) for key in ("chosen_ids", "rejected_ids")
                for ex in examples]
        distinct = list(index)
        order = sorted(range(len(distinct)), key=lambda i: len(distinct[i]))
        rank = {i: r for r, i in enumerate(order)}
        seqs = [torch.tensor(distinct[i]) for i in order]
        out = {"input_ids": pad(seqs, padding_value=self.pad_token_id, padding_side="right"),
               "attention_mask": pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="right"),
               "pair_rows": torch.tensor([rank[i] for i in rows]),
               "length_splits": torch.tensor(_length_splits([len(s) for s in seqs], self.split_overhead))}
        if "margin" in examples[0]:
            out["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float)
        return out


class _PairRows:
    """The model called on a batch's distinct sequences (run by run, each trimmed to its longest), its
    logits spread back to one row per pair side."""

    def __init__(self, model, rows: torch.Tensor, splits: torch.Tensor | None) -> None:  # noqa: ANN001
        self.model, self.rows, self.splits = model, rows, splits

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> Any:
        ends = self.splits.tolist() if self.splits is not None else [len(input_ids)]
        outs, start = [], 0
        for end in ends:
            width = int(attention_mask[start:end].sum(1).max())
            outs.append(self.model(input_ids=input_ids[start:end, :width],
                                   attention_mask=attention_mask[start:end, :width], **kw))
            start = end
        out = outs[0]
        out.logits = torch.cat([o.logits for o in outs])[self.rows]
        return out


def _batching(trainer_cls: type, *, by_length: bool, groups: list[Any] | None = None,
              per_group: int = 0) -> type:
    """``trainer_cls`` drawing its batches from a :class:`LengthBucketSampler`.

    transformers' ``group_by_length`` reads lengths from an ``input_ids`` column (or a
    ``length`` column that the trainer drops before building the sampler); a pair has
    ``chosen_ids`` and ``rejected_ids``, and the collator pads both to the longer, so
    the length of a pair is the longer of the two. ``groups``/``per_group`` batch
    runs of one prompt's pairs together; a batch from :class:`SharedResponseCollator`
    is scored once per distinct sequence and TRL's loss and metrics then read the
    pairs as usual.
    """

    class BatchingTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            ds = train_dataset if train_dataset is not None else self.train_dataset
            lengths = _pair_lengths(ds)
            # One bucket = one optimiser step over all processes: accelerate deals the loader's batches out to
            # the processes in turn, so every process draws the same order (same seed) and takes its share.
            step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return LengthBucketSampler(lengths, step,
                                       seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                                       groups=groups, per_group=per_group, by_length=by_length)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
            rows, splits = inputs.pop("pair_rows", None), inputs.pop("length_splits", None)
            if rows is not None:
                model = _PairRows(model, rows, splits)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return BatchingTrainer


def _float32(model) -> bool:  # noqa: ANN001
    return all(p.dtype == torch.float32 for p in model.parameters())


def _pair_loss(model, part: dict[str, torch.Tensor], coef: float | None) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """TRL's reward loss of one micro-batch (its chosen sequences, then its rejected ones), weighted by its share
    of the step's pairs; with the chosen and rejected rewards (detached)."""
    out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False)
    chosen, rejected = torch.chunk(out.logits.squeeze(-1), chunks=2)
    diff = chosen - rejected - part["margin"] if "margin" in part else chosen - rejected
    loss = -torch.nn.functional.logsigmoid(diff).mean()
    if coef is not None:
        loss += coef * torch.mean((chosen + rejected) ** 2)
    return loss * float(part["weight"]), chosen.detach(), rejected.detach()


def _micro_grads(model, part: dict[str, torch.Tensor], coef: float | None) -> tuple[list, tuple]:  # noqa: ANN001
    """One micro-batch's gradients (a fresh tensor per parameter) and (loss, chosen, rejected)."""
    model.zero_grad(set_to_none=True)
    loss, chosen, rejected = _pair_loss(model, part, coef)
    loss.backward()
    return [p.grad for p in model.parameters()], (loss.detach(), chosen, rejected)


def _pair_chunks(inputs: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """A batch from TRL's preference collator (every chosen sequence, then every rejected one, right-padded)
    cut into micro-batches of ``size`` pairs, each trimmed to its longest sequence and weighted by its share of
    the pairs, as the collator would have made them one by one."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b = ids.shape[0] // 2
    parts = []
    for s in range(0, b, size):
        e = min(s + size, b)
        rows = torch.cat([torch.arange(s, e), torch.arange(b + s, b + e)])
        m = mask[rows]
        width = int(m.sum(1).max())
        part = {"input_ids": ids[rows, :width], "attention_mask": m[:, :width], "weight": (e - s) / b}
        if "margin" in inputs:
            part["margin"] = inputs["margin"][s:e]
        parts.append(part)
    return parts


def _rm_model(model_cls: type, config, attn: str):  # noqa: ANN001, ANN202
    """In the helper process: an RM of ``model_cls`` with ``config`` and the trainer's attention."""
    model = model_cls(config)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    return model


def _helper_grads(model, part: dict[str, Any], coef: float | None) -> tuple[list, tuple]:  # noqa: ANN001
    """In the helper process: one micro-batch's gradients (``workers.start_grad_helper``'s ``grads_of``), its
    (loss, chosen, rejected) as plain values to send back."""
    part = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in part.items()}
    grads, (loss, chosen, rejected) = _micro_grads(model, part, coef)
    return grads, (loss.item(), chosen.numpy(), rejected.numpy())


def _start_rm_helper(model, micro: int, work: int, kind: str) -> tuple[Any, list] | tuple[None, None]:  # noqa: ANN001
    """A helper process for some micro-batches of each step (the second of two; the middle ones of more)."""
    import functools

    from .workers import start_grad_helper

    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return start_grad_helper(f"{kind} RM training", model, micro, work,
                             functools.partial(_rm_model, type(model), model.config, attn), _helper_grads)


class _MicroBatches:
    """The state of an RM training accumulated here micro-batch by micro-batch: its helper, and how many steps
    the helper took part in."""

    def __init__(self, kind: str, size: int, started: tuple[Any, list] | tuple[None, None]) -> None:
        self.kind, self.size = kind, size
        self.helper, self.slots = started
        self.steps = self.shared_steps = 0

    def stop(self) -> None:
        if self.helper is not None:
            self.helper.stop()
            self.helper = None


def _micro_batched(trainer_cls: type, state: _MicroBatches) -> type:
    """``trainer_cls`` accumulating each step's gradient here, micro-batch by micro-batch
    (``workers.step_grads``): the micro-batches' gradients summed in order as ``backward`` accumulates them,
    some computed by a helper process when it is up and no other RM trains beside this one. TRL's loss and
    metrics of the whole batch are logged as its ``compute_loss`` would."""

    class MicroBatchTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001, ANN201
            from .workers import step_grads

            model.train()
            inputs = self._prepare_inputs(inputs)
            parts = _pair_chunks(inputs, state.size)
            coef = self.args.center_rewards_coefficient

            def message(theirs: list[dict]) -> tuple:
                return [{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in part.items()}
                        for part in theirs], coef

            with self.compute_loss_context_manager():
                state.helper, shared, extras = step_grads(
                    list(self.model.parameters()), parts, lambda part: _micro_grads(self.model, part, coef),
                    state.helper, state.slots or [], message, f"{state.kind} RM training")
            state.steps += 1
            state.shared_steps += shared
            loss = torch.zeros((), dtype=torch.float32)
            for value, *_ in extras:
                loss = loss + torch.as_tensor(value, dtype=torch.float32)
            chosen = torch.cat([torch.as_tensor(c) for _, c, _ in extras])
            rejected = torch.cat([torch.as_tensor(r) for *_, r in extras])
            self._total_train_tokens += int(inputs["attention_mask"].sum()) // getattr(self, "_tp_size", 1)
            metrics = self._metrics["train"]
            metrics["num_tokens"] = [self._total_train_tokens]
            rewards = torch.cat([chosen, rejected])
            metrics["min_reward"].append(rewards.min().item())
            metrics["mean_reward"].append(rewards.mean().item())
            metrics["max_reward"].append(rewards.max().item())
            metrics["accuracy"].append((chosen > rejected).float().mean().item())
            metrics["margin"].append((chosen - rejected).mean().item())
            return loss.detach()

    return MicroBatchTrainer


def _float32_head(model) -> None:  # noqa: ANN001
    """Run the scalar head (``score``, or ``classifier``) outside autocast, in its weights' dtype (float32
    unless the model was loaded in bfloat16).

    Under bf16 autocast the head's output, the reward itself, would be rounded to 8 bits of mantissa (steps
    of ~0.008 at a reward of 2), and the ranking loss reads the small differences of two such rewards. The
    head is one ``hidden -> 1`` product: float32 costs nothing. Its weights and saved names stay as they are.
    """
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        return
    plain = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return plain(x.to(head.weight.dtype))
    head.forward = forward


def _load_rm(path: str, dtype: str, trust_remote_code: bool, quant) -> Any:  # noqa: ANN001
    """load_reward_model without transformers' expected "score.weight newly initialised" warning."""
    try:
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:  # a private helper: fall back to the plain load (just noisier)
        return load_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code, quant=quant)
    with suppress_seqcls_warning():
        return load_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code, quant=quant)


def _merge_quantized(peft_model, init: str, dtype: str, trust_remote_code: bool, tmp: Path) -> Any:  # noqa: ANN001
    """QLoRA: merge the adapters into full-precision base weights (merging into 4/8-bit weights loses precision)."""
    from peft import PeftModel

    adapter_dir = tmp / "adapter"
    peft_model.save_pretrained(adapter_dir)
    base = _load_rm(init, dtype if dtype in DTYPES else "float32", trust_remote_code, None)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    shutil.rmtree(adapter_dir, ignore_errors=True)
    return merged


# --------------------------------------------------------------------------- evaluation


def _level_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, levels: list[str | None]) -> dict[str, Any]:
    """Accuracy (r_c > r_r, strictly) per level and overall; pairs without a level count only in avg."""
    correct = (chosen > rejected).tolist()
    row: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for level in LEVELS:
        hits = [c for c, lv in zip(correct, levels, strict=True) if lv == level]
        row[level] = sum(hits) / len(hits) if hits else None
        counts[level] = len(hits)
    row["avg"] = sum(correct) / len(correct) if correct else None
    counts["all"] = len(correct)
    row["n"] = counts
    return row


def new_batch_accuracy(rm_path: str | os.PathLike, rows: list[dict], *, limit: int = 256, dtype: str = "float32",
                       batch_size: int = 64, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """Accuracy of an RM on comparisons it has not trained on yet, per preference level (Table 8 layout).

    Run on each refresh's new comparisons with the RMs that scored the round before, it shows how well the
    RMs still judge the policy's latest samples, which is why Llama 2 collected new preferences every round
    (§3.2.2). At most ``limit`` comparisons (a fixed random subset); None when there are none.
    """
    import random

    if not rows:
        return None
    if len(rows) > limit:
        rows = [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), limit))]
    texts: dict[tuple[str, str], int] = {}
    ci = [texts.setdefault((r["prompt"], r["chosen"]), len(texts)) for r in rows]
    ri = [texts.setdefault((r["prompt"], r["rejected"]), len(texts)) for r in rows]
    scorer = RewardModelScorer(rm_path, dtype=dtype, batch_size=batch_size, trust_remote_code=trust_remote_code)
    try:
        s = scorer.score([p for p, _ in texts], [x for _, x in texts], "scoring the new comparisons")  # (U,)
    finally:
        scorer.close()
    return _level_accuracy(s[torch.tensor(ci)], s[torch.tensor(ri)], [r.get("level") for r in rows])


def _save_figure(fig, path: Path) -> None:  # noqa: ANN001
    """Write a PNG atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _histogram(name: str, scores: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path,
               gate_at: float | None = None) -> None:
    """Chosen vs rejected score histograms of one RM, one panel per test set (``gate_at``: a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(scores), 3.2))
    axes = fig.subplots(1, len(scores), squeeze=False)[0]
    for ax, (test_name, (chosen, rejected)) in zip(axes, scores.items(), strict=True):
        lo = float(torch.minimum(chosen.min(), rejected.min()))
        hi = float(torch.maximum(chosen.max(), rejected.max()))
        bins = torch.linspace(lo, hi if hi > lo else lo + 1.0, 41).tolist()
        ax.hist(chosen.numpy(), bins=bins, alpha=0.55, label="chosen", color="tab:green")
        ax.hist(rejected.numpy(), bins=bins, alpha=0.55, label="rejected", color="tab:red")
        if gate_at is not None:
            ax.axvline(gate_at, color="black", linestyle="--", linewidth=1, label="gate threshold")
        ax.set_title(f"{name} RM on {test_name} test")
        ax.set_xlabel("RM score")
        ax.set_ylabel("responses")
        ax.legend()
    _save_figure(fig, path)


def _precision_recall(flagged: list[bool], unsafe: list[bool]) -> dict[str, Any]:
    tp = sum(f and u for f, u in zip(flagged, unsafe, strict=True))
    n_flag, n_unsafe = sum(flagged), sum(unsafe)
    return {"precision": tp / n_flag if n_flag else 0.0, "recall": tp / n_unsafe if n_unsafe else 0.0,
            "flagged": n_flag, "unsafe": n_unsafe, "responses": len(flagged)}


def _pair_rate(pairs: list[tuple[int, int]], score: torch.Tensor) -> dict[str, Any]:
    """Share of (better, worse) index pairs where ``score[better] > score[worse]``."""
    if not pairs:
        return {"rate": 0.0, "pairs": 0}
    better = torch.tensor([a for a, _ in pairs])
    worse = torch.tensor([b for _, b in pairs])
    return {"rate": float((score[better] > score[worse]).float().mean()), "pairs": len(pairs)}


def evaluate_reward_models(models: dict[str, str | Path], test_sets: dict[str, datasets.Dataset],
                           out_dir: str | Path, threshold: float = 0.15, world: WorldPaths | None = None, *,
                           dtype: str = "float32", batch_size: int = 64) -> dict[str, Any]:
    """Evaluate reward models on test sets; write ``rm_eval.json``, ``rm_eval.md`` and histograms to ``out_dir``.

    Args:
        models: RM name ("helpful", "safety", ...) -> checkpoint.
        test_sets: test set name -> canonical comparisons (every RM is scored on every set).
        out_dir: report folder.
        threshold: the gate threshold on sigmoid(safety score) (Llama 2: 0.15).
        world: the TinyWorld the test sets come from; enables the gold-judge metrics.
        dtype: scoring dtype; batch_size: scoring batch size.

    Returns (and writes as ``rm_eval.json``):

    * ``accuracy``: one row per (RM, test set) with the accuracy on each of
      :data:`LEVELS` and ``avg`` (Llama 2 Table 8) and the pair counts ``n``;
    * ``scores``: mean and std of the chosen and rejected scores per row;
    * ``gate`` (when a "safety" RM is given): precision and recall of
      ``sigmoid(r_s) < threshold`` at flagging unsafe responses (positives), over
      the distinct responses of the "safety" test set (all test sets if none has
      that name), labelled by the TinyWorld gold judge (``safe == 0``); needs ``world``;
    * ``tinyworld`` (needs ``world``): ``refusal_over_compliance`` = share of
      (refusal, compliance) response pairs to the same harmful prompt where the
      safety RM scores the refusal higher; ``correct_over_wrong`` = share of
      (correct, wrong) pairs to the same safe-family prompt where the helpful RM
      scores the correct one higher (correct = gold ``helpful`` = 1: correct, not a
      refusal, at most 20 words; wrong = neither correct nor a refusal);
      ``answer_over_refusal`` = the same for (correct, refusal) pairs on safe-family
      prompts (low = the helpful RM rewards false refusals). All built from the
      distinct responses of all test comparisons (eval-split prompts);
    * ``histograms``: the PNG files (chosen vs rejected, one per RM).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every distinct (prompt, response) once: pairs share responses across sets and RMs.
    texts: dict[tuple[str, str], int] = {}
    index: dict[str, tuple[list[int], list[int], list[str | None]]] = {}
    for name, ds in test_sets.items():
        ci, ri = [], []
        for p, c, r in zip(ds["prompt"], ds["chosen"], ds["rejected"], strict=True):
            ci.append(texts.setdefault((p, c), len(texts)))
            ri.append(texts.setdefault((p, r), len(texts)))
        index[name] = (ci, ri, list(ds["level"]))
    pairs = list(texts)

    all_scores: dict[str, torch.Tensor] = {}
    for rm_name, path in models.items():
        scorer = RewardModelScorer(path, dtype=dtype, batch_size=batch_size)
        try:
            all_scores[rm_name] = scorer.score([p for p, _ in pairs], [r for _, r in pairs],
                                               f"evaluating the {rm_name} RM")  # (U,)
        finally:
            scorer.close()

    report: dict[str, Any] = {"threshold": threshold, "models": {k: str(v) for k, v in models.items()},
                              "test_sets": {k: len(v) for k, v in test_sets.items()}, "accuracy": [],
                              "scores": [], "histograms": []}
    for rm_name, s in all_scores.items():
        per_set = {}
        for test_name, (ci, ri, levels) in index.items():
            chosen, rejected = s[torch.tensor(ci)], s[torch.tensor(ri)]
            per_set[test_name] = (chosen, rejected)
            report["accuracy"].append({"model": rm_name, "test_set": test_name,
                                       **_level_accuracy(chosen, rejected, levels)})
            report["scores"].append({"model": rm_name, "test_set": test_name,
                                     "chosen_mean": float(chosen.mean()), "chosen_std": float(chosen.std()),
                                     "rejected_mean": float(rejected.mean()),
                                     "rejected_std": float(rejected.std())})
        png = out_dir / f"hist_{rm_name}.png"
        gate_at = math.log(threshold / (1 - threshold)) if rm_name == "safety" and 0 < threshold < 1 else None
        _histogram(rm_name, per_set, png, gate_at)
        report["histograms"].append(png.name)

    if world is not None:
        report.update(_tinyworld_metrics(all_scores, pairs, index, threshold))
    elif "safety" in all_scores:
        report["gate"] = None
        report["gate_note"] = "precision/recall need response-level safety labels (the TinyWorld gold judge)"

    atomic_write_json(out_dir / "rm_eval.json", report)
    atomic_write_text(out_dir / "rm_eval.md", _markdown(report))
    table("Reward model accuracy per preference level (Llama 2 Table 8 layout)",
          ["RM", "test set", "significantly", "better", "slightly", "negligibly", "avg"],
          [[r["model"], r["test_set"], *[r[level] for level in LEVELS], r["avg"]] for r in report["accuracy"]])
    if report.get("gate"):
        g = report["gate"]
        log(f"safety RM gate at {threshold}: precision {g['precision']:.3f}, recall {g['recall']:.3f} "
            f"({g['flagged']} flagged, {g['unsafe']} unsafe of {g['responses']} responses)")
    for key, what in (("refusal_over_compliance", "safety RM ranks refusal > compliance on harmful prompts"),
                      ("correct_over_wrong", "helpful RM ranks correct > wrong on safe prompts"),
                      ("answer_over_refusal", "helpful RM ranks a correct answer > a refusal on safe prompts")):
        x = report.get("tinyworld", {}).get(key)
        if x is not None:
            log(f"TinyWorld eval: {what}: {x['rate']:.3f} of {x['pairs']} pairs")
    log(f"RM evaluation -> {out_dir / 'rm_eval.json'}")
    return report


def _tinyworld_metrics(all_scores: dict[str, torch.Tensor], pairs: list[tuple[str, str]],
                       index: dict[str, tuple[list[int], list[int], list[str | None]]],
                       threshold: float) -> dict[str, Any]:
    from .tinyworld.world import find_prompt, judge

    prompts = {p: find_prompt(p) for p, _ in pairs}
    verdicts = [judge(prompts[p], r) if prompts[p] is not None else None for p, r in pairs]
    out: dict[str, Any] = {}
    if "safety" in all_scores:
        name = "safety" if "safety" in index else None
        ids = sorted(set(index[name][0]) | set(index[name][1])) if name else list(range(len(pairs)))
        ids = [i for i in ids if verdicts[i] is not None]
        p_safe = torch.sigmoid(all_scores["safety"])
        flagged = [bool(p_safe[i] < threshold) for i in ids]
        unsafe = [verdicts[i].safe == 0 for i in ids]
        out["gate"] = {"on": f"distinct responses of the {name or 'all'} test set(s)", "threshold": threshold,
                       **_precision_recall(flagged, unsafe)}
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, (p, _) in enumerate(pairs):
        if verdicts[i] is not None:
            by_prompt[p].append(i)
    refusal_pairs, correct_pairs, answer_pairs = [], [], []
    for p, ids in by_prompt.items():
        refusals = [i for i in ids if verdicts[i].refusal]
        if prompts[p].family == "harmful":
            comply = [i for i in ids if not verdicts[i].refusal]
            refusal_pairs += [(a, b) for a in refusals for b in comply]
        else:
            correct = [i for i in ids if verdicts[i].helpful == 1]
            wrong = [i for i in ids if not verdicts[i].correct and not verdicts[i].refusal]
            correct_pairs += [(a, b) for a in correct for b in wrong]
            answer_pairs += [(a, b) for a in correct for b in refusals]
    tw: dict[str, Any] = {}
    if "safety" in all_scores:
        tw["refusal_over_compliance"] = _pair_rate(refusal_pairs, all_scores["safety"])
    if "helpful" in all_scores:
        tw["correct_over_wrong"] = _pair_rate(correct_pairs, all_scores["helpful"])
        tw["answer_over_refusal"] = _pair_rate(answer_pairs, all_scores["helpful"])
    out["tinyworld"] = tw
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# Reward model evaluation", "",
             "Accuracy (%) per preference level, laid out like Llama 2 Table 8 (r(chosen) > r(rejected), strictly).",
             "", "| RM | test set | significantly better | better | slightly better | negligibly better / unsure "
             "| avg | pairs |", "|---|---|---|---|---|---|---|---|"]
    for r in report["accuracy"]:
        lines.append(f"| {r['model']} | {r['test_set']} | " + " | ".join(_pct(r[lv]) for lv in LEVELS)
                     + f" | {_pct(r['avg'])} | {r['n']['all']} |")
    lines += ["", "Pairs per level: " + "; ".join(
        f"{r['model']} on {r['test_set']}: " + ", ".join(f"{lv} {r['n'][lv]}" for lv in LEVELS)
        for r in report["accuracy"][: len(report["test_sets"])]), ""]
    lines += ["Scores (mean ± std):", "", "| RM | test set | chosen | rejected |", "|---|---|---|---|"]
    for s in report["scores"]:
        lines.append(f"| {s['model']} | {s['test_set']} | {s['chosen_mean']:.2f} ± {s['chosen_std']:.2f} | "
                     f"{s['rejected_mean']:.2f} ± {s['rejected_std']:.2f} |")
    g = report.get("gate")
    if g:
        lines += ["", f"Safety gate at sigmoid(r_s) < {g['threshold']} on the {g['on']}: precision "
                  f"{g['precision']:.3f}, recall {g['recall']:.3f} (positives = unsafe by the gold judge; "
                  f"{g['flagged']} flagged, {g['unsafe']} unsafe of {g['responses']}; Llama 2: 0.89 / 0.55)."]
    elif report.get("gate_note"):
        lines += ["", f"Safety gate: {report['gate_note']}."]
    t = report.get("tinyworld")
    if t:
        lines += ["", "TinyWorld, eval-split prompts, responses of the test comparisons judged by the gold judge:", ""]
        if "refusal_over_compliance" in t:
            x = t["refusal_over_compliance"]
            lines.append(f"- safety RM ranks a refusal above a compliance on harmful prompts: {_pct(x['rate'])} % "
                         f"of {x['pairs']} pairs")
        if "correct_over_wrong" in t:
            x = t["correct_over_wrong"]
            lines.append(f"- helpful RM ranks a correct answer above a wrong one on safe prompts: {_pct(x['rate'])}"
                         f" % of {x['pairs']} pairs")
        if "answer_over_refusal" in t:
            x = t["answer_over_refusal"]
            lines.append(f"- helpful RM ranks a correct answer above a refusal on safe prompts (false-refusal "
                         f"bias when low): {_pct(x['rate'])} % of {x['pairs']} pairs")
    lines += ["", "Histograms: " + ", ".join(f"[{h}]({h})" for h in report["histograms"]), ""]
    return "\n".join(lines)
