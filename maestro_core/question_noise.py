"""Question noise: a training-time augmentation of what the policy reads (never what experts get).

A small policy trained on a few question templates routes by their exact words, and an unseen
wording (other words, which a tokenizer trained on the suite splits into byte fragments)
sends it anywhere (docs/POLICY.md, held-out set). Noise in training makes the words an
unreliable cue: some words are dropped, some are replaced by random letters, so the policy
must also use the other words and the image descriptors (whether an image is attached, its
size). The episode's prompt records the noisy question exactly as the policy saw it; the
runner still forwards the item's own question to the experts and scores its own answer.

    noise = QuestionNoise(drop=0.3, replace=0.2)
    noise("What digit is shown in the image?", random.Random(0))  # 'What digit xkqv in image?'
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from maestro_core.errors import ConfigError


@dataclass(frozen=True)
class QuestionNoise:
    drop: float = 0.0
    """Probability that a word is dropped."""
    replace: float = 0.0
    """Probability that a (kept) word is replaced by 2-9 random lowercase letters."""

    def __post_init__(self) -> None:
        for name in ("drop", "replace"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"question noise {name} must be in [0, 1), got {v}.", field=f"question_{name}",
                                  fix="use e.g. 0.2, or 0 to switch it off.")

    @property
    def active(self) -> bool:
        return self.drop > 0 or self.replace > 0

    def __call__(self, question: str, rng: random.Random) -> str:
        """The question with noise; at least one word is kept; line breaks are kept."""
        lines = []
        for line in question.split("\n"):
            words = line.split()
            out = []
            for w in words:
                if rng.random() < self.drop:
                    continue
                if rng.random() < self.replace:
                    w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
                out.append(w)
            if words and not out:
                out = [rng.choice(words)]
            lines.append(" ".join(out))
        return "\n".join(lines)
