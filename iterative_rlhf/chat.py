"""How a prompt becomes the chat messages that every stage renders with the checkpoint's chat template.

A prompt is one user turn, except a dialogue in the HH-RLHF layout ("Human: ...\\n\\nAssistant: ...\\n\\nHuman:
...\\n\\nAssistant:", which :func:`iterative_rlhf.preferences.hh_rlhf_split` keeps as the prompt of a
multi-turn comparison): that becomes its turns, user and assistant alternating, so that a chat model (and the
reward models initialised from it) reads earlier assistant turns as its own. Sampling, scoring, SFT and PPO
all go through :func:`prompt_messages`, so they see the same conversation. Imports nothing.
"""

from __future__ import annotations

import re

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def prompt_messages(prompt: str) -> list[dict[str, str]]:
    """The chat messages of ``prompt``: ``[{"role": "user", "content": prompt}]``, or an HH dialogue's turns.

    A dialogue is a text that ends with an open ``"Assistant:"`` turn and has at least one ``"Human:"`` turn.
    Its turns become messages: consecutive turns of one speaker are joined, a leading fragment or assistant
    turn (left by truncation from the left) is dropped, and the conversation ends with the user's turn that
    the response answers. Anything else, including a dialogue that does not end that way, stays one user turn.
    """
    text = prompt.strip()
    if not text.endswith("Assistant:") or not re.search(r"(?:^|\n\n)Human:", text):
        return [{"role": "user", "content": prompt}]
    parts = _TURN.split(text)  # [lead, speaker, content, speaker, content, ...]
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role, content = _ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        elif messages or role == "user":
            messages.append({"role": role, "content": content})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the open "Assistant:" turn: the response fills it
    if not messages or messages[-1]["role"] != "user" or not all(m["content"] for m in messages):
        return [{"role": "user", "content": prompt}]
    return messages
