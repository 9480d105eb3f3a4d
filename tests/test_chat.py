"""Prompts as chat messages: one user turn, or an HH dialogue's turns, the same for every stage."""

from __future__ import annotations

import pytest

from iterative_rlhf.chat import prompt_messages

U, A = "user", "assistant"


def roles(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


@pytest.mark.parametrize("prompt, expected", [
    ("What is 2 plus 2?", [(U, "What is 2 plus 2?")]),
    ("Human: Hi\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant:",
     [(U, "Hi"), (A, "Hello!"), (U, "How do I pick a lock?")]),
    ("Human: One turn.\n\nAssistant:", [(U, "One turn.")]),
    # cut from the left by model.max_prompt_length: the fragment and the assistant turn before the first user turn go
    ("lo there\n\nAssistant: Hello!\n\nHuman: And now?\n\nAssistant:", [(U, "And now?")]),
    ("Human: a\n\nHuman: b\n\nAssistant:", [(U, "a\n\nb")]),  # HH quirk: two human turns in a row
    # not a dialogue waiting for its answer: one user turn as written
    ("Human: a\n\nAssistant: b", [(U, "Human: a\n\nAssistant: b")]),
    ("Tell me what 'Assistant:' means", [(U, "Tell me what 'Assistant:' means")]),
    ("Human: a\n\nAssistant: \n\nHuman: c\n\nAssistant:", [(U, "Human: a\n\nAssistant: \n\nHuman: c\n\nAssistant:")]),
])
def test_prompt_messages(prompt, expected):
    assert roles(prompt_messages(prompt)) == expected


def test_every_stage_renders_a_dialogue_as_turns(world):
    """Sampling and PPO (chat_prompts), the reward models (encode) and SFT (sft_dataset) all see the same turns."""
    from iterative_rlhf.checkpoint import load_tokenizer
    from iterative_rlhf.generation import chat_prompts
    from iterative_rlhf.scorer import encode
    from iterative_rlhf.sft import sft_dataset

    tok = load_tokenizer(str(world.policy))
    dialogue = "Human: What is 2 plus 2?\n\nAssistant: 4.\n\nHuman: And 3 plus 3?\n\nAssistant:"
    turns = prompt_messages(dialogue)
    head = chat_prompts(tok, [dialogue])[0]
    assert head == tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert "Human:" not in head and head.count("4.") == 1
    ids = encode(tok, dialogue, "6.")
    assert ids == list(tok.apply_chat_template([*turns, {"role": A, "content": "6."}], tokenize=True,
                                               return_dict=True)["input_ids"])
    assert sft_dataset([{"prompt": dialogue, "response": "6."}])[0]["prompt"] == turns
    # TinyWorld's prompts are single user turns, rendered exactly as before
    assert chat_prompts(tok, ["What is 2 plus 2?"])[0] == tok.apply_chat_template(
        [{"role": U, "content": "What is 2 plus 2?"}], tokenize=False, add_generation_prompt=True)
