"""The routing frontier by question template: templates, and the DP against brute force."""

import itertools
import random
from types import SimpleNamespace

import pytest

from maestro_core.errors import ConfigError
from maestro_core.frontier import question_template, template_frontier


def test_templates_keep_the_wording_and_drop_names_and_numbers():
    assert question_template("charts", "What is the value for Nuclear Energy?") == "charts: What is the value for"
    assert question_template("charts", "What is the value for Mar?") == "charts: What is the value for"
    assert question_template("hires", "What digit is drawn in the small box?\nmore") == \
        "hires: What digit is drawn in the"
    assert question_template("math", "Calculate 3 * 4.") == question_template("math", "State 1 + 2") == "math"


def brute_force(table, templates, cap):
    groups = sorted(set(templates))
    n, best = len(templates), (-1.0, None)
    for choice in itertools.product(sorted(table), repeat=len(groups)):
        route = dict(zip(groups, choice))
        picked = [table[route[t]][i] for i, t in enumerate(templates)]
        cost = sum(x.total_cost for x in picked) / n
        acc = sum(x.outcome for x in picked) / n
        if cost <= cap + 1e-12 and acc > best[0]:
            best = (acc, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_the_frontier_equals_brute_force_on_random_tables(seed):
    rng = random.Random(seed)
    templates = [rng.choice("abc") for _ in range(12)]
    prices = {"cheap": 0.001, "mid": 0.01, "dear": 0.03}
    table = {p: [SimpleNamespace(outcome=float(rng.random() < {"cheap": 0.3, "mid": 0.5, "dear": 0.9}[p]),
                                 total_cost=price) for _ in templates] for p, price in prices.items()}
    caps = [0.001, 0.005, 0.012, 0.02, 0.03]
    for point, cap in zip(template_frontier(table, templates, caps), caps):
        acc, cost = brute_force(table, templates, cap)
        assert point["accuracy"] == pytest.approx(acc) and point["cost_per_task"] <= cap + 1e-9
        assert set(point["routes"]) == set(templates)
        picked = [table[point["routes"][t]][i] for i, t in enumerate(templates)]
        assert sum(x.outcome for x in picked) / len(templates) == pytest.approx(point["accuracy"])


def test_a_cap_below_every_route_has_no_point_and_bad_tables_are_errors():
    table = {"x": [SimpleNamespace(outcome=1.0, total_cost=0.01)]}
    assert template_frontier(table, ["t"], [0.001])[0]["accuracy"] is None
    with pytest.raises(ConfigError, match="one episode per item"):
        template_frontier(table, ["t", "u"], [0.01])
    with pytest.raises(ConfigError, match="empty"):
        template_frontier({}, [], [0.01])
