"""The TinyWorld build: a real policy, tokenizer with chat template, comparisons in the canonical schema."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pytest
from conftest import helper_up

from iterative_rlhf.tinyworld.annotators import Annotator
from iterative_rlhf.tinyworld.world import find_prompt, get_prompts
from iterative_rlhf.tinyworld.writer import write_corpus

pytestmark = pytest.mark.slow


def test_policy_is_a_loadable_chat_checkpoint(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.policy)
    model = AutoModelForCausalLM.from_pretrained(world.policy)
    assert tok.chat_template and tok.eos_token == "</s>"
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s><|user|>What is 3 plus 4?\n<|assistant|>"
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    assert model(**ids).logits.shape[-1] == len(tok)
    assert (world.policy / "model.safetensors").exists()


def test_comparisons_use_the_canonical_schema(world):
    from iterative_rlhf.preferences import load_preferences

    for kind in ("helpful", "safety"):
        for split in ("train", "test"):
            ds = load_preferences(str(world.comparisons(kind, split)), format="canonical", margin_scheme="small")
            assert len(ds) > 20
            assert set(ds.column_names) >= {"prompt", "chosen", "rejected", "level", "margin", "is_safety"}
            prompts = {find_prompt(p) for p in ds["prompt"]}
            want = "eval" if split == "test" else "train"
            assert all(p is not None and p.split == want for p in prompts)
            if kind == "safety":  # safety comparisons only on harmful and borderline prompts
                assert all(p.family == "harmful" or p.borderline for p in prompts)


def test_build_is_cached_and_manifested(world, world_config):
    from iterative_rlhf.tinyworld.build import build_world, is_built

    assert is_built(world_config)
    m = json.loads(world.manifest.read_text())
    assert set(m["done"]) == {"prompts", "policy", "comparisons"}
    assert build_world(world_config) == world  # second call: the cache


def test_writer_and_annotators_are_deterministic():
    prompts = get_prompts("train")
    assert write_corpus(prompts, 50, seed=3) == write_corpus(prompts, 50, seed=3)
    import random

    p = find_prompt("What is 3 plus 4?")
    ann = Annotator("helpful", noise=1e-6, length_cost=0.0)
    chosen, rejected, level = ann.compare(p, "8", "7", random.Random(0))
    assert (chosen, rejected, level) == ("7", "8", "significantly_better")  # noiseless annotator is right
    chosen, rejected, level = ann.compare(p, "It is 7.", "7", random.Random(0))
    assert level == "negligibly_better"  # equal utility: a near-tie


def test_writer_correct_answers_are_correct_by_the_gold_judge():
    """The writer's "correct" kind must pass the judge, x + 0 included (the judge drops one of each operand)."""
    import random

    from iterative_rlhf.tinyworld.world import judge
    from iterative_rlhf.tinyworld.writer import _answer

    rng = random.Random(0)
    safe = [p for p in get_prompts("all") if p.family != "harmful"]
    wrong = [(p.text, r) for p in safe for _ in range(8) for r in [_answer(p, rng, wrong=False)]
             if not judge(p, r).gold]
    assert wrong == []
    assert _answer(find_prompt("What is 7 plus 0?"), rng, wrong=False) == "7 plus 0 is 7."


def test_annotator_noise_flips_near_ties_more_than_clear_pairs():
    import random

    p = find_prompt("What is 3 plus 4?")
    ann = Annotator("helpful", noise=0.35, length_cost=0.01)
    rng = random.Random(0)
    clear = sum(ann.compare(p, "7", "I can't help with that.", rng)[0] == "7" for _ in range(400)) / 400
    near = sum(ann.compare(p, "7", "It is 7.", rng)[0] == "7" for _ in range(400)) / 400
    assert clear > 0.9 and 0.4 < near < 0.7


def test_worlds_that_differ_only_in_annotation_share_the_trained_policy(world, world_config, monkeypatch):
    import dataclasses
    import hashlib

    from iterative_rlhf.tinyworld import build as build_mod

    def no_training(*args, **kwargs):
        raise AssertionError("the base policy was trained again")

    monkeypatch.setattr("iterative_rlhf.tinyworld.policy.train_policy", no_training)
    other = dataclasses.replace(world_config, comparisons_per_prompt=world_config.comparisons_per_prompt + 1)
    assert build_mod.world_paths(other).root != world.root
    assert build_mod.policy_store(other) == build_mod.policy_store(world_config)
    paths = build_mod.build_world(other)

    def digest(p):
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    assert digest(paths.policy) == digest(world.policy)
    rows = [json.loads(x) for x in paths.comparisons("helpful", "train").read_text().splitlines()]
    assert len(rows) > 0


def test_pretraining_micro_batches_give_the_gradient_of_the_whole_batch():
    """Length-sorted micro-batches with num_items_in_batch = the padded batch's mean loss, to float error."""
    import random

    import torch

    from iterative_rlhf.config import TinyWorldConfig
    from iterative_rlhf.tinyworld import policy as P

    cfg = replace(TinyWorldConfig(), hidden_size=32, num_heads=1, num_layers=1)
    corpus = write_corpus(get_prompts("all"), 200, seed=0)
    tok = P.build_tokenizer([p.text for p, _ in corpus] + [r for _, r in corpus], 300)
    data = P._encode(tok, corpus)
    torch.manual_seed(0)
    model = P.build_model(cfg, tok)
    batch = random.Random(0).sample(data, 16)
    pad = tok.pad_token_id

    ids, attn, labels = P._pad(batch, pad)
    model.zero_grad()
    model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
    whole = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    n = sum(len(x) - start for x, start in batch)
    ordered = sorted(batch, key=lambda x: len(x[0]))
    for chunk in (ordered[:4], ordered[4:8], ordered[8:12], ordered[12:]):
        ids, attn, labels = P._pad(chunk, pad)
        model(input_ids=ids, attention_mask=attn, labels=labels, num_items_in_batch=n).loss.backward()
    assert max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), whole)) < 1e-5
    assert ids.shape[1] == max(len(x) for x, _ in ordered[12:])  # each micro-batch pads to its own longest


def _tiny_policy():
    import torch

    from iterative_rlhf.config import TinyWorldConfig
    from iterative_rlhf.tinyworld import policy as P

    cfg = replace(TinyWorldConfig(), hidden_size=32, num_heads=1, num_layers=1, corpus_size=200, train_steps=40,
                  train_batch_size=16, vocab_size=300)
    corpus = write_corpus(get_prompts("all"), cfg.corpus_size, seed=0)
    tok = P.build_tokenizer([p.text for p, _ in corpus] + [r for _, r in corpus], cfg.vocab_size)
    torch.manual_seed(0)
    return cfg, corpus, tok, P.build_model(cfg, tok)


needs_two_cores = pytest.mark.skipif(
    "forkserver" not in __import__("multiprocessing").get_all_start_methods()
    or __import__("iterative_rlhf._quiet", fromlist=["cores"]).cores() < 2, reason="needs a fork server, 2 cores")


@needs_two_cores
def test_pretraining_helper_gives_the_gradients_of_one_process_bit_for_bit(monkeypatch):
    """The helper computes the middle micro-batches of a step; the summed gradient is exactly the one of
    ``backward`` run on every micro-batch here; once its process is killed, this process does all the work."""
    import random

    import torch

    from iterative_rlhf import console
    from iterative_rlhf.tinyworld import policy as P

    monkeypatch.delenv("ITERATIVE_RLHF_AT_ONCE", raising=False)
    _, corpus, tok, model = _tiny_policy()
    data = P._encode(tok, corpus)
    pad = tok.pad_token_id
    rng = random.Random(0)

    def chunks():
        ordered = sorted(rng.sample(data, 16), key=lambda x: len(x[0]))
        return [ordered[i: i + 4] for i in range(0, 16, 4)], sum(len(x) - s for x, s in ordered)

    def alone(parts, n):  # the old loop: backward on each micro-batch, accumulated by autograd
        model.zero_grad(set_to_none=True)
        for c in parts:
            ids, attn, labels = P._pad(c, pad)
            model(input_ids=ids, attention_mask=attn, labels=labels, num_items_in_batch=n).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    helper, slots = P._start_helper(model, 10**6)
    try:
        helper_up(helper)
        assert helper.process.pid != os.getpid()
        for _ in range(4):
            parts, n = chunks()
            expected = alone(parts, n)
            helper, shared = P._step_grads(model, parts, pad, n, helper, slots)
            assert shared
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))
            with torch.no_grad():  # the weights move between steps, as under the optimiser
                for p in model.parameters():
                    p.add_(p.grad, alpha=-0.01)
        warnings = []
        monkeypatch.setattr(console, "warn", warnings.append)
        os.kill(helper.process.pid, signal.SIGKILL)
        helper.process.join(10)
        parts, n = chunks()
        expected = alone(parts, n)
        helper, shared = P._step_grads(model, parts, pad, n, helper, slots)
        assert helper is None and not shared
        assert "goes on in this process alone" in warnings[0]
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))
    finally:
        if helper is not None:
            helper.stop()


@needs_two_cores
def test_pretraining_with_a_helper_trains_the_same_weights(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from iterative_rlhf.tinyworld import policy as P

    cfg, corpus, _, _ = _tiny_policy()
    start = P._start_helper

    def started(model, work):  # wait for the helper, so that it takes part from the first step
        helper, slots = start(model, work)
        return (helper if helper is None else helper_up(helper)), slots

    monkeypatch.setattr(P, "_start_helper", started)
    lines = []
    monkeypatch.setattr(P, "log", lines.append)
    monkeypatch.setenv("ITERATIVE_RLHF_AT_ONCE", "1")
    P.train_policy(cfg, corpus, tmp_path / "helped")
    assert lines == ["TinyWorld policy: a helper process computed half the micro-batches of 40 of 40 steps"]
    monkeypatch.setenv("ITERATIVE_RLHF_AT_ONCE", "0")
    P.train_policy(cfg, corpus, tmp_path / "alone")
    assert len(lines) == 1
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("helped", "alone"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_two_cores
def test_pretraining_goes_on_alone_when_no_helper_starts(tmp_path, monkeypatch):
    """No fork server (or no shared memory) here: a one-line warning, and the training of one process."""
    import torch
    from safetensors.torch import load_file

    from iterative_rlhf import console, workers
    from iterative_rlhf.tinyworld import policy as P

    cfg, corpus, _, _ = _tiny_policy()
    warnings = []
    monkeypatch.setattr(console, "warn", warnings.append)
    monkeypatch.setenv("ITERATIVE_RLHF_AT_ONCE", "1")

    def no_server():
        raise OSError("no UNIX sockets here")

    monkeypatch.setattr(workers, "_context", no_server)
    P.train_policy(cfg, corpus, tmp_path / "no-server")
    assert len(warnings) == 1 and "could not start a worker process (no UNIX sockets here)" in warnings[0]

    def no_shm(self):
        raise RuntimeError("unable to open shared memory object")

    monkeypatch.setattr(torch.nn.Module, "share_memory", no_shm)
    P.train_policy(cfg, corpus, tmp_path / "no-shm")
    assert len(warnings) == 2 and "no shared memory for a helper process" in warnings[1]
    monkeypatch.setenv("ITERATIVE_RLHF_AT_ONCE", "0")
    P.train_policy(cfg, corpus, tmp_path / "alone")
    assert len(warnings) == 2
    a, b, c = (load_file(tmp_path / d / "model.safetensors") for d in ("no-server", "no-shm", "alone"))
    assert all(torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]) for k in c)
