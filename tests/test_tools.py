"""Solver tools on real rendered images and text."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from maestro_core.registry import parse_registry
from maestro_core.tools import TOOLS, answer_from_lines, calculate, extract_number


def font(size):
    import matplotlib
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)


@pytest.mark.parametrize("text, out", [("What is 12 + 30?", "42"), ("(3 + 4) * 2 = ?", "14"), ("7 / 2", "3.5"),
                                       ("2^10", "1024"), ("no numbers", "no arithmetic expression found"),
                                       ("1/0 and 3*3", "9"),
                                       ("Calculate ( -( 2 - -1 + 7 ) / 1 ) / 2.", "-5")])
def test_calculate(text, out):
    assert calculate(text, []).text == out


def test_extract_number():
    assert extract_number("it is 1,234 or 5", []).text == "5"
    assert extract_number("it is 1,234 or 5", [], which="first").text == "1234"


@pytest.mark.parametrize("lines, q, out", [
    ("alpha\nbeta\ngamma", "What is the word on the last line?", "gamma"),
    ("alpha\nbeta", "What is the first line?", "alpha"),
    ("header\nK7Q-42 here", "What is the code in the image?", "K7Q-42"),
    ("zebra", "What word is shown?", "zebra"),
    ("a b\nc", "Read the text.", "a b c"),
    ("(no text found)", "What is the code?", ""),
])
def test_answer_from_lines(lines, q, out):
    assert answer_from_lines(lines, [], question=q).text == out


def test_zoom_box_finds_small_frame(tmp_path, monkeypatch):
    monkeypatch.setenv("MAESTRO_HOME", str(tmp_path / "home"))
    im = Image.new("RGB", (2400, 1600), "white")
    d = ImageDraw.Draw(im)
    rng = np.random.default_rng(0)
    for _ in range(30):  # faint clutter
        x, y = rng.integers(0, 2300, 2)
        d.line((int(x), int(y), int(x) + 80, int(y) + 40), fill=(200, 200, 200), width=2)
    d.rectangle((1700, 1200, 1820, 1250), outline="black", width=3)
    d.text((1712, 1212), "Q7-88", font=font(18), fill="black")
    p = tmp_path / "big.png"
    im.save(p)
    out = TOOLS["zoom_box"]("", [p])
    assert out.images and out.confidence == 1.0
    crop = Image.open(out.images[0])
    assert 250 < crop.width < 400 and 100 < crop.height < 160  # the frame's inside, upscaled x3
    assert TOOLS["zoom_box"]("", [p]).images == out.images  # content-addressed


def test_zoom_box_without_frame(tmp_path):
    p = tmp_path / "blank.png"
    Image.new("RGB", (300, 200), "white").save(p)
    out = TOOLS["zoom_box"]("", [p])
    assert out.images is None and out.confidence == 0.0


def test_bare_call_dispatches_among_runnable_solvers(registry_dict):
    registry_dict["skills"][0]["solvers"].append(
        {"name": "llm_only", "requires": ["text"], "steps": [{"prompt": "{input}"}]})
    registry_dict["skills"][0]["default_solver"] = "llm_only"
    reg = parse_registry(registry_dict)
    from maestro_core.protocol import Call
    from maestro_core.skills import resolve_solver
    assert reg.compatible("calc", "math") and not reg.compatible("calc", "math", "llm_only")
    assert resolve_solver(reg, Call("calc", "math", None, "1+1")).name == "calculator"
    assert resolve_solver(reg, Call("llm", "math", None, "1+1")).name == "llm_only"
