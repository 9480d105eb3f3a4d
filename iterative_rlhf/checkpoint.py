"""Loading and saving checkpoints: validation, dtype, bitsandbytes, LoRA, merging.

Every model the project loads goes through here so that the same rules hold
everywhere: a local path must be a Hugging Face checkpoint (config.json),
``trust_remote_code`` is off unless the recipe turns it on, weights come from
safetensors, and a saved policy is a standalone checkpoint (LoRA merged) with
tokenizer and chat template that transformers and vLLM load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig, QuantConfig
from .errors import UserError
from .io import atomic_dir, check_free_space, commit_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """Check a local checkpoint folder; hub names (``org/name``) pass through to transformers."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"{path}: not a Hugging Face checkpoint (no config.json); point to a folder made by "
                            "save_pretrained or to a hub name")
        return str(p)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"{path}: no such checkpoint folder")
    return path  # a hub name: transformers fetches it (users have the hub)


def load_tokenizer(path: str, trust_remote_code: bool = False, require_chat_template: bool = True):  # noqa: ANN201
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise UserError(f"{path}: the tokenizer has no chat template; add one (tokenizer.chat_template = ...) "
                        "and save_pretrained, or start from a chat checkpoint")
    return tok


def quantization_config(quant: QuantConfig) -> Any:
    if not (quant.load_in_4bit or quant.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if quant.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                                  bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
                                  bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


def _common_kwargs(dtype: str, trust_remote_code: bool, quant: QuantConfig | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": None}
    kw["dtype"] = DTYPES.get(dtype, "auto")
    qc = quantization_config(quant) if quant is not None else None
    if qc is not None:
        kw["quantization_config"] = qc
        if torch.cuda.is_available():
            kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    return kw


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   quant: QuantConfig | None = None):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path)
    return AutoModelForCausalLM.from_pretrained(path, **_common_kwargs(dtype, trust_remote_code, quant))


def load_reward_model(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                      quant: QuantConfig | None = None):  # noqa: ANN201
    """A sequence classifier with one scalar output (the policy's LM head replaced by a regression head)."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, **_common_kwargs(dtype, trust_remote_code, quant))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def apply_lora(model, lora: LoraConfig, task_type: str, quantized: bool = False):  # noqa: ANN001, ANN201
    """Wrap ``model`` with peft LoRA adapters (after k-bit preparation for QLoRA)."""
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_trainable(model)
    cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), task_type=task_type,
                         modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
    return get_peft_model(model, cfg)


def keep_4bit_trainable(model) -> None:  # noqa: ANN001
    """Keep a 4-bit model's CPU weights in the layout that has a backward pass.

    bitsandbytes (0.50) repacks a CPU ``Linear4bit`` weight for its AVX512-BF16
    inference kernel the first time the layer runs in eval mode without
    gradients (PPO's sampling, an evaluation), and that kernel has no autograd:
    every later training step silently loses the gradient through the layer
    (the LoRA adapters below it get none). Models that train never repack.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def merged(model):  # noqa: ANN001, ANN201
    """Merge LoRA adapters into the weights (no-op for plain models)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def estimate_bytes(model) -> int:  # noqa: ANN001
    return sum(p.numel() * p.element_size() for p in model.parameters())


def save_checkpoint(model, tokenizer, out: str | Path, extra_files: dict[str, str] | None = None) -> Path:  # noqa: ANN001
    """Save a standalone checkpoint atomically (LoRA merged, safetensors, tokenizer with chat template)."""
    out = Path(out)
    model = merged(model)
    check_free_space(out.parent, int(estimate_bytes(model) * 1.2) + (1 << 20), f"the checkpoint {out}")
    tmp = atomic_dir(out)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    commit_dir(tmp, out)
    return out


def set_deploy_temperature(path: str | Path, temperature: float) -> None:
    """Write the sampling temperature a policy is deployed with into its ``generation_config.json``.

    transformers' ``generate`` and vLLM's default sampling parameters read it from
    there (Llama-2-chat ships ``do_sample: true, temperature: 0.6, top_p: 0.9``).
    The project's own sampling always passes its temperature explicitly, so this
    changes how a user's tools sample the checkpoint, never a campaign.
    """
    from transformers import GenerationConfig

    from .io import atomic_write_json

    path = Path(path)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:  # a checkpoint saved without one: start from the model's config
        from transformers import AutoConfig

        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))
    gen.do_sample = True
    gen.temperature = float(temperature)
    d = gen.to_diff_dict()
    d.pop("_from_model_config", None)  # now the checkpoint's own, not derived from config.json
    atomic_write_json(path / "generation_config.json", d)


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, for a single-file or sharded checkpoint."""
    import json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json; average only checkpoints "
                        "saved with safetensors (save_pretrained's default)")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def average_checkpoints(new: str | Path, old: str | Path, weight: float, out: str | Path) -> Path:
    """``out`` = ``weight`` x ``new`` + (1 - ``weight``) x ``old``, weight by weight (atomic).

    Both must be standalone checkpoints of one architecture (the same tensor names and shapes), as the rounds
    of a campaign are. The average is taken in float32 and stored in ``new``'s dtypes, with ``new``'s shard
    layout; integer tensors (buffers) and every other file (config, tokenizer, generation config) are
    ``new``'s. Memory: one shard's tensors at a time (the other checkpoint is read through memory maps).
    """
    from safetensors import safe_open

    new, old, out = Path(new), Path(old), Path(out)
    if not 0.0 <= weight <= 1.0:
        raise UserError(f"averaging {new} with {old}: weight {weight} is outside [0, 1]")
    new_files, old_files = _weight_files(new), _weight_files(old)
    missing = sorted(set(new_files) ^ set(old_files))
    if missing:
        raise UserError(f"averaging {new} with {old}: the checkpoints have different tensors ({len(missing)}, "
                        f"e.g. {missing[0]}); both must be one architecture")
    check_free_space(out.parent, sum(f.stat().st_size for f in set(new_files.values())) + (1 << 20),
                     f"the averaged checkpoint {out}")
    tmp = atomic_dir(out)
    for item in new.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors"):
            (tmp / item.name).write_bytes(item.read_bytes())
    try:
        with contextlib.ExitStack() as stack:
            olds = {f: stack.enter_context(safe_open(f, "pt")) for f in set(old_files.values())}
            for shard in sorted(set(new_files.values())):
                _average_shard(shard, olds, old_files, weight, tmp / shard.name, new, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, out)
    return out


def _average_shard(shard: Path, olds: dict, old_files: dict[str, Path], weight: float, dest: Path, new: Path,
                   old: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(shard, "pt") as fn:
        metadata = fn.metadata()
        for name in fn.keys():  # noqa: SIM118 (safe_open has no __iter__)
            a, b = fn.get_tensor(name), olds[old_files[name]].get_tensor(name)
            if a.shape != b.shape:
                raise UserError(f"averaging {new} with {old}: {name} has shape {tuple(a.shape)} in one and "
                                f"{tuple(b.shape)} in the other; both must be one architecture")
            if a.is_floating_point():
                a = (weight * a.float() + (1.0 - weight) * b.float()).to(a.dtype)
            tensors[name] = a.contiguous()
    save_file(tensors, dest, metadata=metadata or {"format": "pt"})
