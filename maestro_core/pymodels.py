"""In-process Python models that registries can name (`backend: {kind: python, callable: ...}`).

Each factory returns a model `model(text, images) -> str | dict`. They compute only from
their input text and images. The embedded suite adds OCR and digit models beside these.
"""

from __future__ import annotations

import re
from pathlib import Path

from maestro_core.tools import calculate


def calculator():
    """Exact arithmetic on the expression found in the text (a 'tool model')."""
    def model(text: str, images: list[Path]) -> dict:
        out = calculate(text, images)
        return {"text": out.text, "confidence": out.confidence}
    return model


_QUOTED = re.compile(r"[\"'“‘](.+?)[\"'”’]", re.DOTALL)


def text_counter():
    """Counts words, letters or a given letter in the quoted text of a request."""
    def model(text: str, images: list[Path]) -> dict:
        quoted = _QUOTED.findall(text)
        # the passage is the longest quoted span (a quoted single letter names what to count)
        target = max(quoted, key=len) if quoted else text
        low = text.lower()
        letter = re.search(r"letter ['\"]?([a-z])['\"]?", low)
        if letter:
            n = target.lower().count(letter.group(1))
        elif "letter" in low or "character" in low:
            n = sum(ch.isalpha() for ch in target)
        else:
            n = len(target.split())
        return {"text": str(n), "confidence": 1.0 if quoted else 0.5}
    return model
