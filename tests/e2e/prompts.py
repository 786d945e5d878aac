"""Fixed e2e prompts: varied lengths, several spanning many 32-token chunks."""

from __future__ import annotations

_STORY = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, counting each of the "
    "one hundred and twelve steps as his father had taught him. At the top he trimmed the wick, polished "
    "the great lens until it gleamed, and watched the ships that passed along the rocky coast. "
)
_SCIENCE = (
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy "
    "into chemical energy. Chlorophyll absorbs mostly blue and red light, and the energy drives the "
    "splitting of water molecules, releasing oxygen as a by-product. "
)
_CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"

# Shared by several long prompts, so the store holds chunks that other prompts reuse.
LONG_PREFIX = _STORY * 3

EQUIVALENCE = [
    "The capital of France is",
    "Hello, my name is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4, 5,",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Translate to French: I would like a cup of coffee, please.",
    "List three primary colors:",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    _SCIENCE + "In summary, photosynthesis",
    _CODE + "# Explain what this function computes:\n#",
    "Once upon a time in a small village by the mountains, there lived a baker who",
    _STORY + "One stormy night, the keeper saw",
    _SCIENCE * 2 + "The most important product of photosynthesis is",
    LONG_PREFIX + "Years later, his daughter",
    _STORY * 4 + _SCIENCE + "Connecting these two passages,",
    "Explain in one sentence why the sky is blue.",
    "The three laws of motion were formulated by",
    _CODE * 3 + "# A faster version using a loop:\ndef fib_fast(n):",
    "Recipe for pancakes. Ingredients:",
    "Dear hiring manager, I am writing to apply for the position of",
    _SCIENCE * 3 + _STORY + "Write a title for the text above:",
    "In 1969, the first humans to walk on the Moon were",
]

# A new suffix on a stored long prefix: the prefill side must load that prefix from the store.
SHARED_PREFIX = LONG_PREFIX + "Meanwhile, far away in the city,"

# Never sent before the fault tests run, so nothing of them is cached anywhere.
FRESH = [
    _STORY * 2 + "The storm finally passed when",
    "A short poem about autumn leaves:",
    _SCIENCE + _CODE + "Which of these two texts is about biology?",
]

# Long and unrelated to each other and to everything above (a distinct first chunk each): the
# prefill engine holds several of them at once for seconds while a test kills it.
UNDER_FIRE = [f"Document {i} of the archive, filed under {topic}. " + (_SCIENCE + _STORY + _CODE) * 5
              + "Summary of the document:" for i, topic in enumerate(("botany", "lighthouses", "code", "weather",
                                                                      "history", "music"))]
