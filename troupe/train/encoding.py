"""Dialogue -> token ids with an assistant mask: loss on the character's turns only.

The prompt is ``contract.to_chat(dialogue, render_system_prompt(card))`` formatted by the
tokenizer's own chat template (ChatML for SmolLM2 / Qwen2.5), so training, evaluation and serving
share one prompt format. Assistant spans are located by rendering message prefixes (the chat
template is prefix-stable) and mapped to tokens through the fast tokenizer's offset mapping; each
span includes the end-of-turn token so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from troupe.contract import Character, Dialogue, Message, general_chat, is_general, to_chat
from troupe.persona import render_system_prompt


@dataclass
class Encoded:
    """``input_ids`` and ``assistant_masks`` (1 = character token, in the loss) of equal length."""

    input_ids: list[int]
    assistant_masks: list[int]

    @property
    def n_loss_tokens(self) -> int:
        return sum(self.assistant_masks)


def chat_messages(dialogue: Dialogue | list[Message], character: Character) -> list[dict[str, str]]:
    """Chat-template messages (system card + turns) for a dialogue or message list."""
    msgs = dialogue.messages if isinstance(dialogue, Dialogue) else dialogue
    return to_chat(msgs, render_system_prompt(character))


def encode_dialogue(
    tokenizer,
    dialogue: Dialogue,
    character: Character | None,
    cutoff_len: int | None = None,
    *,
    mask_history: bool = False,
) -> Encoded:
    """Tokenize one dialogue for SFT.

    Args:
        tokenizer: a fast HF tokenizer with a chat template.
        dialogue: the dialogue (assistant turns are the character's).
        character: its persona card; ignored (may be None) for general data
            (:func:`troupe.contract.is_general`), which is rendered without a card
            (:func:`troupe.contract.general_chat`).
        cutoff_len: keep at most this many tokens from the start (LLaMA-Factory ``cutoff_len``); None = all.
        mask_history: loss on the last assistant turn only, earlier turns are context (LLaMA-Factory's
            ``mask_history``, ``sft.mask_history``); if ``cutoff_len`` cuts into that turn, only its
            kept tokens carry loss, and none when it is cut off entirely.

    Returns:
        :class:`Encoded`; ``assistant_masks`` is 1 exactly on assistant content + end-of-turn tokens
        (of the last assistant turn only with ``mask_history``).

    Raises:
        ValueError: a character dialogue with ``character=None``.
    """
    if is_general(dialogue):
        chat = general_chat(dialogue.messages)
    elif character is None:
        raise ValueError(f"dialogue {dialogue.id}: a character dialogue needs its persona card")
    else:
        chat = chat_messages(dialogue, character)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(chat):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(chat[: i + 1], tokenize=False))
        spans.append((start, end))
    if mask_history:
        spans = spans[-1:]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    si = 0
    for t, (a, b) in enumerate(offsets):
        while si < len(spans) and a >= spans[si][1]:
            si += 1
        if si < len(spans) and a >= spans[si][0] and b <= spans[si][1] and b > a:
            mask[t] = 1
    if cutoff_len is not None:
        ids, mask = ids[:cutoff_len], mask[:cutoff_len]
    return Encoded(list(ids), mask)


def prompt_text(tokenizer, messages: list[Message], character: Character) -> str:
    """Generation prompt (card + context, ending with the assistant header) as text."""
    return tokenizer.apply_chat_template(
        chat_messages(messages, character), tokenize=False, add_generation_prompt=True
    )
