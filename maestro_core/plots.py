"""Evaluation plots, drawn from a metrics dict (the content of metrics.json) into PNG files.

    write_plots(metrics, out_dir)              # -> ["pareto.png", "benchmark_accuracy.png", "routing_heatmap.png"]
    pareto_plot(metrics, "pareto.png")         # accuracy vs cost per task, Pareto frontier
    benchmark_bars(metrics, "bench.png")       # per-benchmark accuracy, grouped bars
    routing_heatmap(metrics, "routing.png")    # benchmark x expert@@skill share of the calls

Every function writes a readable PNG whatever the systems are (even one, even without routes):
what it cannot show it says in the figure. Figures are drawn on matplotlib's Agg canvas through
the object API (no pyplot): no display, no global state, safe in worker threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox

PLOT_FILES = ("pareto.png", "benchmark_accuracy.png", "routing_heatmap.png")
DPI = 120
MAX_BAR_SYSTEMS = 8
"""benchmark_bars shows at most this many systems by accuracy (plus every policy system)."""
MAX_HEATMAP_PANELS = 4

KIND_STYLE = {
    "policy": {"color": "#d62728", "marker": "*", "s": 260, "label": "policy"},
    "oracle": {"color": "#ff9f1c", "marker": "D", "s": 90, "label": "oracle (per-item best pair)"},
    "router": {"color": "#1f77b4", "marker": "s", "s": 75, "label": "per-query router"},
    "random": {"color": "#444444", "marker": "X", "s": 90, "label": "random pair"},
    "single": {"color": "#9a9a9a", "marker": "o", "s": 55, "label": "single expert@@skill"},
    "other": {"color": "#2ca02c", "marker": "^", "s": 75, "label": "other"},
}
_KIND_PRIORITY = {"policy": 0, "oracle": 1, "router": 2, "random": 3, "other": 4, "single": 5}


def write_plots(metrics: Mapping, out: str | Path) -> list[str]:
    """Write the three plots into `out`; returns their file names (relative to `out`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pareto_plot(metrics, out / PLOT_FILES[0])
    benchmark_bars(metrics, out / PLOT_FILES[1])
    routing_heatmap(metrics, out / PLOT_FILES[2])
    return list(PLOT_FILES)


def kind_of(name: str) -> str:
    if name.startswith("policy"):
        return "policy"
    if name == "oracle":
        return "oracle"
    if name.startswith("router:"):
        return "router"
    if name == "random":
        return "random"
    if name.startswith("expert:"):
        return "single"
    return "other"


def short_name(name: str) -> str:
    """The label of a system in the plots: single pairs without their 'expert:' prefix."""
    return name[len("expert:"):] if name.startswith("expert:") else name


def _subtitle(metrics: Mapping) -> str:
    parts = [f"split {metrics.get('split', '?')}", f"{metrics.get('n_items', '?')} items"]
    if metrics.get("checkpoint") not in (None, "none"):
        parts.append(f"checkpoint {metrics['checkpoint']}")
    return ", ".join(parts)


def _figure(w: float, h: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white")
    return path


def _empty(ax, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="#555555", transform=ax.transAxes,
            wrap=True)


# ---------------------------------------------------------------------------------------
# accuracy vs cost
# ---------------------------------------------------------------------------------------

def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost, accuracy) points, by increasing cost: each one is
    strictly more accurate than every cheaper-or-equal point."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    out, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            out.append(i)
            best = points[i][1]
    return out


def pareto_plot(metrics: Mapping, path: str | Path) -> Path:
    """Accuracy against cost per task: one labelled point per system, the Pareto frontier as a
    staircase, log-x when the costs span more than a decade."""
    systems = metrics.get("systems", {})
    names = list(systems)
    fig = _figure(11, 7)
    fig.subplots_adjust(left=0.08, right=0.97, top=0.86, bottom=0.1)
    ax = fig.add_subplot()
    fig.suptitle(f"Accuracy vs cost per task ({_subtitle(metrics)})", fontsize=14, y=0.98)
    if not names:
        _empty(ax, "no systems were evaluated")
        return _save(fig, path)

    cost = np.array([float(systems[n].get("cost_per_task", 0.0)) for n in names])
    acc = np.array([float(systems[n].get("accuracy", 0.0)) for n in names])
    positive = cost[cost > 0]
    log_x = positive.size > 0 and positive.max() / positive.min() > 10
    x = cost.copy()
    if log_x:
        floor = positive.min() / 3
        x[cost <= 0] = floor  # free systems sit at the left edge
        ax.set_xscale("log")
        ax.set_xlim(x.min() / 2.5, x.max() * 6)  # room on the right for the labels of the dearest systems
        xlabel = "cost per task ($, log scale)" + (f"; free systems drawn at ${floor:.2g}" if (cost <= 0).any() else "")
    else:
        lo, hi = float(x.min()), float(x.max())
        pad = (hi - lo) * 0.12 or max(hi * 0.5, 1e-4)
        ax.set_xlim(lo - pad, hi + 2 * pad)
        xlabel = "cost per task ($)"
    ax.set_ylim(-0.05, 1.08)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel("accuracy", fontsize=11)
    ax.grid(True, which="major", color="#dddddd", linewidth=0.8)
    ax.grid(True, which="minor", color="#f0f0f0", linewidth=0.5)
    ax.set_axisbelow(True)

    front = pareto_frontier(list(zip(x.tolist(), acc.tolist())))
    fx, fy = [x[i] for i in front], [acc[i] for i in front]
    fx.append(ax.get_xlim()[1])
    fy.append(fy[-1])
    ax.plot(fx, fy, drawstyle="steps-post", color="#2ca02c", linewidth=1.8, alpha=0.8, zorder=1)

    kinds = [kind_of(n) for n in names]
    for k in KIND_STYLE:
        idx = [i for i, kk in enumerate(kinds) if kk == k]
        if idx:
            st = KIND_STYLE[k]
            ax.scatter(x[idx], acc[idx], c=st["color"], marker=st["marker"], s=st["s"], edgecolors="black",
                       linewidths=0.6, zorder=3)
    # systems at the same point (the oracle and a perfect router) share one label
    groups: dict[tuple[float, float], list[int]] = {}
    for i in range(len(names)):
        groups.setdefault((float(x[i]), float(acc[i])), []).append(i)
    on_front = set(front)

    def rank(i: int) -> tuple:
        return _KIND_PRIORITY[kinds[i]], i not in on_front, -acc[i]

    heads = []
    labels = [""] * len(names)
    for members in groups.values():
        members.sort(key=rank)
        heads.append(members[0])
        labels[members[0]] = " = ".join(short_name(names[i]) for i in members)
    priority = sorted(heads, key=rank)
    _place_labels(fig, ax, x, acc, labels, priority, bold={i for i in heads if kinds[i] != "single"})

    handles = [Line2D([], [], linestyle="", marker=KIND_STYLE[k]["marker"], color=KIND_STYLE[k]["color"],
                      markeredgecolor="black", markersize=9 if k != "policy" else 13, label=KIND_STYLE[k]["label"])
               for k in KIND_STYLE if k in kinds]
    handles.append(Line2D([], [], color="#2ca02c", linewidth=1.8, label="Pareto frontier"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=len(handles), frameon=False,
              fontsize=9.5, handletextpad=0.3, columnspacing=1.2)
    return _save(fig, path)


def _place_labels(fig: Figure, ax, x, y, labels: Sequence[str], order: Sequence[int], bold: set[int]) -> None:
    """Greedy label placement: each label (in `order`) takes the first candidate position that
    overlaps no placed label and no marker and stays inside the axes; failing that, the
    position with the least overlap. Far positions get a leader line."""
    renderer = fig.canvas.get_renderer()
    trans = ax.transData
    pts = trans.transform(np.column_stack([x, y]))
    r = 7.0
    markers = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in pts]
    frame = ax.get_window_extent(renderer)
    placed: list[Bbox] = []
    near = [(8, 5, "left", "bottom"), (8, -5, "left", "top"), (-8, 5, "right", "bottom"),
            (-8, -5, "right", "top"), (0, 10, "center", "bottom"), (0, -11, "center", "top"),
            (11, 0, "left", "center"), (-11, 0, "right", "center")]
    candidates = [(dx * f, dy * f, ha, va) for f in (1, 2.2, 3.6, 5.2) for dx, dy, ha, va in near]

    def overlap(bb: Bbox, own: int) -> float:
        area = 0.0
        for other in placed + [m for j, m in enumerate(markers) if j != own]:
            inter = Bbox.intersection(bb, other)
            if inter is not None:
                area += inter.width * inter.height
        inside = Bbox.intersection(bb, frame)
        outside = bb.width * bb.height - (inside.width * inside.height if inside is not None else 0.0)
        return area + 4 * outside

    for i in order:
        best = None
        for k, (dx, dy, ha, va) in enumerate(candidates):
            ann = ax.annotate(labels[i], (x[i], y[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              fontsize=9, fontweight="bold" if i in bold else "normal", zorder=4,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})
            bb = ann.get_window_extent(renderer).expanded(1.04, 1.1)
            score = overlap(bb, i)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, ann, bb, k)
            else:
                ann.remove()
            if score == 0:
                break
        _, ann, bb, k = best
        if k >= len(near):  # far from its point: draw a leader line
            ann.remove()
            dx, dy, ha, va = candidates[k]
            ann = ax.annotate(labels[i], (x[i], y[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              fontsize=9, fontweight="bold" if i in bold else "normal", zorder=4,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75},
                              arrowprops={"arrowstyle": "-", "color": "#888888", "linewidth": 0.7,
                                          "shrinkA": 0, "shrinkB": 4})
        placed.append(bb)


# ---------------------------------------------------------------------------------------
# per-benchmark accuracy
# ---------------------------------------------------------------------------------------

def bar_systems(systems: Mapping[str, Mapping], limit: int = MAX_BAR_SYSTEMS) -> list[str]:
    """The systems benchmark_bars shows, best first: the `limit` most accurate plus every
    system whose name starts with 'policy'."""
    ranked = sorted(systems, key=lambda n: (-float(systems[n].get("accuracy", 0.0)), n))
    keep = set(ranked[:limit]) | {n for n in systems if n.startswith("policy")}
    return [n for n in ranked if n in keep]


def benchmark_bars(metrics: Mapping, path: str | Path) -> Path:
    """Per-benchmark accuracy as grouped bars (one group per benchmark, plus 'overall')."""
    systems = metrics.get("systems", {})
    shown = bar_systems(systems)
    benches = sorted({b for n in shown for b in systems[n].get("per_benchmark", {})})
    groups = benches + ["overall"]
    fig = _figure(max(9.0, 1.6 + len(groups) * (0.5 + 0.22 * len(shown))), 5.8, layout="constrained")
    ax = fig.add_subplot()
    more = f"; the {len(shown)} most accurate of {len(systems)} systems" if len(shown) < len(systems) else ""
    ax.set_title(f"Accuracy per benchmark ({_subtitle(metrics)}{more})", fontsize=13, pad=12)
    if not shown:
        _empty(ax, "no systems were evaluated")
        return _save(fig, path)
    width = 0.84 / len(shown)
    cmap = colormaps["tab10"] if len(shown) <= 10 else colormaps["tab20"]
    base = np.arange(len(groups), dtype=float)
    for j, name in enumerate(shown):
        m = systems[name]
        vals = [float(m.get("per_benchmark", {}).get(b, np.nan)) for b in benches] + [float(m.get("accuracy", 0.0))]
        policy = name.startswith("policy")
        color = KIND_STYLE["policy"]["color"] if policy and sum(n.startswith("policy") for n in shown) == 1 \
            else cmap(j % cmap.N)
        bars = ax.bar(base - 0.42 + width * (j + 0.5), vals, width * 0.92, color=color,
                      edgecolor="black" if policy else "none", linewidth=1.2 if policy else 0,
                      hatch="//" if policy else None, label=f"{short_name(name)} ({m.get('accuracy', 0.0):.2f})",
                      zorder=3)
        if len(shown) <= 4:
            ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.axvline(len(benches) - 0.5, color="#bbbbbb", linewidth=1, linestyle="--")
    ax.set_xticks(base, groups, fontsize=10.5)
    for t in ax.get_xticklabels()[-1:]:
        t.set_fontweight("bold")
    ax.set_xlim(-0.55, len(groups) - 0.45)
    ax.set_ylim(0, 1.05)
    ax.set_yticks(np.linspace(0, 1, 11))
    ax.set_xlabel("benchmark", fontsize=11)
    ax.set_ylabel("accuracy", fontsize=11)
    ax.grid(True, axis="y", color="#e3e3e3")
    ax.set_axisbelow(True)
    ax.legend(title="system (overall accuracy)", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              fontsize=9.5, title_fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------

def heatmap_systems(systems: Mapping[str, Mapping], limit: int = MAX_HEATMAP_PANELS) -> list[str]:
    """The systems whose routing routing_heatmap shows: the policy systems when there are any,
    else the oracle and the routers, else the most accurate systems that recorded routes."""
    has = [n for n in systems if systems[n].get("routes_per_benchmark") or systems[n].get("routes")]
    policies = [n for n in has if n.startswith("policy")]
    if policies:
        return sorted(policies)[:limit]
    picked = [n for n in has if n == "oracle"] + sorted(n for n in has if n.startswith("router:"))
    if picked:
        return picked[:limit]
    return sorted(has, key=lambda n: (-float(systems[n].get("accuracy", 0.0)), n))[:limit]


def routing_table(m: Mapping) -> dict[str, dict[str, int]]:
    """benchmark -> route -> calls; a single 'all' row when only overall routes were recorded."""
    if m.get("routes_per_benchmark"):
        return {b: dict(c) for b, c in m["routes_per_benchmark"].items()}
    return {"all": dict(m["routes"])} if m.get("routes") else {}


def routing_heatmap(metrics: Mapping, path: str | Path) -> Path:
    """Benchmark x expert@@skill share of each benchmark's calls, one panel per system (the
    policy systems, else the oracle and the routers; up to MAX_HEATMAP_PANELS)."""
    systems = metrics.get("systems", {})
    shown = heatmap_systems(systems)
    tables = {n: routing_table(systems[n]) for n in shown}
    rows = sorted({b for t in tables.values() for b in t})
    cols = sorted({r for t in tables.values() for c in t.values() for r in c})
    if not shown or not cols:
        fig = _figure(8, 3, layout="constrained")
        ax = fig.add_subplot()
        fig.suptitle(f"Routing ({_subtitle(metrics)})", fontsize=13)
        _empty(ax, "no routes were recorded for the evaluated systems")
        return _save(fig, path)

    cell_w, cell_h = 0.62, 0.42
    panel_h = 0.9 + cell_h * len(rows)
    fig = _figure(max(7.5, 2.8 + cell_w * len(cols)), 1.2 + panel_h * len(shown) + 1.6, layout="constrained")
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(f"Routing: share of each benchmark's expert calls per expert@@skill\n({_subtitle(metrics)})",
                 fontsize=13)
    cmap = colormaps["Blues"]
    im = None
    for ax, name in zip(axes, shown):
        t = tables[name]
        counts = np.array([[t.get(b, {}).get(c, 0) for c in cols] for b in rows], dtype=float)
        totals = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        im = ax.imshow(share, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for r in range(len(rows)):
            for c in range(len(cols)):
                if counts[r, c] > 0:
                    pct = "<1%" if share[r, c] < 0.005 else f"{100 * share[r, c]:.0f}%"
                    ax.text(c, r, pct, ha="center", va="center", fontsize=8.5,
                            color="white" if share[r, c] > 0.55 else "#1a1a1a")
        m = systems[name]
        ax.set_title(f"{short_name(name)}: accuracy {m.get('accuracy', 0.0):.2f}, "
                     f"{m.get('calls_per_task', 0.0):.2f} calls/task", fontsize=11, loc="left")
        ax.set_yticks(range(len(rows)), [f"{b} ({int(totals[i, 0])})" for i, b in enumerate(rows)], fontsize=9.5)
        ax.set_ylabel("benchmark (calls)", fontsize=10)
        ax.set_xticks(np.arange(len(cols) + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(len(rows) + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
    axes[-1].set_xticks(range(len(cols)), cols, rotation=40, ha="right", rotation_mode="anchor", fontsize=9.5)
    axes[-1].set_xlabel("expert@@skill", fontsize=10)
    cb = fig.colorbar(im, ax=list(axes), fraction=0.035, pad=0.01, aspect=30)
    cb.set_label("share of the benchmark's calls", fontsize=10)
    return _save(fig, path)


def training_curve_plot(curve: Sequence[Mapping], path: str | Path, *, title: str = "") -> Path:
    """Training curves, one row per iteration of `curve.json`: mean reward and train accuracy,
    validation accuracy (where validated), calls and cost per task, and the GRPO loss."""
    fig = _figure(11, 7, layout="constrained")
    axes = fig.subplots(2, 2)
    it = [r["iteration"] for r in curve]

    def series(key):
        pts = [(r["iteration"], r[key]) for r in curve if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    ax = axes[0][0]
    for key, label in (("mean_reward", "mean reward (train episodes)"), ("accuracy", "accuracy (train episodes)")):
        ax.plot(*series(key), marker=".", label=label)
    ax.set_title("reward")
    ax = axes[0][1]
    x, y = series("val_accuracy")
    ax.plot(x, y, marker="o", color="tab:green", label="validation accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.set_title("validation")
    ax = axes[1][0]
    ax.plot(*series("calls_per_task"), marker=".", label="calls per task (train)")
    x, y = series("val_calls_per_task")
    ax.plot(x, y, marker="o", label="calls per task (validation)")
    ax2 = ax.twinx()
    ax2.plot(*series("cost_per_task"), marker=".", color="tab:red", label="cost per task $ (train)")
    ax2.set_ylabel("$ per task")
    ax.set_title("calls and cost")
    ax2.legend(loc="upper right", fontsize=8)
    ax = axes[1][1]
    ax.plot(*series("loss"), marker=".", color="tab:gray", label="GRPO loss")
    ax.set_title("loss")
    for row in axes:
        for a in row:
            a.set_xlabel("iteration")
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(loc="upper left", fontsize=8)
            if not it:
                _empty(a, "no iterations yet")
    fig.suptitle(title or "training curves")
    return _save(fig, path)


def cost_knob_plot(points: Sequence[Mapping], baselines: Mapping[str, Mapping], path: str | Path, *,
                   title: str = "", curve_label: str = "policy (one checkpoint)",
                   more_curves: Mapping[str, Sequence[Mapping]] | None = None) -> Path:
    """The request-time cost knob: the policy's accuracy against cost per task at each setting
    (`points`: dicts with label, accuracy, cost_per_task), joined in order, beside the
    baselines' points (name -> metrics with accuracy and cost_per_task); log-x. `more_curves`:
    further curves (label -> points, unannotated), drawn dashed."""
    fig = _figure(9, 6)
    ax = fig.add_subplot()
    fig.suptitle(title or "Accuracy vs cost per task at each request-time setting", fontsize=13)
    if not points:
        _empty(ax, "no settings were evaluated")
        return _save(fig, path)
    xs = [max(float(p["cost_per_task"]), 1e-5) for p in points]
    ys = [float(p["accuracy"]) for p in points]
    ax.plot(xs, ys, "-o", color="#1f77b4", lw=2, ms=8, label=curve_label, zorder=3)
    for x, y, p in zip(xs, ys, points):
        ax.annotate(str(p["label"]), (x, y), textcoords="offset points", xytext=(8, -4), fontsize=10)
    for k, (label, curve) in enumerate((more_curves or {}).items()):
        ax.plot([max(float(p["cost_per_task"]), 1e-5) for p in curve], [float(p["accuracy"]) for p in curve], "--",
                marker=".", color=("#ff7f0e", "#2ca02c", "#9467bd")[k % 3], lw=1.5, label=label, zorder=2)
    for name, m in baselines.items():
        x, y = max(float(m.get("cost_per_task", 0.0)), 1e-5), float(m.get("accuracy", 0.0))
        ax.plot([x], [y], "s", color="#7f7f7f", ms=7, zorder=2)
        ax.annotate(short_name(name), (x, y), textcoords="offset points", xytext=(8, 4), fontsize=9,
                    color="#444444")
    ax.set_xscale("log")
    ax.set_xlabel("cost per task $ (log)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)
