"""The ONE persona-card -> system prompt renderer, shared by training, evaluation and serving.

Train and inference prompts must match exactly (DOMAIN.md: version 0.0.2 trained without the card
and prompted with it, and character cognition collapsed), so nothing else in Troupe builds a system
prompt. Sections follow the seeds' prompt: character information, story/scene, speaking examples,
basic rules (abridged rules 1, 3-8 of DOMAIN.md), written in the character's language.
"""

from __future__ import annotations

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
    return "\n\n".join(parts)
