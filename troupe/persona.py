"""The ONE persona-card -> system prompt renderer, shared by training, evaluation and serving.

Train and inference prompts must match exactly (DOMAIN.md: version 0.0.2 trained without the card
and prompted with it, and character cognition collapsed), so nothing else in Troupe builds a system
prompt. Sections follow the seeds' prompt: character information, story/scene, speaking examples,
basic rules (abridged rules 1, 3-8 of DOMAIN.md), written in the character's language. A card
imported from a Character Card (:mod:`troupe.characters.cards`) may add its own ``system_prompt``: it
is rendered as one more section *after* the rules and never replaces them (the V2 spec lets a card
replace the frontend's system prompt; Troupe's rules are what the model was trained with, so they
stay). Characters without card fields render exactly as before.

Card macros (SillyTavern's ``{{char}}``, ``{{user}}``, ``<BOT>``, ``<USER>``, ``{{original}}``) are
filled by :func:`fill_macros`, the one place that knows them.
"""

from __future__ import annotations

import re

from troupe.contract import Character

_RULES = {
    "zh": [
        "始终以{name}的身份说话，不要在回复前加“{name}：”。",
        "只知道{name}应该知道的事情。",
        "主动推动话题，多提问，让对话继续下去，不要说再见或拒绝继续聊天。",
        "回复简短、口语化、生动，最多{max_chars}个字。",
        "模仿说话示例的语气和口头禅。",
        "不要写动作或旁白（例如“（点了支烟）”），用<emotion>标签表达情绪。",
        "始终用中文回复，无论用户用什么语言。",
    ],
    "en": [
        'Always speak as {name}; never start a reply with "{name}:".',
        "Only know what {name} would know.",
        "Drive the conversation: keep topics going, ask questions, never say goodbye or refuse to go on.",
        "Keep replies short, colloquial and vivid: at most {max_chars} words.",
        "Follow the speaking examples' tone and catch-phrases.",
        "No stage directions such as *smiles*; express emotion with an <emotion> tag instead.",
        "Always reply in English, whatever language the user writes in.",
    ],
}
_HEADINGS = {
    "zh": ("角色信息", "说话风格", "故事场景", "说话示例", "基本规则", "你现在扮演{name}。"),
    "en": (
        "Character information",
        "Speaking style",
        "Scene",
        "Speaking examples",
        "Basic rules",
        "You are now playing {name}.",
    ),
}
#: Length limit used in the rules: characters for zh, words otherwise (DOMAIN.md rule 7).
MAX_REPLY_UNITS = {"zh": 50, "en": 50}
#: Heading of the card's own ``system_prompt`` section (after the rules).
_EXTRA_HEADING = {"zh": "补充说明", "en": "Additional instructions"}
#: What ``{{user}}`` becomes when the user's name is not known: (in instructions, in the character's
#: own lines). The persona prompt is the same for every user (it is KV-cached per character).
USER_PLACEHOLDER = {"zh": ("用户", "你"), "en": ("the user", "you")}
_USER = r"(?:\{\{user\}\}|<user>)"
_CHAR = re.compile(r"\{\{char\}\}|<bot>|<char>", re.I)
_ORIGINAL = re.compile(r"\{\{original\}\}", re.I)
#: ``, {{user}}`` / ``{{user}},`` used as a form of address ("Nice to meet you, {{user}}!")
_VOCATIVE = re.compile(rf"\s*[,，]\s*{_USER}(?=\s*(?:[.!?。！？…~～]|$))|^\s*{_USER}\s*[,，]\s*", re.I | re.M)
_USER_RE = re.compile(_USER, re.I)


def fill_macros(text: str, name: str, language: str, *, user: str | None = None, speech: bool = False) -> str:
    """Fill a card text's macros: ``{{char}}``/``<BOT>``/``<char>`` -> ``name``; ``{{user}}``/``<USER>``
    -> ``user``; ``{{original}}`` -> nothing (Troupe's rules are always rendered; see module doc).

    Macros are matched case-insensitively (SillyTavern's macro names; docs.sillytavern.app "Macros").

    Args:
        text: card text (system prompt, greeting, speaking example...).
        name: the character's name (or the V3 ``nickname``, which the V3 spec puts in its place).
        language: the character's language; picks the placeholder of :data:`USER_PLACEHOLDER`.
        user: the user's name; None = unknown: in ``speech`` (a line the character says) a
            ``{{user}}`` used as a form of address is dropped ("Nice to meet you, {{user}}!" ->
            "Nice to meet you!") and any other becomes "you"/"你"; elsewhere "the user"/"用户".
        speech: ``text`` is a line the character says (greetings, speaking examples).
    """
    text = _CHAR.sub(lambda _: name, _ORIGINAL.sub("", text))
    if user is None:
        third, second = USER_PLACEHOLDER["zh" if language == "zh" else "en"]
        if speech:
            text = _VOCATIVE.sub("", text)
        user = second if speech else third
    return _USER_RE.sub(lambda _: user, text)


def render_system_prompt(character: Character, language_name: str | None = None) -> str:
    """Render a persona card as the system prompt.

    Args:
        character: the persona card.
        language_name: override for the enforced reply language's display name (else derived from
            ``character.language``; languages other than zh use the English template).

    Returns:
        The system prompt text (deterministic: the same card always renders the same bytes, which is
        what lets serving cache the card's KV prefix).
    """
    lang = "zh" if character.language == "zh" else "en"
    h_info, h_style, h_scene, h_ex, h_rules, opener = _HEADINGS[lang]
    parts = [opener.format(name=character.name)]
    if character.profile:
        sep = "：" if lang == "zh" else ": "
        parts.append(f"## {h_info}\n" + "\n".join(f"- {k}{sep}{v}" for k, v in character.profile.items()))
    if character.style:
        parts.append(f"## {h_style}\n{character.style}")
    if character.scene:
        parts.append(f"## {h_scene}\n{character.scene}")
    if character.examples:
        parts.append(f"## {h_ex}\n" + "\n".join(f"- {e}" for e in character.examples))
    rules = [r.format(name=character.name, max_chars=MAX_REPLY_UNITS[lang]) for r in _RULES[lang]]
    if lang == "en" and character.language != "en":
        rules[-1] = (
            f"Always reply in {language_name or character.language}, whatever language the user writes in."
        )
    parts.append(f"## {h_rules}\n" + "\n".join(f"{i}. {r}" for i, r in enumerate(rules, 1)))
    extra = fill_macros(character.system_prompt, character.name, character.language).strip()
    if extra:
        parts.append(f"## {_EXTRA_HEADING[lang]}\n{extra}")
    return "\n\n".join(parts)


def render_post_history(character: Character) -> str:
    """The card's ``post_history_instructions`` with macros filled (:func:`fill_macros`), ``""`` if none.

    The V2 spec places this text after the chat history (it replaces a frontend's "jailbreak" slot);
    serving appends it as a system turn after the last user turn when it is not empty.
    """
    return fill_macros(character.post_history_instructions, character.name, character.language).strip()


def render_greeting(character: Character, index: int = 0, user: str | None = None) -> str:
    """Greeting ``index`` of the character (0 = the card's ``first_mes``) with macros filled.

    Raises:
        IndexError: the character has no greeting ``index``.
    """
    return fill_macros(character.greetings[index], character.name, character.language, user=user, speech=True)
