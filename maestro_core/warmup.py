"""Warm-up: load every expert, send each a few real probe requests, and measure it.

    experts = build_experts(registry)
    stats = await warm_up(registry, experts, store)        # list[ExpertStats]
    print(format_stats_table(stats))

Probes are chosen by the expert's capabilities, cycling over those it has:

- "ocr": a rendered line of text (DejaVu Sans) and "Read the text in the image.";
- "digit": a rendered digit and "Which digit is this?";
- "arithmetic": a short expression ("What is 17 + 25?");
- "text" (and any other capability): a short question for a language model.

Each probe runs alone (one at a time, so latencies are not inflated by batching or by other
experts), after the expert's `load()`. The measurements (latency p50/p95 of the replies'
`latency_s`, mean tokens in/out, mean cost per call) are stored with
`store.record_expert_stats(registry.version, ...)`; the registry file is never changed.
An expert that cannot load, or fails or answers an empty text to a probe, stops the warm-up
with an ExpertError naming it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from maestro_core.errors import ExpertError
from maestro_core.experts.base import ExpertBackend
from maestro_core.registry import Registry

PROBE_ORDER = ("ocr", "digit", "arithmetic", "text")


@dataclass(frozen=True)
class Probe:
    """One probe request and what a correct answer contains (for information only)."""

    kind: str
    prompt: str
    expected: str
    image: str | None = None
    """Text to render into the probe's image (a digit for "digit"), None for text probes."""


PROBES: dict[str, tuple[Probe, ...]] = {
    "ocr": (Probe("ocr", "Read the text in the image.", "Maestro", "Maestro 42"),
            Probe("ocr", "Read the text in the image.", "invoice", "Total invoice 318"),
            Probe("ocr", "Read the text in the image.", "station", "Meet at the station")),
    "digit": (Probe("digit", "Which digit is this?", "7", "7"),
              Probe("digit", "Which digit is this?", "3", "3"),
              Probe("digit", "Which digit is this?", "5", "5")),
    "arithmetic": (Probe("arithmetic", "What is 17 + 25?", "42"),
                   Probe("arithmetic", "What is 6 * 7?", "42"),
                   Probe("arithmetic", "What is 100 - 58?", "42")),
    "text": (Probe("text", "What is the capital of France? Answer in one word.", "Paris"),
             Probe("text", "Name a color of the sky on a clear day. Answer in one word.", "blue"),
             Probe("text", "How many legs does a cat have? Answer with a number.", "4")),
}


@dataclass(frozen=True)
class ExpertStats:
    """What the warm-up measured for one expert."""

    expert: str
    n: int
    """Number of probe calls."""
    load_s: float
    latency_p50_s: float
    latency_p95_s: float
    tokens_in_mean: float
    tokens_out_mean: float
    cost_per_call: float
    probe_kinds: tuple[str, ...]
    probe_accuracy: float
    """Fraction of probe replies containing the expected answer (information, not a gate)."""
    sample: str
    """The first reply's text, shortened."""


def probes_for(capabilities: frozenset[str] | set[str], n: int) -> list[Probe]:
    """`n` probes cycling over the probe kinds of these capabilities (text when none match)."""
    kinds = [k for k in PROBE_ORDER if k in capabilities] or ["text"]
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        pool = PROBES[kind]
        out.append(pool[(i // len(kinds)) % len(pool)])
    return out


def font_path(bold: bool = False) -> Path | None:
    """DejaVu Sans from matplotlib's bundled fonts (None if matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:
        return None
    p = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return p if p.exists() else None


def render_text_image(text: str, path: str | Path, *, size: int = 32, pad: int = 16,
                      fg: str | int = "black", bg: str | int = "white") -> Path:
    """Render `text` (lines split on newlines) into a PNG sized to fit; returns the path."""
    from PIL import Image, ImageDraw, ImageFont

    fp = font_path()
    font = ImageFont.truetype(str(fp), size) if fp else ImageFont.load_default(size)
    lines = text.split("\n")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), ln or " ", font=font) for ln in lines]
    line_h = int(size * 1.4)
    width = max(b[2] for b in boxes) + 2 * pad
    height = line_h * len(lines) + 2 * pad
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    for i, ln in enumerate(lines):
        draw.text((pad, pad + i * line_h), ln, font=font, fill=fg)
    path = Path(path)
    img.save(path)
    return path


def render_digit_image(digit: str, path: str | Path, *, size: int = 64) -> Path:
    """A dark digit centred on a light square, like a scanned form field."""
    from PIL import Image, ImageDraw, ImageFont

    fp = font_path()
    font = ImageFont.truetype(str(fp), int(size * 0.75)) if fp else ImageFont.load_default(int(size * 0.75))
    img = Image.new("L", (size, size), 255)
    ImageDraw.Draw(img).text((size / 2, size / 2), digit, font=font, fill=0, anchor="mm")
    path = Path(path)
    img.save(path)
    return path


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence."""
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


async def _load(name: str, backend: ExpertBackend) -> float:
    start = time.perf_counter()
    load = getattr(backend, "load", None)
    if load is not None:
        try:
            await load()
        except ExpertError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ExpertError(f"cannot load: {type(e).__name__}: {e}", expert=name) from e
    return time.perf_counter() - start


async def warm_up(registry: Registry, experts: Mapping[str, ExpertBackend], store: Any = None, *,
                  probes: int = 3) -> list[ExpertStats]:
    """Load every expert of `registry` (its backend from `experts`), send `probes` probe requests
    to each, record the measurements in `store` (if given) under `registry.version`, and return
    them in the registry's order. Raises ExpertError naming the first expert that cannot load
    or answer."""
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    missing = [n for n in registry.experts if n not in experts]
    if missing:
        raise ExpertError(f"no backend given for {missing}. Fix: pass build_experts(registry).",
                          expert=missing[0])
    results: list[ExpertStats] = []
    with tempfile.TemporaryDirectory(prefix="maestro-warmup-") as tmp:
        images: dict[Probe, Path] = {}

        def image_for(p: Probe) -> list[Path]:
            if p.image is None:
                return []
            if p not in images:
                path = Path(tmp) / f"probe-{len(images)}.png"
                images[p] = (render_digit_image(p.image, path) if p.kind == "digit"
                             else render_text_image(p.image, path))
            return [images[p]]

        for name, spec in registry.experts.items():
            backend = experts[name]
            load_s = await _load(name, backend)
            plan = probes_for(spec.capabilities, probes)
            replies = []
            for p in plan:
                try:
                    r = await backend.generate([{"role": "user", "content": p.prompt}], image_for(p))
                except ExpertError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise ExpertError(f"probe '{p.prompt}' failed: {type(e).__name__}: {e}", expert=name) from e
                if not r.text.strip():
                    raise ExpertError(f"answered an empty text to the probe '{p.prompt}'. Fix: check the "
                                      "model and its backend settings.", expert=name)
                replies.append(r)
            lat = [r.latency_s for r in replies]
            hits = sum(p.expected.lower() in r.text.lower() for p, r in zip(plan, replies))
            st = ExpertStats(
                expert=name, n=len(replies), load_s=load_s,
                latency_p50_s=_percentile(lat, 50), latency_p95_s=_percentile(lat, 95),
                tokens_in_mean=sum(r.tokens_in for r in replies) / len(replies),
                tokens_out_mean=sum(r.tokens_out for r in replies) / len(replies),
                cost_per_call=sum(r.cost for r in replies) / len(replies),
                probe_kinds=tuple(dict.fromkeys(p.kind for p in plan)),
                probe_accuracy=hits / len(replies),
                sample=" ".join(replies[0].text.split())[:60],
            )
            if store is not None:
                store.record_expert_stats(registry.version, name, latency_p50_s=st.latency_p50_s,
                                          latency_p95_s=st.latency_p95_s, tokens_in_mean=st.tokens_in_mean,
                                          tokens_out_mean=st.tokens_out_mean, cost_per_call=st.cost_per_call,
                                          n=st.n)
            results.append(st)
    return results


def format_stats_table(stats: Sequence[ExpertStats]) -> str:
    """A markdown table of the measurements."""
    head = ("| expert | probes | n | load s | p50 s | p95 s | tokens in | tokens out | cost/call | probe acc | sample |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = [
        f"| {s.expert} | {','.join(s.probe_kinds)} | {s.n} | {s.load_s:.2f} | {s.latency_p50_s:.3f} | "
        f"{s.latency_p95_s:.3f} | {s.tokens_in_mean:.1f} | {s.tokens_out_mean:.1f} | {s.cost_per_call:.3g} | "
        f"{s.probe_accuracy:.2f} | {s.sample.replace('|', '/')} |"
        for s in stats
    ]
    return "\n".join([head, *rows])
