"""Characters as versioned assets: Character Card V2/V3 import/export (:mod:`.cards`), the catalogue
(:mod:`.catalogue`), lorebook selection (:mod:`.lorebook`) and ``troupe characters ...`` (:mod:`.cli`).

Serving uses :func:`load_catalogue` (``Catalogue.version``, ``.characters``, ``.get(id)``),
:func:`select_lore` / :func:`render_lore` and :func:`troupe.persona.render_system_prompt`.
"""

from troupe.characters.cards import CardError, card_to_character, character_to_card, read_card, write_card
from troupe.characters.catalogue import (
    Catalogue,
    CatalogueError,
    Problem,
    catalogue_version,
    import_card,
    import_cards,
    load_catalogue,
    save_catalogue,
    validate_character,
)
from troupe.characters.lorebook import estimate_tokens, render_lore, select_lore

__all__ = [
    "CardError",
    "Catalogue",
    "CatalogueError",
    "Problem",
    "card_to_character",
    "catalogue_version",
    "character_to_card",
    "estimate_tokens",
    "import_card",
    "import_cards",
    "load_catalogue",
    "read_card",
    "render_lore",
    "save_catalogue",
    "select_lore",
    "validate_character",
    "write_card",
]
