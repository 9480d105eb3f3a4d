"""The TinyWorld base policy: its own tokenizer, chat template and a small Llama.

A byte-level BPE tokenizer is trained on the writer's corpus; a Llama-architecture
decoder (about 0.7M parameters) is trained from scratch on it with the loss on
response tokens only. Both are saved in Hugging Face format (safetensors,
``tokenizer.json``, chat template in ``tokenizer_config.json``) so that
transformers and vLLM load them like any other chat model.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..config import TinyWorldConfig
from ..console import log, progress
from .world import Prompt

BOS, EOS, PAD, USER, ASSISTANT = "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"

# One user turn, then the assistant's reply closed by EOS. Multi-turn dialogues
# repeat the pair. ``add_generation_prompt`` opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a HF fast tokenizer with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 additional_special_tokens=[USER, ASSISTANT])
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"  # generation pads on the left
    hf.model_max_length = 128
    return hf


def render(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str | None = None) -> str:
    msgs = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)


def build_model(cfg: TinyWorldConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _encode(tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[Prompt, str]]) -> list[tuple[list[int], int]]:
    """Token ids of each rendered example and the index where the response starts."""
    out = []
    for p, r in pairs:
        head = tokenizer(render(tokenizer, p.text), add_special_tokens=False)["input_ids"]
        full = tokenizer(render(tokenizer, p.text, r), add_special_tokens=False)["input_ids"]
        out.append((full, len(head)))
    return out


MICRO_BATCHES = 4  # per pre-training batch, by length


def _pad(chunk: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) with the loss on response tokens only."""
    T = max(len(ids) for ids, _ in chunk)
    input_ids = torch.full((len(chunk), T), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(chunk), T), -100, dtype=torch.long)
    attn = torch.zeros((len(chunk), T), dtype=torch.long)
    for i, (ids, start) in enumerate(chunk):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        labels[i, start: len(ids)] = torch.tensor(ids[start:])
    return input_ids, attn, labels


def _micro_grads(model: LlamaForCausalLM, chunk: list[tuple[list[int], int]], pad: int,
                 n_tokens: int) -> list[torch.Tensor | None]:
    """The gradient of one micro-batch's share of the batch loss, a fresh tensor per parameter."""
    model.zero_grad(set_to_none=True)
    input_ids, attn, labels = _pad(chunk, pad)
    model(input_ids=input_ids, attention_mask=attn, labels=labels, num_items_in_batch=n_tokens).loss.backward()
    return [p.grad for p in model.parameters()]


def _helper_grads(model: LlamaForCausalLM, chunk: list[tuple[list[int], int]], pad: int,
                  n_tokens: int) -> tuple[list[torch.Tensor | None], None]:
    """In the helper process: one micro-batch's gradients (``workers.start_grad_helper``'s ``grads_of``)."""
    return _micro_grads(model, chunk, pad, n_tokens), None


def _start_helper(model: LlamaForCausalLM, work: int) -> tuple[Any, list[list[torch.Tensor]]] | tuple[None, None]:
    """A helper process for the middle micro-batches of each step, where workers pay (``workers.enabled``)."""
    import functools

    from ..workers import start_grad_helper

    return start_grad_helper("TinyWorld policy pre-training", model, MICRO_BATCHES, work,
                             functools.partial(LlamaForCausalLM, model.config), _helper_grads)


def _step_grads(model: LlamaForCausalLM, chunks: list, pad: int, n_tokens: int, helper: Any,
                slots: list[list[torch.Tensor]] | None) -> tuple[Any, bool]:
    """Set ``.grad`` to the batch's gradient: the micro-batches' gradients summed in order, exactly as
    ``backward`` accumulates them one after the other; with a ready ``helper``, it computes the middle ones
    while this process computes the first and the last (``workers.step_grads``). Returns the helper (None once
    it is gone) and whether it took part."""
    from ..workers import step_grads

    helper, shared, _ = step_grads(list(model.parameters()), chunks,
                                   lambda chunk: (_micro_grads(model, chunk, pad, n_tokens), None),
                                   helper, slots or [], lambda middle: (middle, pad, n_tokens), "pre-training")
    return helper, shared


def train_policy(cfg: TinyWorldConfig, pairs: list[tuple[Prompt, str]], out_dir: Path) -> LlamaForCausalLM:
    """Train the base policy on the writer's corpus and save model + tokenizer to ``out_dir``.

    On a CPU machine with 2+ cores a helper process computes half of each step's micro-batches
    (``workers.Helper``; ``ITERATIVE_RLHF_AT_ONCE=0`` turns it off): the weights are the same bit for bit.
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    texts = [p.text for p, _ in pairs] + [r for _, r in pairs]
    tokenizer = build_tokenizer(texts, cfg.vocab_size)
    model = build_model(cfg, tokenizer)
    data = _encode(tokenizer, pairs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(10, cfg.train_steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine to 10 %
        if step < warmup:
            return cfg.learning_rate * (step + 1) / warmup
        frac = (step - warmup) / max(1, cfg.train_steps - warmup)
        return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    pad = tokenizer.pad_token_id
    helper, slots = _start_helper(model, cfg.train_steps * cfg.train_batch_size)
    shared_steps = 0
    try:
        with progress("TinyWorld policy: pre-training", cfg.train_steps) as advance:
            for step in range(cfg.train_steps):
                batch = [data[rng.randrange(len(data))] for _ in range(cfg.train_batch_size)]
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                # The batch's gradient in length-sorted micro-batches, each padded to its own longest example:
                # the same mean over the batch's response tokens (num_items_in_batch), half the padded compute.
                n_tokens = sum(len(ids) - start for ids, start in batch)
                ordered = sorted(batch, key=lambda x: len(x[0]))
                size = -(-len(ordered) // MICRO_BATCHES)
                chunks = [ordered[i: i + size] for i in range(0, len(ordered), size)]
                helper, shared = _step_grads(model, chunks, pad, n_tokens, helper, slots)
                shared_steps += shared
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                advance()
    finally:
        if helper is not None:
            helper.stop()
    if shared_steps:
        log(f"TinyWorld policy: a helper process computed half the micro-batches of {shared_steps} of "
            f"{cfg.train_steps} steps")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = True
    model.generation_config.max_new_tokens = 32
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model
