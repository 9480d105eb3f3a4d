"""Averaging two checkpoints weight by weight (campaign.merge)."""

from __future__ import annotations

import json

import pytest
import torch

from iterative_rlhf.checkpoint import average_checkpoints
from iterative_rlhf.errors import UserError


def tiny_llama(path, seed: int, hidden: int = 16, layers: int = 2, shard: str | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    (path / "extra.txt").write_text(f"seed {seed}")
    return model


def test_the_average_is_each_weight_averaged_and_transformers_loads_it(tmp_path):
    from transformers import LlamaForCausalLM

    # the new checkpoint in shards, the old one in one file: the layouts need not match
    new = tiny_llama(tmp_path / "new", 0, shard="20KB")
    old = tiny_llama(tmp_path / "old", 1)
    assert (tmp_path / "new" / "model.safetensors.index.json").is_file()
    out = average_checkpoints(tmp_path / "new", tmp_path / "old", 0.25, tmp_path / "avg")
    got = LlamaForCausalLM.from_pretrained(out)
    for (name, a), b, c in zip(new.state_dict().items(), old.state_dict().values(), got.state_dict().values(),
                               strict=True):
        assert torch.equal(c, 0.25 * a + 0.75 * b), name
    # every other file is the new checkpoint's, in its shard layout; nothing half-written is left
    assert (out / "extra.txt").read_text() == "seed 0"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("*.safetensors")}
    assert not list(tmp_path.glob(".avg*"))
    # weight 1 is the new checkpoint itself
    one = LlamaForCausalLM.from_pretrained(average_checkpoints(tmp_path / "new", tmp_path / "old", 1.0,
                                                               tmp_path / "one"))
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), one.state_dict().values(), strict=True))


def test_checkpoints_of_two_architectures_are_refused_by_name(tmp_path):
    tiny_llama(tmp_path / "a", 0)
    tiny_llama(tmp_path / "wider", 0, hidden=24)
    tiny_llama(tmp_path / "deeper", 0, layers=3)
    with pytest.raises(UserError, match=r"shape .* both must be one architecture"):
        average_checkpoints(tmp_path / "a", tmp_path / "wider", 0.5, tmp_path / "out")
    with pytest.raises(UserError, match=r"different tensors .*layers\.2"):
        average_checkpoints(tmp_path / "a", tmp_path / "deeper", 0.5, tmp_path / "out")
    with pytest.raises(UserError, match="outside"):
        average_checkpoints(tmp_path / "a", tmp_path / "a", 1.5, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model.safetensors"):
        average_checkpoints(tmp_path / "a", tmp_path / "empty", 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()
