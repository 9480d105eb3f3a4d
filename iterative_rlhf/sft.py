"""Fine-tuning on the selected samples (rejection-sampling SFT), with TRL's SFTTrainer.

The dataset is in TRL's conversational prompt-completion form
(``prompt=[user turn]``, ``completion=[assistant turn]``) so the loss falls on
the response tokens only (``completion_only_loss``), rendered with the
checkpoint's own chat template. Full fine-tuning, LoRA or QLoRA; the result is
a standalone checkpoint (LoRA merged) with tokenizer and chat template.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .chat import prompt_messages
from .checkpoint import apply_lora, load_causal_lm, load_tokenizer, save_checkpoint
from .config import Recipe
from .console import log, warn
from .errors import NumericalError, UserError
from .io import atomic_write_jsonl


def sft_dataset(rows: list[dict]):  # noqa: ANN201
    """Selected samples (``prompt``, ``response``) as a prompt-completion dataset."""
    from datasets import Dataset

    if not rows:
        raise UserError("no selected samples to fine-tune on (every candidate was empty?)")
    return Dataset.from_list([
        {"prompt": prompt_messages(r["prompt"]),
         "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])


def weighted_rows(rows: list[dict], safety_weight: int) -> list[dict]:
    """Each row of a safety-tagged prompt (``is_safety``) ``safety_weight`` times, the others once, in order."""
    return [r for r in rows for _ in range(safety_weight if r.get("is_safety") else 1)]


def _nan_guard():  # noqa: ANN202
    from transformers import TrainerCallback

    class NaNGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001, ANN201
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise NumericalError(f"SFT loss became {loss} at step {state.global_step}; lower sft.learning_rate "
                                     "(the previous checkpoint is kept)")

    return NaNGuard()


def finetune(recipe: Recipe, rows: list[dict], init_path: str, out_dir: Path, seed: int) -> Path:
    """SFT ``init_path`` on ``rows`` and save a standalone checkpoint to ``out_dir`` (atomic)."""
    from trl import SFTConfig, SFTTrainer

    cfg = recipe.sft
    quantized = cfg.quant.load_in_4bit or cfg.quant.load_in_8bit
    tokenizer = load_tokenizer(init_path, recipe.model.trust_remote_code)
    tokenizer.padding_side = "right"
    model = load_causal_lm(init_path, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code,
                           quant=cfg.quant if quantized else None)
    model = apply_lora(model, cfg.lora, "CAUSAL_LM", quantized=quantized)
    if cfg.safety_weight > 1 and not any("is_safety" in r for r in rows):
        warn(f"sft.safety_weight={cfg.safety_weight}: no sample has an 'is_safety' field (selected.jsonl of "
             "`iterative-rlhf rs` has one), so no sample is repeated")
    ds = sft_dataset(weighted_rows(rows, cfg.safety_weight))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # batch_size is global: accumulation fills the rest
    accum = max(1, cfg.batch_size // (cfg.per_device_batch_size * world_size))
    work = out_dir.parent / f".{out_dir.name}.trainer"
    args = SFTConfig(
        output_dir=str(work), learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.per_device_batch_size, gradient_accumulation_steps=accum,
        max_length=cfg.max_length, completion_only_loss=True, packing=False, lr_scheduler_type="cosine",
        warmup_steps=0.03, weight_decay=0.0, logging_steps=5, save_strategy="no", report_to=recipe.campaign.report_to
        or "none", seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
        bf16=recipe.model.dtype == "bfloat16", use_cpu=not _cuda(), dataset_num_proc=None,
        # Several CPU processes (`accelerate launch` / torchrun without GPUs) talk over gloo; GPUs use nccl.
        ddp_backend="gloo" if world_size > 1 and not _cuda() else None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         callbacks=[_nan_guard()])
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # console.py owns the console
    trainer.remove_callback(ProgressCallback)
    result = trainer.train()
    log(f"SFT: {len(rows)} samples, {result.global_step} steps, train loss {result.training_loss:.3f}")
    tokenizer.padding_side = "left"
    if not trainer.is_world_process_zero():  # the main process saves; the others wait for it below
        trainer.accelerator.wait_for_everyone()
        return out_dir
    final = trainer.model
    if quantized:
        final = _merge_quantized(final, init_path, recipe, work)
    save_checkpoint(final, tokenizer, out_dir)
    atomic_write_jsonl(out_dir / "train_log.jsonl", trainer.state.log_history)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return out_dir


def _merge_quantized(peft_model, init_path: str, recipe: Recipe, work: Path):  # noqa: ANN001, ANN202
    """QLoRA: merge the adapter into full-precision base weights (merging into 4/8-bit weights would round them
    and save a bitsandbytes checkpoint that plain transformers and vLLM loads do not expect)."""
    import shutil

    from peft import PeftModel

    adapter_dir = work / "adapter"
    peft_model.save_pretrained(adapter_dir)
    base = load_causal_lm(init_path, dtype=recipe.model.dtype if recipe.model.dtype != "auto" else "float32",
                          trust_remote_code=recipe.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    shutil.rmtree(adapter_dir, ignore_errors=True)
    return merged


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
