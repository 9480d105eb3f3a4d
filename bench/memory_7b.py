"""What fits on one 80 GB GPU during PPO with a 7B model: the 7B recipes, bf16 LoRA vs 4-bit QLoRA vs full.

PPO holds the policy, the reference, the value model and two reward models at
once. This script computes, for each 7B recipe in ``recipes/`` (Llama-2-7B's
shapes; Mistral-7B's for the Zephyr and Mistral recipes) with its batch,
lengths, ``ppo.micro_batch_size`` and ``ppo.gradient_checkpointing``, the bytes
of every part as ``iterative_rlhf.ppo`` and the gated scorer load them, on one
GPU (one process), or per GPU for the full fine-tuning recipes under FSDP
(their ``campaign.accelerate_config``'s process count):

* weights: bf16; with QLoRA the linear layers in nf4 with double quantisation
  (4.127 bits per weight), and ``prepare_model_for_kbit_training`` turns the
  embeddings, norms and LM head to float32. The reference is the policy with
  its adapter disabled (no copy) under LoRA; the value model is a second
  backbone (a token classifier) with its own adapter; the two reward models are
  loaded by the scorer in ``model.dtype`` (bf16), quantised or not;
* trainable weights, gradients and AdamW's two moments: LoRA adapters are
  float32 (peft), so 16 bytes per trainable parameter; full fine-tuning keeps
  gradients and moments in the weights' dtype (bf16: 8 bytes per parameter);
* activations saved for the backward pass of one PPO update pass (policy, then
  value, each freed before the next): ``ppo.micro_batch_size`` sequences (0 =
  the process's share of ``ppo.mini_batch_size``) of
  ``model.max_prompt_length + generation.max_new_tokens`` tokens: per token and
  layer the bytes measured on small Llamas with the same layer ratios and the
  same dtypes (torch saved-tensor hooks), scaled with the hidden size; plus the
  float32 logits of the response positions (saved 4 bytes + ~10 bytes of
  transients per logit); with ``ppo.gradient_checkpointing`` each layer's bf16
  input plus one layer's activations (recomputed in the backward pass);
* sampling: vLLM's share (``generation.gpu_memory_utilization`` x the GPU),
  or with the HF engine (PPO's fallback with a quantised policy or several
  processes) the KV cache of a ``generate`` batch: ``generation.batch_size``
  sequences, at most ``HFEngine.LOGITS_BUDGET_BYTES`` of float32 step logits
  with ``ppo.rollout_logprobs=engine`` (16 sequences of 512 tokens at vocab
  32000), plus those logits (~10 bytes each: bf16, float32, log-softmax);
* the no-grad rollout forward passes read chunks of
  ``max(mini_batch_size, generation.batch_size)`` sequences: their logits.

It prints one table per configuration, the largest update micro-batch and HF
sampling batch that fit, and writes ``bench/results/memory_7b.json``. To check
the formulas, it allocates small random Llamas on the CPU (bf16, and 4-bit
with bitsandbytes + LoRA through ``iterative_rlhf.checkpoint``) and a
meta-device Llama-2-7B, and prints measured / computed ratios for parameter
bytes, AdamW state bytes and saved activations.

Command (from the repository root)::

    python bench/memory_7b.py            # ~10 s on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from iterative_rlhf.config import LoraConfig, QuantConfig, Recipe, load_recipe  # noqa: E402
from iterative_rlhf.generation import HFEngine  # noqa: E402

GIB = 1 << 30
#: An H100 80GB shows 81,559 MiB; ~1 GiB goes to the CUDA context and the allocator's reserve.
GPU_BYTES = 81_559 * (1 << 20) - GIB
#: nf4 with double quantisation: 4 bits + an 8-bit absmax per 64 weights + a float32 absmax per 256 blocks.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
NF4_CODE_BYTES = 256 * 4
#: Per logit of the response positions: float32 logits saved by logsumexp (4), plus the bf16 LM-head output,
#: the float32 copy and the gradient as transients (~10).
LOGIT_BYTES = 14


@dataclass(frozen=True)
class Shapes:
    vocab: int = 32_000
    hidden: int = 4096
    intermediate: int = 11_008
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


LLAMA2_7B = Shapes()
#: Mistral-7B (Zephyr-7B-beta, Mistral-7B-Instruct-v0.2): wider MLP, grouped-query attention with 8 KV heads.
MISTRAL_7B = Shapes(intermediate=14_336, kv_heads=8)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(s: Shapes) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder layer."""
    h, i, kv = s.hidden, s.intermediate, s.kv_dim
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def param_counts(s: Shapes, lm_head: bool) -> dict[str, int]:
    """Parameters by kind: the linear layers (quantised by bitsandbytes) and the rest (embeddings, norms, heads)."""
    linear = s.layers * sum(a * b for a, b in linear_shapes(s).values())
    other = s.vocab * s.hidden + (2 * s.layers + 1) * s.hidden  # embeddings + norms
    other += s.vocab * s.hidden if lm_head else s.hidden  # LM head, or the scalar score head
    return {"linear": linear, "other": other, "total": linear + other}


def lora_count(s: Shapes, lora: LoraConfig) -> int:
    return s.layers * sum(lora.r * (a + b) for m, (a, b) in linear_shapes(s).items() if m in lora.target_modules)


def weight_bytes(s: Shapes, lm_head: bool, mode: str) -> int:
    """Bytes of one model's frozen base weights: bf16, or QLoRA (nf4 linear layers, float32 rest)."""
    c = param_counts(s, lm_head)
    if mode == "qlora":  # + the 256-entry float32 code book of the double quantisation per layer
        return int(c["linear"] * NF4_BITS / 8) + NF4_CODE_BYTES * s.layers * len(PROJ) + 4 * c["other"]
    return 2 * c["total"]


def trainable_bytes(n: int, bytes_per_param: int) -> dict[str, int]:
    """Weights, gradients and AdamW's exp_avg + exp_avg_sq for ``n`` trainable parameters."""
    return {"weights": n * bytes_per_param, "gradients": n * bytes_per_param, "adamw": 2 * n * bytes_per_param}


# --------------------------------------------------------------------------- activations


def analytic_layer_bytes_per_token(s: Shapes, mode: str) -> float:
    """Saved-for-backward bytes per token and decoder layer (bf16 compute, memory-efficient attention).

    Each RMSNorm saves its float32 input and its bf16 output (6h); attention
    saves q, k, v and its output (8h) plus the contiguous output that o_proj
    reads (2h); the SwiGLU MLP saves gate, up, silu(gate) and their product (8i).
    peft casts the input of every LoRA layer to the adapters' float32 (4 bytes
    x the input width for each of the seven projections); with frozen norms the
    bf16 norm outputs are not saved for a weight gradient (-4h).
    """
    h, i = s.hidden, s.intermediate
    base = 22 * h + 8 * i
    if mode == "full":
        return base
    lora_inputs = 4 * sum(a for a, _ in linear_shapes(s).values())  # float32 copies of each projection's input
    return base + lora_inputs - 4 * h


def measure_layer_bytes_per_token(mode: str, hidden: int = 256, tokens: int = 64) -> float:
    """Saved-tensor bytes per token and layer of a small random Llama with Llama-2's layer ratios (CPU, bf16).

    Two depths (2 and 4 layers) difference out the embeddings and the final norm.
    ``mode``: full (all weights train), lora (bf16 base), qlora (nf4 base, bf16 compute).
    """
    per_depth = []
    for layers in (2, 4):
        model = _small_llama(layers, hidden, mode)
        exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        exclude |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, exclude: set[int] = exclude, seen: dict[int, int] = seen) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in exclude:
                seen[st.data_ptr()] = st.nbytes()
            return t

        x = torch.randint(3, 1000, (2, tokens), generator=torch.Generator().manual_seed(0))
        backbone = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            backbone(input_ids=x, use_cache=False)
        per_depth.append(sum(seen.values()) / (2 * tokens))
    return (per_depth[1] - per_depth[0]) / 2


def _small_config(layers: int, hidden: int):  # noqa: ANN202
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=int(hidden * 11_008 / 4096),
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _small_llama(layers: int, hidden: int, mode: str, lora_r: int = 16):  # noqa: ANN202
    """A random Llama built through the project's loaders (so LoRA and bitsandbytes are set up as in PPO)."""
    import tempfile

    from transformers import LlamaForCausalLM

    from iterative_rlhf.checkpoint import apply_lora, load_causal_lm

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(_small_config(layers, hidden)).to(torch.bfloat16).save_pretrained(d)
        quant = QuantConfig(load_in_4bit=True, compute_dtype="bfloat16") if mode == "qlora" else None
        model = load_causal_lm(d, dtype="bfloat16", quant=quant)
    if mode == "full":
        return model.train()
    lora = LoraConfig(enabled=True, r=lora_r, alpha=2 * lora_r, dropout=0.0, target_modules=list(PROJ))
    return apply_lora(model, lora, "CAUSAL_LM", quantized=mode == "qlora").train()


# --------------------------------------------------------------------------- validation


def validate(hidden: int = 256, layers: int = 2, lora_r: int = 16) -> dict:
    """Measured / computed for parameter bytes, AdamW state bytes and saved activations on small models."""
    s = Shapes(vocab=1000, hidden=hidden, intermediate=int(hidden * 11_008 / 4096), layers=layers,
               heads=hidden // 64, kv_heads=hidden // 64)
    lora = LoraConfig(enabled=True, r=lora_r, target_modules=list(PROJ))
    out: dict = {"small_model": {"hidden": s.hidden, "intermediate": s.intermediate, "layers": layers,
                                 "vocab": s.vocab}}
    for mode in ("lora", "qlora"):
        model = _small_llama(layers, hidden, mode, lora_r)
        frozen = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad)
        # bitsandbytes keeps the absmax of each 64-weight block (and the double quantisation's) in quant_state;
        # peft's LoRA wrapper shows its base layer's weight too: count each quant_state once
        states = {id(qs): qs for m in model.modules()
                  if (qs := getattr(getattr(m, "weight", None), "quant_state", None)) is not None}
        for qs in states.values():
            frozen += qs.absmax.numel() * qs.absmax.element_size()
            if qs.state2 is not None:
                frozen += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.state2.code.numel() * 4
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in trainable)
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        for p in trainable:
            p.grad = torch.zeros_like(p)
        opt.step()
        adam = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.dim() > 0)
        want_frozen = weight_bytes(s, True, "qlora" if mode == "qlora" else "lora")
        out[mode] = {"frozen_bytes": frozen, "frozen_bytes_computed": want_frozen,
                     "frozen_ratio": frozen / want_frozen,
                     "trainable_params": n_train, "trainable_params_computed": lora_count(s, lora),
                     "adamw_bytes": adam, "adamw_bytes_computed": trainable_bytes(lora_count(s, lora), 4)["adamw"],
                     "adamw_ratio": adam / trainable_bytes(lora_count(s, lora), 4)["adamw"],
                     "trainable_dtype": str(trainable[0].dtype)}
    # full fine-tuning in bf16: AdamW keeps its moments in the weights' dtype
    full = _small_llama(layers, hidden, "full")
    opt = torch.optim.AdamW(full.parameters(), lr=1e-4)
    for p in full.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    adam = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)
    n = param_counts(s, True)["total"]
    real = sum(p.numel() * p.element_size() for p in full.parameters())
    out["full"] = {"param_bytes": real, "param_bytes_computed": 2 * n, "param_ratio": real / (2 * n),
                   "adamw_bytes": adam, "adamw_bytes_computed": trainable_bytes(n, 2)["adamw"],
                   "adamw_ratio": adam / trainable_bytes(n, 2)["adamw"]}
    # Llama-2-7B itself on the meta device: the parameter count, exactly
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    cfg = LlamaConfig(vocab_size=32_000, hidden_size=4096, intermediate_size=11_008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, num_labels=1)
    cfg.token_classification_bias = False  # as ppo.load_value_model builds the value model
    with torch.device("meta"):
        lm, tc = LlamaForCausalLM(cfg), LlamaForTokenClassification(cfg)
    out["llama2_7b_meta"] = {
        "policy_params": sum(p.numel() for p in lm.parameters()),
        "policy_params_computed": param_counts(LLAMA2_7B, True)["total"],
        "value_params": sum(p.numel() for p in tc.parameters()),
        "value_params_computed": param_counts(LLAMA2_7B, False)["total"],
    }
    # saved activations per token and layer, measured vs the analytic formula, at two widths
    out["activations"] = {}
    for mode in ("full", "lora", "qlora"):
        rows = {}
        for h in (128, 256):
            sh = Shapes(vocab=1000, hidden=h, intermediate=int(h * 11_008 / 4096), layers=2, heads=h // 64,
                        kv_heads=h // 64)
            m = measure_layer_bytes_per_token(mode, hidden=h)
            a = analytic_layer_bytes_per_token(sh, "full" if mode == "full" else "lora")
            rows[h] = {"measured": m, "analytic": a, "ratio": m / a, "measured_per_hidden": m / h}
        out["activations"][mode] = rows
    return out


# --------------------------------------------------------------------------- the plan


def plan(recipe: Recipe, mode: str, per_hidden: dict[str, float], s: Shapes = LLAMA2_7B,
         processes: int = 1) -> dict:
    """Bytes of every part of a PPO stage for ``mode`` (full, lora, qlora) on one GPU, and what fits.

    Three phases peak separately: sampling (HF's KV cache is freed after ``generate``; vLLM keeps its share
    for the whole stage), the no-grad rollout forward passes, and the update (policy, then value).
    ``processes`` > 1 (full fine-tuning only): FSDP shards the policy's and value model's weights, gradients and
    AdamW states over the processes; the reference and the reward models stay whole on every GPU, and each
    process updates on its share of the mini-batch. Figures are per GPU.
    """
    ppo, gen = recipe.ppo, recipe.generation
    T = recipe.model.max_prompt_length + gen.max_new_tokens
    R = gen.max_new_tokens
    lora = ppo.lora if ppo.lora.enabled else LoraConfig(enabled=True, r=16, target_modules=list(PROJ))
    parts: dict[str, int] = {}
    if mode == "full":
        for name, lm_head in (("policy", True), ("value", False)):
            n = param_counts(s, lm_head)["total"]
            for k, v in trainable_bytes(n, 2).items():
                parts[f"{name} {k}"] = v // processes
        parts["reference weights"] = weight_bytes(s, True, "bf16")
        if processes > 1:  # FSDP gathers one decoder layer at a time (and prefetches the next)
            parts["FSDP gathered layers (2)"] = 2 * 2 * sum(a * b for a, b in linear_shapes(s).values())
    else:
        for name, lm_head in (("policy", True), ("value", False)):
            parts[f"{name} weights"] = weight_bytes(s, lm_head, mode)
            n = lora_count(s, lora) + (0 if lm_head else s.hidden)  # the value model's score head trains too
            for k, v in trainable_bytes(n, 4).items():
                parts[f"{name} {'LoRA weights' if k == 'weights' else k}"] = v
        parts["reference weights"] = 0  # the policy with its adapter disabled
    parts["2 reward models (bf16)"] = 2 * weight_bytes(s, False, "bf16")
    # ppo._make_engine: vLLM serves PPO in one process with an unquantised policy; else HF generate
    vllm = gen.engine == "vllm" and mode != "qlora" and processes == 1
    parts["vLLM share (whole stage)"] = int(gen.gpu_memory_utilization * (GPU_BYTES + GIB)) if vllm else 0
    static = sum(parts.values())
    free = GPU_BYTES - static
    kv_seq = T * kv_bytes_per_token(s)
    hf_batch = gen.batch_size
    step_logits = 0
    if ppo.rollout_logprobs == "engine":  # HFEngine keeps every step's float32 logits: batches are cut to a budget
        hf_batch = max(1, min(hf_batch, HFEngine.LOGITS_BUDGET_BYTES // (4 * s.vocab * R)))
        step_logits = hf_batch * R * s.vocab * 10  # bf16 logits of each step, their float32 stack, log-softmax
    sampling = 0 if vllm else hf_batch * kv_seq + step_logits  # HF generate's KV cache (+ its step logits)
    analytic = analytic_layer_bytes_per_token(s, "full" if mode == "full" else "lora") / \
        analytic_layer_bytes_per_token(LLAMA2_7B, "full" if mode == "full" else "lora")
    layer_token = per_hidden[mode] * s.hidden * analytic  # saved bytes per token and layer (measured, scaled)
    logits_seq = (R + 1) * s.vocab * LOGIT_BYTES
    act_seq = T * s.layers * layer_token + logits_seq  # one sequence through one update pass
    # gradient checkpointing per layer: the layer inputs (bf16) stay, one layer's activations are recomputed
    ckpt_seq = T * (s.layers * 2 * s.hidden + layer_token) + logits_seq
    local_mini = ppo.mini_batch_size // processes
    micro = min(ppo.micro_batch_size or local_mini, local_mini)
    per_seq = ckpt_seq if ppo.gradient_checkpointing else act_seq
    chunk = max(local_mini, gen.batch_size)
    rollout_logits = chunk * (R + 1) * s.vocab * (2 + 4 + 4)  # bf16 logits, float32 copy, / temperature
    peaks = {"sampling": static + sampling, "rollout_forward": static + rollout_logits,
             "update": static + micro * per_seq}

    def most(per_item: float) -> int:
        return max(0, int(free // per_item)) if free > 0 else 0

    hf_most = most(kv_seq + (R * s.vocab * 10 if ppo.rollout_logprobs == "engine" else 0))
    return {"mode": mode, "shapes": s.__dict__, "processes": processes, "sequence_tokens": T, "response_tokens": R,
            "mini_batch": ppo.mini_batch_size, "local_mini_batch": local_mini, "micro_batch": micro,
            "gradient_checkpointing": ppo.gradient_checkpointing, "parts": parts,
            "static": static, "free_after_static": free, "hf_sampling_kv_cache": sampling,
            "hf_sampling_batch": 0 if vllm else hf_batch, "update_activations": micro * per_seq,
            "activations_per_sequence": act_seq, "activations_per_sequence_checkpointed": ckpt_seq,
            "rollout_forward_chunk": chunk, "rollout_forward_logits": rollout_logits, "peaks": peaks,
            "peak": max(peaks.values()), "gpu_bytes": GPU_BYTES, "fits": max(peaks.values()) <= GPU_BYTES,
            "headroom": GPU_BYTES - max(peaks.values()),
            "largest_update_micro_batch": most(act_seq), "largest_update_micro_batch_checkpointed": most(ckpt_seq),
            "largest_hf_sampling_batch": None if vllm else hf_most,
            "largest_rollout_forward_chunk": most((R + 1) * s.vocab * 10)}


def kv_bytes_per_token(s: Shapes) -> int:
    return 2 * s.layers * s.kv_dim * 2  # K and V, bf16


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def configurations() -> dict[str, tuple[Recipe, str, Shapes, int, str]]:
    """Column -> (recipe, mode, shapes, processes, label): the 7B recipes as written, and two variants."""
    rec = REPO / "recipes"
    no_4bit = [f"{sec}.quant.load_in_4bit=false" for sec in ("ppo", "sft", "reward.helpful", "reward.safety")]

    def fsdp_processes(r: Recipe) -> int:
        import yaml

        return int(yaml.safe_load((REPO / r.campaign.accelerate_config).read_text())["num_processes"])

    full, mistral = load_recipe(rec / "llama2-7b-hh.yaml"), load_recipe(rec / "mistral-7b-pku.yaml")
    return {
        "qlora": (load_recipe(rec / "llama2-7b-hh-qlora.yaml"), "qlora", LLAMA2_7B, 1, "llama2 QLoRA"),
        "zephyr_qlora": (load_recipe(rec / "zephyr-7b-hh-qlora.yaml"), "qlora", MISTRAL_7B, 1, "zephyr QLoRA"),
        "lora": (load_recipe(rec / "llama2-7b-hh-qlora.yaml", no_4bit), "lora", LLAMA2_7B, 1, "bf16 LoRA vLLM"),
        "lora_hf": (load_recipe(rec / "llama2-7b-hh-qlora.yaml", [*no_4bit, "generation.engine=hf"]), "lora",
                    LLAMA2_7B, 1, "bf16 LoRA HF"),
        "full_fsdp": (full, "full", LLAMA2_7B, fsdp_processes(full), "llama2 full/8"),
        "mistral_full_fsdp": (mistral, "full", MISTRAL_7B, fsdp_processes(mistral), "mistral full/8"),
        "full": (full, "full", LLAMA2_7B, 1, "full, 1 GPU"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory_7b.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    check = validate()
    per_hidden = {m: check["activations"][m][256]["measured_per_hidden"] for m in ("full", "lora", "qlora")}
    confs = configurations()
    plans = {key: plan(r, mode, per_hidden, shapes, processes)
             for key, (r, mode, shapes, processes, _) in confs.items()}

    print(f"7B PPO per GPU ({_gib(GPU_BYTES)} GiB usable), GiB; batch, lengths, micro-batch and checkpointing of "
          f"the recipes ({plans['qlora']['mini_batch']} x {plans['qlora']['sequence_tokens']} tokens per mini-batch)",
          flush=True)
    names = list(dict.fromkeys(k for p in plans.values() for k in p["parts"]))
    labels = {k: c[4] for k, c in confs.items()}
    print(f"{'':42s}" + "".join(f"{labels[m]:>15s}" for m in plans))

    def row(label: str, values: list[str]) -> None:
        print(f"{label:42s}" + "".join(f"{v:>15s}" for v in values))

    for k in names:
        row(k, [_gib(p["parts"][k]) if p["parts"].get(k) else "-" for p in plans.values()])
    row("static total", [_gib(p["static"]) for p in plans.values()])
    row("update micro-batch (gradient checkpointing)",
        [f"{p['micro_batch']}{' (gc)' if p['gradient_checkpointing'] else ''}" for p in plans.values()])
    row("free after static", [_gib(p["free_after_static"]) for p in plans.values()])
    row("peak: sampling (HF KV cache)", [f"{_gib(p['peaks']['sampling'])}" for p in plans.values()])
    row("peak: rollout forward (logits of a chunk)",
        [f"{_gib(p['peaks']['rollout_forward'])}" for p in plans.values()])
    row("peak: update (activations of a micro-batch)", [f"{_gib(p['peaks']['update'])}" for p in plans.values()])
    row("fits (headroom)", [f"{p['fits']} ({_gib(p['headroom'])})" for p in plans.values()])
    row("activations per sequence", [_gib(p["activations_per_sequence"]) for p in plans.values()])
    row("  with gradient checkpointing", [_gib(p["activations_per_sequence_checkpointed"]) for p in plans.values()])
    row("largest update micro-batch", [str(p["largest_update_micro_batch"]) for p in plans.values()])
    row("  with gradient checkpointing", [str(p["largest_update_micro_batch_checkpointed"]) for p in plans.values()])
    row("largest HF sampling batch", ["-" if p["largest_hf_sampling_batch"] is None
                                      else str(p["largest_hf_sampling_batch"]) for p in plans.values()])
    row("largest rollout-forward chunk", [str(p["largest_rollout_forward_chunk"]) for p in plans.values()])
    print("\nvalidation on the CPU (measured / computed):")
    for mode in ("lora", "qlora"):
        v = check[mode]
        print(f"  {mode:6s} frozen weight bytes {v['frozen_ratio']:.4f}  trainable params "
              f"{v['trainable_params']}/{v['trainable_params_computed']}  AdamW bytes {v['adamw_ratio']:.4f} "
              f"({v['trainable_dtype']})")
    v = check["full"]
    print(f"  full   parameter bytes {v['param_ratio']:.4f}  AdamW bytes {v['adamw_ratio']:.4f}")
    v = check["llama2_7b_meta"]
    print(f"  Llama-2-7B on the meta device: policy {v['policy_params']:,} / {v['policy_params_computed']:,}, "
          f"value {v['value_params']:,} / {v['value_params_computed']:,} parameters")
    for mode, rows_ in check["activations"].items():
        print(f"  {mode:6s} saved activations per token and layer: " + ", ".join(
            f"h={h}: {r['measured']:.0f} B measured / {r['analytic']:.0f} B analytic = {r['ratio']:.3f}"
            for h, r in rows_.items()))
    result = {"command": "python bench/memory_7b.py", "gpu_bytes": GPU_BYTES,
              "shapes": {"llama2_7b": LLAMA2_7B.__dict__, "mistral_7b": MISTRAL_7B.__dict__},
              "columns": {k: {"label": c[4], "recipe": c[0].name, "mode": c[1], "processes": c[3]}
                          for k, c in confs.items()},
              "nf4_bits_per_weight": NF4_BITS, "logit_bytes": LOGIT_BYTES, "plans": plans, "validation": check,
              "seconds": round(time.perf_counter() - t0, 1),
              "date": time.strftime("%Y-%m-%d"), "machine": "CPU (formulas; small-model checks on the CPU)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
