"""A handwritten-digit classifier as an in-process Python model.

    backend: {kind: python, callable: "maestro_core.digits:digit_cnn_model"}

The network is the MNIST CNN of the `digit-recognizer-py` distribution (package
`digit_recognizer`): three 3x3 conv + ReLU + 2x2 max-pool blocks (32, 64, 128 channels) and a
1152-256-10 MLP. Its architecture is restated here and its weights
(`digit_recognizer/models/handwriting_model.pth`) are loaded with `torch.load(weights_only=True)`
on the CPU, without importing the package (which imports torchvision).

`model(text, images)` reads the first image and returns {"text": "7", "confidence": p} with p
the softmax probability of the answer. Preprocessing turns any picture of one digit into an
MNIST-like input: grayscale; inverted when the background (the border) is light, so the digit
is light on black; cropped to the ink's bounding box; padded to a square; resized so its
longer side is 20 pixels; placed in a 28x28 black frame centred on its centre of mass; then
normalised with MNIST's mean and std.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
INK_THRESHOLD = 0.25
"""Fraction of the darkest-to-lightest range above which a (light-on-dark) pixel counts as ink."""


def build_cnn() -> Any:
    """The digit_recognizer CNN (same module names, so its state_dict loads as is)."""
    from torch import nn

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_layers = nn.Sequential(
                nn.Conv2d(1, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            )
            self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, x: Any) -> Any:
            x = self.conv_layers(x)
            return self.fc_layers(x.view(x.size(0), -1))

    return CNN()


def weights_path() -> Path:
    from maestro_core.weights import package_file

    return package_file("digit_recognizer", "models/handwriting_model.pth")


def load_cnn(path: str | Path | None = None) -> Any:
    """The CNN in eval mode with the packaged (or given) weights, on the CPU."""
    import torch

    model = build_cnn()
    state = torch.load(str(path or weights_path()), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def mnist_array(image: Any) -> Any:
    """A 28x28 float32 array in [0, 1] (light digit on black, MNIST-style) from a PIL image,
    a path or a 2-D array."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            im.load()
            image = im.copy()
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(bg, rgba)
        arr = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[..., :3].mean(axis=2)
        if arr.max() > 1.0:
            arr = arr / 255.0
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected a 2-D grayscale image, got shape {arr.shape}")
    # light background (judged on the border) -> invert, so ink is bright
    h, w = arr.shape
    bh, bw = max(1, h // 20), max(1, w // 20)
    border = np.concatenate([arr[:bh].ravel(), arr[-bh:].ravel(), arr[:, :bw].ravel(), arr[:, -bw:].ravel()])
    if border.mean() > 0.5:
        arr = 1.0 - arr
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-6:
        return np.zeros((28, 28), dtype=np.float32)  # a blank image
    arr = (arr - lo) / (hi - lo)
    ys, xs = np.nonzero(arr > INK_THRESHOLD)
    arr = arr[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    # pad to a square, then fit the longer side into 20 pixels
    h, w = arr.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = arr
    small = np.asarray(Image.fromarray((square * 255).astype(np.uint8)).resize((20, 20), Image.Resampling.LANCZOS),
                       dtype=np.float32) / 255.0
    small = np.clip(small, 0.0, 1.0)
    # place in 28x28, centred on the centre of mass (as MNIST was made)
    out = np.zeros((28, 28), dtype=np.float32)
    total = small.sum()
    cy, cx = ((np.indices(small.shape) * small).sum(axis=(1, 2)) / total) if total > 0 else (9.5, 9.5)
    top = int(round(14 - cy)) if total > 0 else 4
    left = int(round(14 - cx)) if total > 0 else 4
    top, left = min(max(top, 0), 8), min(max(left, 0), 8)
    out[top:top + 20, left:left + 20] = small
    return out


def classify(model: Any, arrays: list[Any]) -> list[tuple[int, float]]:
    """(digit, softmax probability) for each 28x28 array."""
    import numpy as np
    import torch

    x = torch.from_numpy((np.stack(arrays).astype(np.float32) - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)
    conf, digit = probs.max(dim=1)
    return [(int(d), float(c)) for d, c in zip(digit, conf)]


def digit_cnn_model(*, weights: str | None = None) -> Callable[[str, list[Path]], dict]:
    """The digit classifier: model(text, images) -> {"text": "7", "confidence": p}."""
    net = load_cnn(weights)
    lock = threading.Lock()

    def model(text: str, images: list[Path]) -> dict[str, Any]:
        if not images:
            raise ValueError("no image given: the digit classifier reads one digit from an image; pass one")
        from maestro_core.ocr import check_image

        check_image(Path(images[0]))
        arr = mnist_array(Path(images[0]))
        with lock:
            (digit, conf), = classify(net, [arr])
        return {"text": str(digit), "confidence": conf}

    return model
