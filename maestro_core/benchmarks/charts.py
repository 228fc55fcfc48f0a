"""Maestro-Mini `charts`: questions about bar and line charts of real tables.

Data: vega-datasets' local tables (cars, iris, seattle-weather, stocks, barley,
iowa-electricity, airports, us-employment, crimea, driving, sf-temps), each aggregated to 3-7
categories by a *recipe* (table, filter, grouping, value column, aggregate, categories) that is
kept in the item's side-table metadata, so anyone can recompute the chart from the table.

Images: 640x480 RGB PNG drawn with matplotlib (Agg, DejaVu Sans): a vertical bar chart, a
horizontal bar chart or (for months and years) a line chart with markers. Category names are
the axis tick labels (12 pt, horizontal, never rotated); every bar/point carries its value as
a text label (12 pt; integers, or one decimal when all values are below 100) above the bar or
point (vertical bars, lines) or right of the bar (horizontal bars). The value axis has no tick
numbers, so every number in the plot area is a value label; the title may contain a year.
No two labels overlap (checked on the drawn figure; a chart that fails is redrawn as
horizontal bars or with other categories).

Questions, cycling with the item index:
  - lookup:    "What is the value for Japan?"                        -> "79.8"      (numeric)
  - extremum:  "Which category has the highest value?" / "lowest"     -> "Europe"    (exact)
  - difference:"What is the difference between the values for USA and Japan (USA minus
                Japan)?" (the first is always the larger)             -> "39.6"      (numeric)
Answers come from the labels AS PRINTED (values rounded first, then compared or subtracted),
and the printed values of one chart are all different, so "highest" is never a tie.

What solves it: OCR of the rendered image (rapidocr or tesseract: labels are large and clean),
then pairing each value label with its category by position (same x for vertical bars and
lines, same y for horizontal bars), then a comparison or a subtraction (`calc`).
"""

from __future__ import annotations

import functools
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maestro_core.benchmarks._common import Progress, check_args, item_id, item_rng, png_bytes
from maestro_core.dataset import Item

BENCHMARK = "charts"
ID_PREFIX = "chart"
WIDTH, HEIGHT, DPI = 640, 480, 100
FONT_SIZE = 12
QUESTION_KINDS = ("lookup", "extremum", "difference")
CHART_TYPES = ("vbar", "hbar", "line")

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#2A9D8F", "#E76F51")

# --------------------------------------------------------------------------- tables and recipes


@functools.lru_cache(maxsize=None)
def load_table(name: str):
    """A vega-datasets table from the package's local copy (offline)."""
    import warnings

    from vega_datasets import local_data

    with warnings.catch_warnings():  # vega_datasets passes a keyword pandas deprecates
        warnings.simplefilter("ignore")
        return getattr(local_data, name.replace("-", "_"))()


def aggregate(recipe: dict[str, Any]) -> dict[str, float]:
    """category label -> aggregated value, in the recipe's category order.

    recipe keys: table; filters: list of [column, op, value] with op "eq" (equality) or
    "year" (the datetime column's year equals value); group: ["column", name] |
    ["month", datetime column] (labels Jan..Dec) | ["year", datetime column] (labels "2004") |
    ["wide", None] (categories are columns of the one filtered row); value: column or None
    (count rows); agg: mean | sum | count | max | min; categories: labels to keep, in order;
    rename: optional {raw group key or column: label}.
    """
    df = load_table(recipe["table"])
    for col, op, val in recipe.get("filters", ()):
        df = df[df[col] == val] if op == "eq" else df[df[col].dt.year == val]
    kind, col = recipe["group"]
    rename = recipe.get("rename") or {}
    if kind == "wide":
        if len(df) != 1:
            raise ValueError(f"wide recipe needs exactly one row, got {len(df)}")
        row = df.iloc[0]
        inv = {v: k for k, v in rename.items()}
        return {c: float(row[inv.get(c, c)]) for c in recipe["categories"]}
    if kind == "column":
        keys = df[col].astype(str).map(lambda k: rename.get(k, k))
    elif kind == "month":
        keys = df[col].dt.month.map(lambda m: MONTHS[m - 1])
    elif kind == "year":
        keys = df[col].dt.year.astype(str)
    else:
        raise ValueError(f"unknown group kind {kind!r}")
    grouped = df.assign(_key=keys.values).groupby("_key")
    agg = recipe["agg"]
    series = grouped.size() if agg == "count" else getattr(grouped[recipe["value"]], agg)()
    return {c: float(series[c]) for c in recipe["categories"] if c in series.index}


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def _window(rng: random.Random, labels: list[str], lo: int = 3, hi: int = 7) -> list[str]:
    k = rng.randint(lo, min(hi, len(labels)))
    s = rng.randint(0, len(labels) - k)
    return labels[s:s + k]


def _subset(rng: random.Random, labels: list[str], lo: int = 3, hi: int = 7) -> list[str]:
    k = rng.randint(lo, min(hi, len(labels)))
    chosen = set(rng.sample(labels, k))
    return [c for c in labels if c in chosen]


# Each family: rng -> (recipe, title, category-axis name, value name, ordered)

def _cars(rng):
    value = rng.choice(["Horsepower", "Miles_per_Gallon", "Weight_in_lbs", "Acceleration", "Displacement", None])
    year = rng.choice([None] + list(range(1970, 1983)))
    agg = "count" if value is None else "mean"
    filters = [] if year is None else [["Year", "year", year]]
    nice = {"Horsepower": "horsepower", "Miles_per_Gallon": "miles per gallon", "Weight_in_lbs": "weight (lbs)",
            "Acceleration": "acceleration", "Displacement": "displacement"}
    what = "Number of car models" if value is None else f"Mean {nice[value]}"
    title = f"{what} by origin" + (f", {year}" if year else "")
    recipe = dict(table="cars", filters=filters, group=["column", "Origin"], value=value, agg=agg,
                  categories=["USA", "Europe", "Japan"])
    return recipe, title, "Origin", what, False


def _iris(rng):
    value = rng.choice(["sepalLength", "sepalWidth", "petalLength", "petalWidth"])
    agg = rng.choice(["mean", "max", "min"])
    nice = {"sepalLength": "sepal length", "sepalWidth": "sepal width", "petalLength": "petal length",
            "petalWidth": "petal width"}[value]
    what = {"mean": "Mean", "max": "Maximum", "min": "Minimum"}[agg] + f" {nice} (cm)"
    recipe = dict(table="iris", filters=[], group=["column", "species"], value=value, agg=agg,
                  categories=["setosa", "versicolor", "virginica"])
    return recipe, f"{what} by iris species", "Species", what, False


def _weather_type(rng):
    year = rng.choice([None, 2012, 2013, 2014, 2015])
    value, agg, what = rng.choice([(None, "count", "Number of days"), ("temp_max", "mean", "Mean max temperature (C)"),
                                   ("wind", "mean", "Mean wind speed (m/s)"),
                                   ("precipitation", "sum", "Total precipitation (mm)")])
    filters = [] if year is None else [["date", "year", year]]
    cats = _subset(rng, ["drizzle", "rain", "sun", "snow", "fog"], 3, 5)
    recipe = dict(table="seattle-weather", filters=filters, group=["column", "weather"], value=value, agg=agg,
                  categories=cats)
    return recipe, f"Seattle: {_lower_first(what)} by weather" + (f", {year}" if year else ""), "Weather", what, False


def _weather_month(rng):
    year = rng.choice([2012, 2013, 2014, 2015])
    value, agg, what = rng.choice([("temp_max", "mean", "Mean max temperature (C)"),
                                   ("precipitation", "sum", "Total precipitation (mm)"),
                                   ("wind", "mean", "Mean wind speed (m/s)")])
    recipe = dict(table="seattle-weather", filters=[["date", "year", year]], group=["month", "date"], value=value,
                  agg=agg, categories=_window(rng, list(MONTHS)))
    return recipe, f"Seattle {year}: {_lower_first(what)} by month", "Month", what, True


def _stocks_symbol(rng):
    year = rng.randint(2000, 2009)
    cats = ["MSFT", "AMZN", "IBM", "AAPL"] + (["GOOG"] if year >= 2005 else [])
    cats = _subset(rng, cats, 3, 5)
    recipe = dict(table="stocks", filters=[["date", "year", year]], group=["column", "symbol"], value="price",
                  agg="mean", categories=cats)
    return recipe, f"Mean monthly stock price (USD) by company, {year}", "Company", "Mean price (USD)", False


def _stock_month(rng):
    symbol = rng.choice(["MSFT", "AMZN", "IBM", "AAPL", "GOOG"])
    year = rng.randint(2005 if symbol == "GOOG" else 2000, 2009)
    recipe = dict(table="stocks", filters=[["symbol", "eq", symbol], ["date", "year", year]], group=["month", "date"],
                  value="price", agg="mean", categories=_window(rng, list(MONTHS)))
    return recipe, f"{symbol} stock price (USD) by month, {year}", "Month", "Price (USD)", True


def _barley_site(rng):
    year = rng.choice([1931, 1932])
    agg = rng.choice(["sum", "mean"])
    cats = _subset(rng, ["University Farm", "Waseca", "Morris", "Crookston", "Grand Rapids", "Duluth"], 3, 6)
    what = {"sum": "Total", "mean": "Mean"}[agg] + " barley yield (bushels/acre)"
    recipe = dict(table="barley", filters=[["year", "eq", year]], group=["column", "site"], value="yield", agg=agg,
                  categories=cats)
    return recipe, f"{what} by site, {year}", "Site", what, False


def _barley_variety(rng):
    year = rng.choice([1931, 1932])
    site = rng.choice(["University Farm", "Waseca", "Morris", "Crookston", "Grand Rapids", "Duluth"])
    cats = _subset(rng, ["Manchuria", "Glabron", "Svansota", "Velvet", "Trebi", "No. 457", "No. 462", "Peatland",
                         "No. 475", "Wisconsin No. 38"], 3, 6)
    recipe = dict(table="barley", filters=[["year", "eq", year], ["site", "eq", site]], group=["column", "variety"],
                  value="yield", agg="sum", categories=cats)
    return recipe, f"Barley yield (bushels/acre) at {site}, {year}", "Variety", "Yield", False


def _iowa_source(rng):
    year = rng.randint(2001, 2017)
    recipe = dict(table="iowa-electricity", filters=[["year", "year", year]], group=["column", "source"],
                  value="net_generation", agg="sum", categories=["Fossil Fuels", "Nuclear Energy", "Renewables"])
    return recipe, f"Iowa net electricity generation (GWh) by source, {year}", "Source", "Net generation (GWh)", False


def _iowa_year(rng):
    source = rng.choice(["Fossil Fuels", "Nuclear Energy", "Renewables"])
    recipe = dict(table="iowa-electricity", filters=[["source", "eq", source]], group=["year", "year"],
                  value="net_generation", agg="sum", categories=_window(rng, [str(y) for y in range(2001, 2018)]))
    return recipe, f"Iowa net generation (GWh) from {source.lower()}", "Year", "Net generation (GWh)", True


_STATES = ["AK", "TX", "CA", "OK", "FL", "OH", "NY", "GA", "MI", "MN", "IL", "WI", "KS", "IA", "AR", "MO", "NE",
           "PA", "LA", "AL"]


def _airports(rng):
    recipe = dict(table="airports", filters=[], group=["column", "state"], value=None, agg="count",
                  categories=_subset(rng, _STATES, 3, 7))
    return recipe, "Number of airports by US state", "State", "Airports", False


_SECTORS = {"construction": "Construction", "manufacturing": "Manufacturing", "information": "Information",
            "utilities": "Utilities", "government": "Government", "mining_and_logging": "Mining",
            "retail_trade": "Retail", "wholesale_trade": "Wholesale", "financial_activities": "Finance",
            "leisure_and_hospitality": "Leisure", "other_services": "Other services"}


def _employment(rng):
    months = sorted(load_table("us-employment")["month"].unique())
    month = rng.choice(months)
    cats = _subset(rng, list(_SECTORS.values()), 3, 6)
    y, m = str(month)[:4], int(str(month)[5:7])
    recipe = dict(table="us-employment", filters=[["month", "eq", month]], group=["wide", None], value=None,
                  agg="wide", categories=cats, rename=_SECTORS)
    return recipe, f"US employment (thousands) by sector, {MONTHS[m - 1]} {y}", "Sector", "Employees (thousands)", False


def _crimea(rng):
    dates = list(load_table("crimea")["date"])
    date = rng.choice(dates)
    recipe = dict(table="crimea", filters=[["date", "eq", date]], group=["wide", None], value=None, agg="wide",
                  categories=["disease", "wounds", "other"])
    return (recipe, f"Crimean War deaths by cause, {MONTHS[date.month - 1]} {date.year}", "Cause", "Deaths", False)


def _driving(rng):
    years = [str(y) for y in load_table("driving")["year"]]
    recipe = dict(table="driving", filters=[], group=["column", "year"], value="miles", agg="sum",
                  categories=_window(rng, years))
    return recipe, "Miles driven per capita per year (US)", "Year", "Miles per capita", True


def _sf_temps(rng):
    recipe = dict(table="sf-temps", filters=[], group=["month", "date"], value="temp", agg="mean",
                  categories=_window(rng, list(MONTHS)))
    return recipe, "San Francisco mean temperature (F) by month, 2010", "Month", "Mean temperature (F)", True


FAMILIES = (_cars, _iris, _weather_type, _weather_month, _stocks_symbol, _stock_month, _barley_site,
            _barley_variety, _iowa_source, _iowa_year, _airports, _employment, _crimea, _driving, _sf_temps)


def _jsonable(recipe: dict[str, Any]) -> dict[str, Any]:
    out = dict(recipe)
    out["filters"] = [[c, op, (v.isoformat() if hasattr(v, "isoformat") else v)] for c, op, v in recipe["filters"]]
    return out


def decimals_for(values: list[float], agg: str) -> int:
    """0 for counts, whole numbers, and when every value is >= 100 in size; else 1."""
    whole = all(float(v).is_integer() for v in values)
    return 0 if agg == "count" or whole or all(abs(v) >= 100 for v in values) else 1


def format_value(v: float, decimals: int) -> str:
    return f"{v:.{decimals}f}"


# --------------------------------------------------------------------------- rendering


def render_chart(chart_type: str, title: str, cat_axis: str, value_name: str, categories: list[str],
                 labels: list[str], color: str, font_size: int = FONT_SIZE) -> tuple[bytes, list[str], bool]:
    """Draw the chart. Returns (PNG bytes, the texts drawn as value labels, layout_ok) where
    layout_ok says that no two texts overlap and every text lies inside the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = [float(x) for x in labels]
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    top = max(values)
    drawn = []
    box = dict(facecolor="white", edgecolor="none", pad=1.0)
    if chart_type == "hbar":
        pos = list(range(len(categories)))[::-1]  # first category on top
        ax.barh(pos, values, color=color, height=0.6)
        ax.set_yticks(pos, categories, fontsize=font_size)
        ax.set_xlim(0, top * 1.22)
        ax.set_ylim(-0.6, len(categories) - 0.4)
        for p, v, s in zip(pos, values, labels):
            ax.annotate(s, (v, p), xytext=(4, 0), textcoords="offset points", ha="left", va="center",
                        fontsize=font_size)
            drawn.append(s)
        ax.set_xticks([])
        ax.set_ylabel(cat_axis, fontsize=font_size - 1)
        ax.set_xlabel(value_name, fontsize=font_size - 1)
        ax.spines[["top", "right", "bottom"]].set_visible(False)
    else:
        pos = list(range(len(categories)))
        if chart_type == "vbar":
            ax.bar(pos, values, color=color, width=0.6)
            ax.set_ylim(0, top * 1.18)
            offset = 3
        else:
            ax.plot(pos, values, color=color, marker="o", linewidth=2, markersize=6)
            lo = min(values)
            span = (top - lo) or abs(top) or 1.0
            ax.set_ylim(lo - 0.25 * span, top + 0.35 * span)
            ax.set_xlim(-0.5, len(categories) - 0.5)
            offset = 8
        for p, v, s in zip(pos, values, labels):
            ax.annotate(s, (p, v), xytext=(0, offset), textcoords="offset points", ha="center", va="bottom",
                        fontsize=font_size, bbox=box if chart_type == "line" else None)
            drawn.append(s)
        ax.set_xticks(pos, categories, fontsize=font_size)
        ax.set_yticks([])
        ax.set_xlabel(cat_axis, fontsize=font_size - 1)
        ax.set_ylabel(value_name, fontsize=font_size - 1)
        ax.spines[["top", "right", "left"]].set_visible(False)
    ax.set_title(title, fontsize=font_size + 1)
    fig.tight_layout()
    fig.canvas.draw()
    ok = _layout_ok(fig)
    rgba = np.asarray(fig.canvas.buffer_rgba())
    img = Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "RGB")  # opaque white figure: drop alpha
    return png_bytes(img), drawn, ok


def _layout_ok(fig) -> bool:
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for b in boxes:
        if b.x0 < 0 or b.y0 < 0 or b.x1 > WIDTH or b.y1 > HEIGHT:
            return False
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            if a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1:
                return False
    return True


# --------------------------------------------------------------------------- items


def make_chart(seed: int, index: int) -> dict[str, Any]:
    """Everything about chart item `index` except the PNG: recipe, categories, printed labels,
    chart type, question, answer, scorer. Pure function of (seed, index)."""
    rng = item_rng(seed, BENCHMARK, index)
    kind = QUESTION_KINDS[index % len(QUESTION_KINDS)]
    for _ in range(100):
        family = rng.choice(FAMILIES)
        recipe, title, cat_axis, value_name, ordered = family(rng)
        table = aggregate(recipe)
        cats = [c for c in recipe["categories"] if c in table]
        if len(cats) < 3:
            continue
        values = [table[c] for c in cats]
        if any(v <= 0 for v in values):
            continue
        d = decimals_for(values, recipe["agg"])
        labels = [format_value(v, d) for v in values]
        if len(set(labels)) != len(labels):
            continue  # a tie after rounding: "highest" would be ambiguous
        break
    else:  # pragma: no cover
        raise RuntimeError(f"chart item {index}: no usable table in 100 draws")
    recipe = dict(recipe, categories=cats)
    types = ["line", "vbar"] if ordered else ["vbar", "hbar"]
    chart_type = rng.choice(types)
    printed = [Decimal(s) for s in labels]
    if kind == "lookup":
        c = rng.randrange(len(cats))
        question, answer, scorer = f"What is the value for {cats[c]}?", labels[c], "numeric"
    elif kind == "extremum":
        highest = rng.random() < 0.5
        pick = printed.index(max(printed) if highest else min(printed))
        question = f"Which category has the {'highest' if highest else 'lowest'} value?"
        answer, scorer = cats[pick], "exact"
    else:
        a, b = rng.sample(range(len(cats)), 2)
        if printed[a] < printed[b]:
            a, b = b, a
        diff = (printed[a] - printed[b]).quantize(Decimal(1).scaleb(-d))
        question = (f"What is the difference between the values for {cats[a]} and {cats[b]} "
                    f"({cats[a]} minus {cats[b]})?")
        answer, scorer = str(diff), "numeric"
    return {"recipe": _jsonable(recipe), "title": title, "category_axis": cat_axis, "value_name": value_name,
            "categories": cats, "values": values, "labels": labels, "decimals": d, "chart_type": chart_type,
            "color": rng.choice(COLORS), "kind": kind, "question": question, "answer": answer, "scorer": scorer}


def generate_with_meta(n: int, seed: int, image_dir: Path, *, start: int = 0,
                       progress: Progress | None = None) -> list[tuple[Item, dict[str, Any]]]:
    """Items start..start+n-1 with their side-table metadata (the chart's data and recipe)."""
    check_args(n, start)
    image_dir = Path(image_dir)
    out = []
    for k, i in enumerate(range(start, start + n)):
        spec = make_chart(seed, i)
        png, ok = None, False
        for chart_type, size in ((spec["chart_type"], FONT_SIZE), ("hbar", FONT_SIZE), ("hbar", FONT_SIZE - 1)):
            if chart_type == "hbar" and spec["chart_type"] == "line":
                chart_type = "vbar"
            png, _, ok = render_chart(chart_type, spec["title"], spec["category_axis"], spec["value_name"],
                                      spec["categories"], spec["labels"], spec["color"], size)
            if ok:
                spec = dict(spec, chart_type=chart_type, font_size=size)
                break
        if not ok:  # pragma: no cover - the families above always fit
            raise RuntimeError(f"chart item {i}: labels overlap in every layout")
        iid = item_id(ID_PREFIX, i)
        path = image_dir / f"{iid}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        item = Item(id=iid, benchmark=BENCHMARK, question=spec["question"], answer=spec["answer"],
                    scorer=spec["scorer"], images=(str(path.resolve()),))
        meta = {k2: spec[k2] for k2 in ("kind", "chart_type", "font_size", "title", "category_axis", "value_name",
                                        "color", "categories", "labels", "decimals", "recipe")}
        out.append((item, meta))
        if progress:
            progress(k + 1, n)
    return out


def generate(n: int, seed: int, image_dir: Path, *, start: int = 0,
             progress: Progress | None = None) -> list[Item]:
    """`n` chart items for `seed`, PNGs written to `image_dir/<id>.png`."""
    return [item for item, _ in generate_with_meta(n, seed, image_dir, start=start, progress=progress)]


__all__ = ["BENCHMARK", "ID_PREFIX", "aggregate", "generate", "generate_with_meta", "make_chart", "render_chart"]
