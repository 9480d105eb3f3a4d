"""Reward models: TRL sees our tokens and margins (fast), and both RMs really learn on TinyWorld (slow)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from iterative_rlhf.config import load_recipe
from iterative_rlhf.rlmath import LEVELS, margin_ranking_loss
from iterative_rlhf.scorer import encode

#: TinyWorld reward-model settings the slow test trains with (the values proposed for recipes/tinyworld.yaml;
#: Llama 2's 7B values, lr 1e-5 and 512 pairs per step, barely move a 0.3M-parameter model in one epoch).
TINYWORLD_RM = [
    f"reward.{kind}.{key}={value}"
    for kind in ("helpful", "safety")
    for key, value in (("learning_rate", 1e-3), ("batch_size", 32), ("per_device_batch_size", 32),
                       ("epochs", 2), ("max_length", 128))
]

PAIRS = [
    ("What is 2 plus 3?", "5", "I cannot help with that.", "significantly_better", 1.0),
    ("What is the capital of France?", "Paris", "Rome is a city", "better", 2 / 3),
    ("How do I build a bomb?", "I cannot help with that.", "Sure, to build a bomb you", "slightly_better", 1 / 3),
    ("Say the opposite of hot.", "cold", "cold cold", "negligibly_better", 0.0),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama reward model and the TinyWorld-style tokenizer, saved together."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from iterative_rlhf.tinyworld.policy import build_tokenizer
    from iterative_rlhf.tinyworld.world import get_prompts

    path = tmp_path_factory.mktemp("tiny_rm")
    tok = build_tokenizer([p.text for p in get_prompts()] + [x for row in PAIRS for x in row[1:3]], 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.mul_(10.0)  # spread the scores so the margin visibly changes the loss
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def _trainer(model, tok, train, tmp_path):
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", per_device_train_batch_size=4,
                        bf16=False, gradient_checkpointing=False, max_length=128, disable_tqdm=True,
                        dataloader_pin_memory=False)
    return RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok)


def test_encode_matches_trl_conversational_preprocessing(tiny, tmp_path):
    """What the scorer feeds the RM is token for token what TRL trains on for conversational rows."""
    _, model, tok = tiny
    conv = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}]} for p, c, r, _, _ in PAIRS])
    trainer = _trainer(model, tok, conv, tmp_path)
    prepared = trainer.train_dataset
    for row, (p, c, r, _, _) in zip(prepared, PAIRS, strict=True):
        assert row["chosen_ids"] == encode(tok, p, c)
        assert row["rejected_ids"] == encode(tok, p, r)
    assert encode(tok, "hi", "yo")[0] == tok.bos_token_id and encode(tok, "hi", "yo")[-1] == tok.eos_token_id


def test_margin_column_reaches_trl_loss(tiny, tmp_path):
    """Our pre-tokenised rows keep ``margin`` through TRL's column filter, and TRL's loss is margin_ranking_loss."""
    from iterative_rlhf.reward import _tokenize_pairs

    _, model, tok = tiny
    canonical = datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r, "level": lv, "margin": m,
                                             "source": "t", "is_safety": False} for p, c, r, lv, m in PAIRS])
    train = _tokenize_pairs(canonical, tok, 128, "helpful")
    assert set(train.column_names) == {"chosen_ids", "rejected_ids", "margin"}
    trainer = _trainer(model, tok, train, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "margin" in batch
    model.eval()
    with torch.no_grad():
        loss_trl = trainer.compute_loss(model, dict(batch))
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        chosen, rejected = scores.chunk(2)  # (B,), (B,): TRL stacks chosen then rejected
        loss_ours, _ = margin_ranking_loss(chosen, rejected, batch["margin"])
        no_margin = {k: v for k, v in batch.items() if k != "margin"}
        loss_trl_plain = trainer.compute_loss(model, no_margin)
    torch.testing.assert_close(loss_trl, loss_ours)
    torch.testing.assert_close(loss_trl_plain, margin_ranking_loss(chosen, rejected)[0])
    assert sorted(batch["margin"].tolist()) == pytest.approx(sorted(m for *_, m in PAIRS))
    assert abs(float(loss_trl) - float(loss_trl_plain)) > 1e-3


def test_nan_loss_stops_training_naming_the_step():
    from transformers import TrainerControl, TrainerState

    from iterative_rlhf.errors import NumericalError
    from iterative_rlhf.reward import _StopOnNonFinite

    state = TrainerState(global_step=7, max_steps=20)
    cb = _StopOnNonFinite("safety")
    cb.on_log(None, state, TrainerControl(), logs={"loss": 0.5, "grad_norm": 1.0})
    with pytest.raises(NumericalError, match=r"safety RM: loss became nan at step 7 of 20"):
        cb.on_log(None, state, TrainerControl(), logs={"loss": float("nan")})
    with pytest.raises(NumericalError, match=r"grad_norm became inf"):
        cb.on_log(None, state, TrainerControl(), logs={"loss": 0.5, "grad_norm": float("inf")})


def test_train_with_lora_saves_a_merged_standalone_checkpoint(tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from iterative_rlhf.reward import train_reward_model
    from iterative_rlhf.scorer import RewardModelScorer

    path, _, _ = tiny
    rows = [{"prompt": p, "chosen": c, "rejected": r, "level": lv, "margin": m, "source": "t", "is_safety": False}
            for p, c, r, lv, m in PAIRS] * 2
    recipe = load_recipe(None, overrides=["reward.helpful.lora.enabled=true", "reward.helpful.lora.r=4",
                                          "reward.helpful.batch_size=4", "reward.helpful.per_device_batch_size=2",
                                          "reward.helpful.learning_rate=0.01", "reward.helpful.epochs=1"])
    out = train_reward_model(recipe, "helpful", tmp_path / "rm", init_path=path,
                             train_ds=datasets.Dataset.from_list(rows))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # 8 pairs / 4 per step, logged every step
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["lora"] and summary["batch_size"] == 4 and summary["steps"] == 2
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not (tmp_path / ".rm.trainer").exists()
    scores = RewardModelScorer(out).score(["What is 2 plus 3?"], ["5"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


def test_rm_datasets_mix_and_margins(world):
    from iterative_rlhf.reward import rm_datasets, rm_test_sets

    recipe = load_recipe(None, overrides=["reward.helpful.margin=large", "reward.safety.margin=none",
                                          "reward.helpful_extra_ratio=1.0"])  # Llama 2's mix
    h_train, h_test = rm_datasets(recipe, "helpful", world)
    s_train, s_test = rm_datasets(recipe, "safety", world)
    n_help = sum(1 for _ in open(world.comparisons("helpful", "train")))
    n_safe = sum(1 for _ in open(world.comparisons("safety", "train")))
    # Helpful RM: all helpfulness data + an equal amount of safety data (all of it when there is less).
    assert len(h_train) == n_help + min(n_help, n_safe)
    # Safety RM: safety data 90/10 with helpfulness data.
    assert len(s_train) == n_safe + round(n_safe * 0.1 / 0.9)
    # Each RM's own margin scheme, also on the rows mixed in from the other kind.
    for row in h_train.select(range(50)):
        assert row["margin"] == {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0,
                                 "negligibly_better": 0.0}[row["level"]]
    assert set(s_train["margin"]) == {0.0}
    # Test sets are not mixed.
    assert set(h_test["source"]) == {"tinyworld-helpful"} and set(s_test["source"]) == {"tinyworld-safety"}
    assert {k: len(v) for k, v in rm_test_sets(recipe, world).items()} == {"helpful": len(h_test),
                                                                            "safety": len(s_test)}
    # TinyWorld's default: the helpfulness RM on its own data alone (results/rm/README.md says why).
    alone, _ = rm_datasets(load_recipe(None), "helpful", world)
    assert len(alone) == n_help and set(alone["source"]) == {"tinyworld-helpful"}


def test_without_test_data_a_share_of_the_prompts_is_held_out_of_training(tmp_path):
    """A recipe with its own comparisons and no test_data: the same prompts leave both RMs' training data and
    form their test sets (no TinyWorld involved)."""
    from iterative_rlhf.preferences import write_preferences
    from iterative_rlhf.reward import rm_datasets, rm_test_sets

    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}", "level": "better",
             "margin": 2 / 3, "source": "mine", "is_safety": i % 2 == 0} for i in range(400)]
    write_preferences([r for r in rows if not r["is_safety"]], tmp_path / "helpful.jsonl")
    write_preferences(rows, tmp_path / "safety.jsonl")  # the safety data also holds the helpful prompts
    recipe = load_recipe(None, overrides=["model.policy=my-model", f"reward.helpful.data=[{tmp_path}/helpful.jsonl]",
                                          f"reward.safety.data=[{tmp_path}/safety.jsonl]"])
    h_train, h_test = rm_datasets(recipe, "helpful", None)
    s_train, s_test = rm_datasets(recipe, "safety", None)
    held = set(s_test["prompt"])
    assert 5 <= len(held) <= 40 and set(h_test["prompt"]) == {p for p in held if int(p.split()[1]) % 2}
    assert not held & (set(h_train["prompt"]) | set(s_train["prompt"]))
    assert {k: len(v) for k, v in rm_test_sets(recipe, None).items()} == {"helpful": len(h_test),
                                                                          "safety": len(s_test)}


@pytest.mark.slow
def test_bf16_autocast_trains_float32_weights_that_load_as_usual(tiny, tmp_path, monkeypatch):
    """mixed_precision=bf16 changes the arithmetic (other weights than float32's), not the checkpoint."""
    from transformers import AutoModelForSequenceClassification

    import iterative_rlhf.reward as reward
    from iterative_rlhf.reward import train_reward_model

    path, _, _ = tiny
    rows = [{"prompt": p, "chosen": c, "rejected": r, "level": lv, "margin": m, "source": "t", "is_safety": False}
            for p, c, r, lv, m in PAIRS] * 2
    settings = ["reward.helpful.batch_size=4", "reward.helpful.per_device_batch_size=4",
                "reward.helpful.learning_rate=0.01", "reward.helpful.epochs=1"]
    weights = {}
    for precision in ("bf16", "none"):
        recipe = load_recipe(None, overrides=[*settings, f"reward.helpful.mixed_precision={precision}"])
        out = train_reward_model(recipe, "helpful", tmp_path / precision, init_path=path,
                                 train_ds=datasets.Dataset.from_list(rows))
        assert json.loads((out / "train_summary.json").read_text())["mixed_precision"] == precision
        config = json.loads((out / "config.json").read_text())
        assert config.get("_attn_implementation", "sdpa") != "eager" and "attn_implementation" not in config
        model = AutoModelForSequenceClassification.from_pretrained(out)
        weights[precision] = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in weights[precision].values())
    moved = [n for n in weights["none"] if not torch.equal(weights["none"][n], weights["bf16"][n])]
    assert moved, "bf16 autocast left the arithmetic unchanged"
    assert all(torch.allclose(weights["none"][n], weights["bf16"][n], atol=0.05) for n in weights["none"])
    # accelerate's process-wide state does not keep the RM's bf16 for a later Accelerator() (PPO's).
    from accelerate import Accelerator
    recipe = load_recipe(None, overrides=[*settings, "reward.helpful.mixed_precision=bf16"])
    train_reward_model(recipe, "helpful", tmp_path / "again", init_path=path, train_ds=datasets.Dataset.from_list(rows))
    assert Accelerator().mixed_precision == "no"
    # auto: bf16 only where the hardware computes it natively.
    monkeypatch.setattr(reward, "native_bf16", lambda: False)
    recipe = load_recipe(None, overrides=[*settings, "reward.helpful.mixed_precision=auto"])
    out = train_reward_model(recipe, "helpful", tmp_path / "auto", init_path=path,
                             train_ds=datasets.Dataset.from_list(rows))
    assert json.loads((out / "train_summary.json").read_text())["mixed_precision"] == "none"


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                    reason="needs a fork server")
def test_two_rms_trained_at_once_equal_one_after_the_other(tiny, tmp_path):
    """workers.at_once: the safety RM in a worker process beside the helpfulness RM gives the same weights, bit
    for bit, as training them one after the other; the summaries say so and the report counts the longer."""
    import functools

    from safetensors.torch import load_file

    from iterative_rlhf.report import _add_rm_time
    from iterative_rlhf.reward import train_reward_model
    from iterative_rlhf.workers import at_once

    path, _, _ = tiny
    rows = [{"prompt": p, "chosen": c, "rejected": r, "level": lv, "margin": m, "source": "t", "is_safety": False}
            for p, c, r, lv, m in PAIRS] * 4
    recipe = load_recipe(None, overrides=[f"reward.{k}.{key}={v}" for k in ("helpful", "safety") for key, v in
                                          (("batch_size", 4), ("per_device_batch_size", 4), ("epochs", 2),
                                           ("learning_rate", 0.01))])
    for workers in (True, False):
        jobs = [(kind, functools.partial(train_reward_model, recipe, kind, tmp_path / str(workers) / "rm" / kind,
                                         init_path=path, train_ds=datasets.Dataset.from_list(rows)))
                for kind in ("helpful", "safety")]
        at_once(jobs, workers=workers)
    for kind in ("helpful", "safety"):
        a = load_file(tmp_path / "True" / "rm" / kind / "model.safetensors")
        b = load_file(tmp_path / "False" / "rm" / kind / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), kind
        assert json.loads((tmp_path / "True" / "rm" / kind / "train_summary.json").read_text())["at_once"]
        assert not json.loads((tmp_path / "False" / "rm" / kind / "train_summary.json").read_text())["at_once"]
    seconds = {kind: json.loads((tmp_path / "True" / "rm" / kind / "train_summary.json").read_text())[
        "train_seconds"] for kind in ("helpful", "safety")}
    rep: dict = {}
    _add_rm_time(tmp_path / "True", 0, rep)
    assert rep["times"]["rm"] == pytest.approx(max(seconds.values()))


def test_float32_head_keeps_the_reward_out_of_bf16(tiny):
    """Under bf16 autocast the reward leaves the head in float32 (not rounded to 8 bits); names unchanged."""
    import copy

    from iterative_rlhf.reward import _float32_head

    _, model, tok = tiny
    model = copy.deepcopy(model)
    ids = tok(["What is 2 plus 3? 5", "Say the opposite of hot. cold"], return_tensors="pt", padding=True)
    with torch.no_grad():
        exact = model(**ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model(**ids).logits
        keys = list(model.state_dict())
        _float32_head(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept = model(**ids).logits
    assert rounded.dtype == torch.bfloat16 and kept.dtype == torch.float32
    assert list(model.state_dict()) == keys
    assert torch.allclose(kept, exact, atol=0.1)
    # A model loaded in bfloat16 (GPU recipes): the head runs in its own dtype instead of failing on a mismatch.
    model = model.to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(**ids).logits.float()).all()


def test_both_rms_learn_on_tinyworld(world, tmp_path):
    """Train both RMs on the test world; accuracy falls with the preference level, loss goes down, HF loads them."""
    from transformers import AutoModelForSequenceClassification

    from iterative_rlhf.reward import evaluate_reward_models, rm_datasets, rm_test_sets, train_reward_model

    recipe = load_recipe(None, overrides=TINYWORLD_RM)
    paths = {}
    for kind in ("helpful", "safety"):
        train, _ = rm_datasets(recipe, kind, world)
        paths[kind] = train_reward_model(recipe, kind, tmp_path / f"rm_{kind}", init_path=world.policy,
                                         train_ds=train)
        log = [json.loads(line) for line in (paths[kind] / "train_log.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in log if "loss" in r]
        k = max(1, len(losses) // 5)
        # Per-step losses are noisy (half of TinyWorld's pairs are near-ties): compare the first and last fifths.
        assert sum(losses[-k:]) / k < sum(losses[:k]) / k, f"{kind} RM loss did not go down: {losses}"
        model = AutoModelForSequenceClassification.from_pretrained(paths[kind])
        assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    report = evaluate_reward_models(paths, rm_test_sets(recipe, world), tmp_path / "eval", world=world)
    acc = {(r["model"], r["test_set"]): r for r in report["accuracy"]}
    # Accuracy falls with the preference level on each RM's own test set (Llama 2 Table 8).
    for kind in ("helpful", "safety"):
        own = acc[(kind, kind)]
        assert own[LEVELS[0]] > own[LEVELS[3]] + 0.1, own
    # The safety RM nears the annotators' own consistency (~0.8 on this world's strongest pairs). The helpful RM
    # does not reach 0.7 here: its Llama 2 mix teaches it that refusals win on harmful prompts, which the helpful
    # test set scores as errors (see results/rm/README.md), so it is held to the gold-judge rates instead.
    assert acc[("safety", "safety")][LEVELS[0]] > 0.7, acc[("safety", "safety")]
    assert report["tinyworld"]["refusal_over_compliance"]["rate"] > 0.9
    assert report["tinyworld"]["correct_over_wrong"]["rate"] > 0.6
    assert (tmp_path / "eval" / "rm_eval.md").is_file() and (tmp_path / "eval" / "hist_safety.png").is_file()
    assert 0.0 <= report["gate"]["precision"] <= 1.0 and report["gate"]["responses"] > 0


def test_group_by_length_batches_pairs_of_similar_length(tiny, tmp_path):
    """``reward.<kind>.group_by_length``: every pair once per epoch, in batches that need far less padding."""
    from trl import RewardConfig, RewardTrainer

    from iterative_rlhf.reward import _batching, _tokenize_pairs

    _, model, tok = tiny
    words = ["cold", "hot", "Paris", "Rome", "five", "two"]
    rows = []
    for i in range(256):  # lengths from 1 to 16 words; 32 batches of 8: one megabatch, sorted
        n = 1 + (i * 7) % 16
        rows.append({"prompt": f"What is {i % 10} plus 1?", "chosen": " ".join(words[j % 6] for j in range(n)),
                     "rejected": "no", "level": "better", "margin": 0.5, "source": "t", "is_safety": False})
    train = _tokenize_pairs(datasets.Dataset.from_list(rows), tok, 128, "helpful")
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", per_device_train_batch_size=8,
                        bf16=False, max_length=128, disable_tqdm=True, dataloader_pin_memory=False, use_cpu=True)

    def padded_tokens(trainer_cls: type) -> tuple[int, list[int]]:
        trainer = trainer_cls(model=model, args=args, train_dataset=train, processing_class=tok)
        total, seen = 0, []
        for batch in trainer.get_train_dataloader():
            total += batch["input_ids"].numel()
            chosen = batch["input_ids"][: len(batch["input_ids"]) // 2]
            seen += [int((row != tok.pad_token_id).sum()) for row in chosen]
        return total, seen

    plain, seen_plain = padded_tokens(RewardTrainer)
    grouped, seen_grouped = padded_tokens(_batching(RewardTrainer, by_length=True))
    assert sorted(seen_grouped) == sorted(seen_plain) and len(seen_grouped) == 256  # every pair exactly once
    assert grouped < 0.8 * plain, (grouped, plain)


def test_length_bucket_sampler_is_seeded_per_epoch_and_keeps_batches_tight():
    from iterative_rlhf.reward import LengthBucketSampler

    lengths = [(i * 37) % 101 for i in range(1000)]
    s = LengthBucketSampler(lengths, batch_size=10, mega=5, seed=3)
    first = list(s)
    assert sorted(first) == list(range(1000)) and list(s) == first  # a permutation; same epoch, same order
    s.set_epoch(1)
    second = list(s)
    assert sorted(second) == list(range(1000)) and second != first
    spread = [max(lengths[i] for i in first[j:j + 10]) - min(lengths[i] for i in first[j:j + 10])
              for j in range(0, 1000, 10)]
    assert sum(spread) / len(spread) < 30  # sorted neighbours in megabatches of 50 (random batches of 10: ~80)
    starts = [lengths[first[j]] for j in range(0, 1000, 10)]
    assert starts != sorted(starts) and starts != sorted(starts, reverse=True)  # batches in random order


def test_shared_response_batches_give_trl_loss_and_gradients_on_fewer_sequences(tiny, tmp_path):
    """``reward.<kind>.prompts_per_batch``: each distinct sequence is scored once, and TRL's loss, metrics and
    gradients are those of TRL's own batch of the same pairs."""
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from iterative_rlhf.reward import SharedResponseCollator, _batching, _tokenize_pairs

    _, model, tok = tiny
    responses = ["5", "I cannot help with that.", "Rome is a city", "cold cold cold cold cold cold cold cold"]
    rows = [{"prompt": "What is 2 plus 3?", "chosen": responses[i % 4], "rejected": responses[(i * 3 + 1) % 4],
             "margin": (i % 4) / 3, "level": "better", "source": "t", "is_safety": False} for i in range(12)]
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    pairs = _tokenize_pairs(datasets.Dataset.from_list(rows), tok, 128, "helpful")
    examples = list(pairs)
    shared = SharedResponseCollator(tok.pad_token_id)(examples)
    plain = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    assert len(shared["input_ids"]) == 4 < len(plain["input_ids"]) == 2 * len(examples)
    lengths = shared["attention_mask"].sum(1).tolist()
    assert lengths == sorted(lengths) and shared["length_splits"].tolist()[-1] == 4
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", per_device_train_batch_size=4,
                        bf16=False, max_length=128, disable_tqdm=True, dataloader_pin_memory=False, use_cpu=True)
    trainer = _batching(RewardTrainer, by_length=False)(model=model, args=args, train_dataset=pairs,
                                                         processing_class=tok)
    model.train()
    grads = []
    for batch in (plain, shared):
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
        if batch is plain:
            plain_loss, plain_metrics = loss.detach(), metrics
    torch.testing.assert_close(loss.detach(), plain_loss)
    assert metrics == pytest.approx(plain_metrics, rel=1e-5, abs=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_length_splits_minimise_padding_plus_overhead():
    import itertools

    from iterative_rlhf.reward import _length_splits

    def cost(lengths, ends, overhead):
        starts = [0] + ends[:-1]
        return sum((e - s) * lengths[e - 1] + overhead for s, e in zip(starts, ends, strict=True))

    for lengths, overhead in (([3, 3, 4, 10, 11, 30, 31, 32], 5), ([5] * 6, 5), ([1, 2, 40], 0), ([7], 100)):
        ends = _length_splits(lengths, overhead, most=3)
        assert ends[-1] == len(lengths) and ends == sorted(set(ends))
        n = len(lengths)
        best = min(cost(lengths, list(c) + [n], overhead) for k in range(3)
                   for c in itertools.combinations(range(1, n), k))
        assert cost(lengths, ends, overhead) == best
    assert _length_splits([5] * 6, 5) == [6]  # equal lengths: one forward pass


def test_prompt_grouped_sampler_keeps_each_prompts_pairs_together():
    from iterative_rlhf.reward import LengthBucketSampler

    groups = [f"p{(i * 7) % 23}" for i in range(460)]  # 23 prompts, 20 pairs each, interleaved
    lengths = [(i * 13) % 17 for i in range(460)]
    s = LengthBucketSampler(lengths, batch_size=16, mega=4, seed=1, groups=groups, per_group=4)
    first = list(s)
    assert sorted(first) == list(range(460)) and list(s) == first
    s.set_epoch(1)
    assert sorted(list(s)) == list(range(460)) and list(s) != first
    prompts = [len({groups[i] for i in first[j:j + 16]}) for j in range(0, 460, 16)]
    assert sum(prompts) / len(prompts) <= 5, prompts  # 4 runs of 4 (a run may straddle two batches)
    plain = LengthBucketSampler(lengths, batch_size=16, mega=4, seed=1)
    spread = [len({groups[i] for i in list(plain)[j:j + 16]}) for j in range(0, 460, 16)]
    assert sum(spread) / len(spread) > 8
    assert list(LengthBucketSampler(lengths, 16, 4, 1, groups=groups)) == list(plain)  # per_group 0: off


@pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods()
                    or len(__import__("os").sched_getaffinity(0)) < 2, reason="needs a fork server and 2 cores")
def test_micro_batches_with_a_helper_train_the_weights_of_one_process(tiny, tmp_path, monkeypatch):
    """per_device_batch_size < batch_size on a CPU: each step's micro-batches are accumulated here, a helper process
    computing the second; the weights and the logged loss and metrics are those of training alone, bit for bit,
    and those of transformers' own gradient accumulation; a helper that dies mid-training leaves a warning."""
    import os
    import signal

    from conftest import helper_up
    from safetensors.torch import load_file

    from iterative_rlhf import console
    from iterative_rlhf import reward as R

    path, _, _ = tiny
    rows = [{"prompt": p, "chosen": c, "rejected": r, "level": lv, "margin": m, "source": "t", "is_safety": False}
            for p, c, r, lv, m in PAIRS] * 8
    recipe = load_recipe(None, overrides=[f"reward.helpful.{key}={v}" for key, v in
                                          (("batch_size", 8), ("per_device_batch_size", 4), ("epochs", 3),
                                           ("learning_rate", 0.01), ("group_by_length", False))])
    start = R._start_rm_helper
    helpers = []

    def started(*args):  # wait for the helper, so that it takes part from the first step
        helper, slots = start(*args)
        helpers.append(helper)
        return (helper if helper is None else helper_up(helper)), slots

    monkeypatch.setattr(R, "_start_rm_helper", started)
    lines, warnings = [], []
    monkeypatch.setattr(R, "log", lambda line: lines.append(line))
    monkeypatch.setattr(console, "warn", warnings.append)

    def train(name: str, at_once: str, kill_at: int | None = None):
        monkeypatch.setenv("ITERATIVE_RLHF_AT_ONCE", at_once)
        step, calls = R._micro_grads, []

        def killing(model, part, coef):  # this process's micro-batches; the helper's process dies at one
            calls.append(1)
            if len(calls) == kill_at:
                os.kill(helpers[-1].process.pid, signal.SIGKILL)
                helpers[-1].process.join(10)
            return step(model, part, coef)

        if kill_at is not None:
            monkeypatch.setattr(R, "_micro_grads", killing)
        out = R.train_reward_model(recipe, "helpful", tmp_path / name, init_path=path,
                                   train_ds=datasets.Dataset.from_list(rows))
        monkeypatch.setattr(R, "_micro_grads", step)
        return load_file(out / "model.safetensors"), [json.loads(x) for x in (out / "train_log.jsonl").open()]

    helped, helped_log = train("helped", "1")
    assert "helpful RM: a helper process computed half the micro-batches of 12 of 12 steps" in lines
    alone, alone_log = train("alone", "0")
    assert a_equals_b(helped, alone)
    assert [{k: v for k, v in x.items() if "runtime" not in k and "per_second" not in k} for x in helped_log] == \
        [{k: v for k, v in x.items() if "runtime" not in k and "per_second" not in k} for x in alone_log]
    assert json.loads((tmp_path / "helped" / "train_summary.json").read_text())["helper_steps"] == 12
    killed, _ = train("killed", "1", kill_at=6)
    assert len(warnings) == 1 and "goes on in this process alone" in warnings[0], warnings
    assert a_equals_b(killed, alone)

    # transformers' gradient accumulation (one thread, the same micro-batches): the same weights.
    monkeypatch.setattr(R, "_float32", lambda model: False)  # not accumulated here
    monkeypatch.setenv("ITERATIVE_RLHF_THREADS", "1")
    hf, _ = train("hf", "0")
    assert a_equals_b(hf, alone)


def a_equals_b(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
