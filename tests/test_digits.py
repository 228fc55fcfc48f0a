"""The MNIST digit CNN (digit_recognizer's weights) on sklearn's 8x8 digits rendered as scans:
upscaled to 64x64 (bicubic), an 8-pixel margin, dark digit on a light background."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from maestro_core.digits import classify, digit_cnn_model, load_cnn, mnist_array


def render_sklearn_digit(pixels: np.ndarray, path: Path | None = None, *, dark_on_light: bool = True):
    """An 8x8 sklearn digit (values 0-16) as an 80x80 grayscale scan."""
    from PIL import Image

    a = (pixels.reshape(8, 8) / 16.0 * 255).astype(np.uint8)
    a = np.pad(np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.BICUBIC)), 8)
    img = Image.fromarray(255 - a if dark_on_light else a)
    if path is not None:
        img.save(path)
    return img


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    idx = np.random.RandomState(0).permutation(len(y))[:100]
    return x[idx], y[idx]


def test_accuracy_on_100_sklearn_digits(digits) -> None:
    x, y = digits
    net = load_cnn()
    preds = classify(net, [mnist_array(render_sklearn_digit(v)) for v in x])
    acc = float(np.mean([p == t for (p, _), t in zip(preds, y)]))
    print(f"accuracy on 100 sklearn digits (dark on light): {acc:.2f}")
    assert acc >= 0.80
    # the same digits light on dark give the same answers (inversion is automatic)
    preds_inv = classify(net, [mnist_array(render_sklearn_digit(v, dark_on_light=False)) for v in x[:20]])
    assert [p for p, _ in preds_inv] == [p for p, _ in preds[:20]]


def test_model_reads_a_png_and_reports_softmax_confidence(digits, tmp_path: Path) -> None:
    x, y = digits
    model = digit_cnn_model()
    hits = 0
    for i in range(10):
        render_sklearn_digit(x[i], tmp_path / f"d{i}.png")
        out = model("Which digit is this?", [tmp_path / f"d{i}.png"])
        assert out["text"] in "0123456789" and len(out["text"]) == 1
        assert 0.1 <= out["confidence"] <= 1.0
        hits += out["text"] == str(y[i])
    assert hits >= 7


def test_printed_digits_are_recognised(tmp_path: Path) -> None:
    from maestro_core.warmup import render_digit_image

    model = digit_cnn_model()
    for d in "0123456789":
        out = model("digit?", [render_digit_image(d, tmp_path / f"{d}.png")])
        assert out["text"] == d, (d, out)


def test_preprocessing_is_mnist_like() -> None:
    from PIL import Image, ImageDraw

    img = Image.new("L", (200, 120), 255)
    ImageDraw.Draw(img).rectangle((150, 20, 160, 100), fill=0)  # a dark bar, off-centre
    arr = mnist_array(img)
    assert arr.shape == (28, 28) and arr.dtype == np.float32
    assert arr.max() == pytest.approx(1.0, abs=0.05) and arr[0].max() == 0 and arr[:, 0].max() == 0
    ys, xs = np.nonzero(arr > 0.5)
    assert abs(ys.mean() - 13.5) < 1.5 and abs(xs.mean() - 13.5) < 1.5  # centred
    assert ys.max() - ys.min() + 1 in (19, 20, 21)  # longer side fitted into 20 px
    assert mnist_array(Image.new("L", (30, 30), 255)).max() == 0  # blank stays blank


def test_no_torchvision_and_no_image_errors() -> None:
    model = digit_cnn_model()
    assert "torchvision" not in sys.modules and "digit_recognizer" not in sys.modules
    with pytest.raises(ValueError, match="no image"):
        model("digit?", [])


def test_transparent_png_digit(tmp_path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    from maestro_core.warmup import font_path

    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((32, 32), "4", font=ImageFont.truetype(str(font_path()), 48), fill=(0, 0, 0, 255),
                             anchor="mm")
    img.save(tmp_path / "four.png")
    assert digit_cnn_model()("digit?", [tmp_path / "four.png"])["text"] == "4"
