"""The routing frontier by question template: templates, and the DP against brute force."""

import itertools
import random
from types import SimpleNamespace

import pytest

from maestro_core.errors import ConfigError
from maestro_core.frontier import (cascade_table, price_bias_bound, question_template, reward_optimal_routes,
                                   route_rewards, score_routing, template_frontier)


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


def random_table(seed: int, n: int):
    """Three pairs (cheap, mid, dear) on n items of templates a, b, c, right at random."""
    rng = random.Random(seed)
    templates = [rng.choice("abc") for _ in range(n)]
    prices = {"cheap": 0.001, "mid": 0.01, "dear": 0.03}
    table = {p: [SimpleNamespace(outcome=float(rng.random() < {"cheap": 0.3, "mid": 0.5, "dear": 0.9}[p]),
                                 total_cost=price) for _ in templates] for p, price in prices.items()}
    return table, templates


@pytest.mark.parametrize("seed", range(5))
def test_the_frontier_equals_brute_force_on_random_tables(seed):
    table, templates = random_table(seed, 12)
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


def test_the_price_bias_bound_moves_items_by_their_margins_and_keeps_the_cap():
    """Two pairs: 'dear' right on every item, 'cheap' right on items 0-2 only. The policy
    prefers 'dear' everywhere, with margins 1..6. A bias on 'dear' moves the items with the
    smallest margins first; no per-pair bias can move items 3-5 alone (their margins are the
    largest), so the bound at a cap that needs three cheap items is below the template-free
    optimum when the right-on-cheap items are not the small-margin ones."""
    pairs = ["cheap", "dear"]
    ep = SimpleNamespace
    table = {"cheap": [ep(outcome=float(i < 3), total_cost=0.001) for i in range(6)],
             "dear": [ep(outcome=1.0, total_cost=0.02) for _ in range(6)]}
    scores = [[0.0, float(m)] for m in (1, 2, 3, 4, 5, 6)]  # items 0-2 have the small margins
    free, capped, tight = price_bias_bound(scores, pairs, table, caps=[0.05, 0.0105, 0.0005])
    assert free["accuracy"] == 1.0 and free["cost_per_task"] == pytest.approx(0.0105)  # equal accuracy: cheaper
    assert capped["cost_per_task"] <= 0.0105 and capped["accuracy"] == 1.0  # items 0-2 to cheap: all right
    assert capped["biases"].get("dear", 0) - capped["biases"].get("cheap", 0) >= 3 - 1e-9  # a margin of 3 moved
    assert tight["accuracy"] is None  # below the cheapest route: no point
    reversed_scores = [[0.0, float(m)] for m in (6, 5, 4, 3, 2, 1)]  # now items 3-5 move first
    bound = price_bias_bound(reversed_scores, pairs, table, caps=[0.0105])[0]
    assert bound["cost_per_task"] <= 0.0105 and bound["accuracy"] == 0.5  # the wrong three went cheap
    with pytest.raises(ConfigError, match="one episode per scored item"):
        price_bias_bound(scores[:2], pairs, table, caps=[0.01])


def test_cascades_escalate_below_the_confidence_and_beat_one_pair_per_template():
    step = lambda c: SimpleNamespace(expert="e", confidence=c)  # noqa: E731
    cheap = [SimpleNamespace(outcome=o, total_cost=0.01, steps=(step(c),))
             for o, c in [(1.0, 0.9), (0.0, 0.2), (1.0, 0.9), (0.0, None)]]
    dear = [SimpleNamespace(outcome=1.0, total_cost=0.03, steps=(step(0.99),)) for _ in range(4)]
    table = {"cheap": cheap, "dear": dear}
    routes = cascade_table(table, thresholds=(0.5, 0.95))
    assert sorted(routes) == ["cheap>dear@0.5", "cheap>dear@0.95"]  # only towards the dearer pair
    assert [r.outcome for r in routes["cheap>dear@0.5"]] == [1.0, 1.0, 1.0, 1.0]
    assert [r.total_cost for r in routes["cheap>dear@0.5"]] == [0.01, 0.04, 0.01, 0.04]  # no confidence: escalate
    assert [r.total_cost for r in routes["cheap>dear@0.95"]] == [0.04] * 4
    templates = ["t"] * 4
    alone = template_frontier(table, templates, [0.025])[0]
    both = template_frontier({**table, **routes}, templates, [0.025])[0]
    assert (alone["accuracy"], alone["routes"]) == (0.5, {"t": "cheap"})
    assert (both["accuracy"], both["cost_per_task"], both["routes"]) == (1.0, 0.025, {"t": "cheap>dear@0.5"})
    with pytest.raises(ConfigError, match="thresholds"):
        cascade_table(table, thresholds=(0.0,))


def test_routes_by_template_counts_each_systems_routes_per_template():
    from maestro_core.frontier import routes_by_template

    templates = {"a": "text: What is the code", "b": "text: What is the code", "c": "text: What is the word"}
    rows = [{"system": "policy", "item_id": "a", "route": "tesseract@@text_reading", "correct": "1.0", "cost": "0.01"},
            {"system": "policy", "item_id": "b", "route": "rapidocr@@text_reading", "correct": "0.0", "cost": "0.03"},
            {"system": "policy", "item_id": "c", "route": "tesseract@@text_reading", "correct": "1.0", "cost": "0.01"},
            {"system": "router:mlp", "item_id": "a", "route": "rapidocr@@text_reading", "correct": "1.0",
             "cost": "0.03"}]
    table = routes_by_template(rows, templates)
    code = table["text: What is the code"]
    assert code["policy"]["n"] == 2 and code["policy"]["accuracy"] == 0.5
    assert code["policy"]["cost_per_task"] == pytest.approx(0.02)
    assert code["policy"]["routes"] == {"tesseract@@text_reading": 1, "rapidocr@@text_reading": 1}
    assert code["router:mlp"]["routes"] == {"rapidocr@@text_reading": 1}
    assert table["text: What is the word"]["policy"]["accuracy"] == 1.0
    with pytest.raises(ConfigError, match="not among the evaluated items"):
        routes_by_template([{**rows[0], "item_id": "zz"}], templates)


def test_route_rewards_price_each_route_per_group_at_the_cost_weight():
    step = lambda c: SimpleNamespace(expert="e", confidence=c)  # noqa: E731
    cheap = [SimpleNamespace(outcome=o, total_cost=0.01, steps=(step(c),)) for o, c in [(1.0, 0.9), (0.0, 0.2)]]
    dear = [SimpleNamespace(outcome=1.0, total_cost=0.03, steps=(step(0.99),)) for _ in range(2)]
    table = {"cheap": cheap, "dear": dear, **cascade_table({"cheap": cheap, "dear": dear}, thresholds=(0.5,))}
    got = route_rewards(table, ["a", "b"], cost_lambda=1.0, cost_scale=0.05)
    assert got["a"] == pytest.approx({"cheap": 0.8, "dear": 0.4, "cheap>dear@0.5": 0.8})
    assert got["b"] == pytest.approx({"cheap": -0.2, "dear": 0.4, "cheap>dear@0.5": 0.2})  # escalated: both paid
    with pytest.raises(ConfigError, match="one result per item"):
        route_rewards(table, ["a"], cost_lambda=1.0)


@pytest.mark.parametrize("seed", range(3))
def test_the_reward_optimal_routing_maximises_the_reward_and_lies_on_or_below_the_frontier(seed):
    table, templates = random_table(seed, 15)
    for lam in (0.0, 0.5, 1.1, 3.0):
        got = reward_optimal_routes(table, templates, cost_lambda=lam, cost_scale=0.05)
        assert set(got["routes"]) == set(templates)

        def reward(route: dict) -> float:  # the mean reward of a whole routing, by brute force
            return sum(table[route[t]][i].outcome - lam * table[route[t]][i].total_cost / 0.05
                       for i, t in enumerate(templates)) / len(templates)

        groups = sorted(set(templates))
        best = max(reward(dict(zip(groups, c))) for c in itertools.product(sorted(table), repeat=len(groups)))
        assert reward(got["routes"]) == pytest.approx(best)
        picked = [table[got["routes"][t]][i] for i, t in enumerate(templates)]
        assert got["accuracy"] == pytest.approx(sum(x.outcome for x in picked) / len(templates))
        assert got["cost_per_task"] == pytest.approx(sum(x.total_cost for x in picked) / len(templates))
        (point,) = template_frontier(table, templates, [got["cost_per_task"] + 1e-9])
        assert got["accuracy"] <= point["accuracy"] + 1e-9  # no routing beats the frontier at its cost
    # weight 0: the most accurate route per template, a tie going to the cheaper
    tie = {"cheap": [SimpleNamespace(outcome=1.0, total_cost=0.001)], "dear": [SimpleNamespace(outcome=1.0,
                                                                                                 total_cost=0.03)]}
    assert reward_optimal_routes(tie, ["a"], cost_lambda=0.0)["routes"] == {"a": "cheap"}
    with pytest.raises(ConfigError, match="cost_lambda"):
        reward_optimal_routes(tie, ["a"], cost_lambda=-1.0)
    with pytest.raises(ConfigError, match="one result per item"):
        reward_optimal_routes(tie, ["a", "b"], cost_lambda=1.0)


def test_a_routing_scores_on_another_table_and_unseen_templates_take_their_benchmarks_common_route():
    r = lambda ok, cost: SimpleNamespace(outcome=ok, total_cost=cost)  # noqa: E731
    templates = ["charts: a", "charts: b", "charts: c", "math"]
    table = {"cheap": [r(0.0, 0.01), r(1.0, 0.01), r(0.0, 0.01), r(1.0, 0.001)],
             "dear": [r(1.0, 0.03), r(1.0, 0.03), r(1.0, 0.03), r(0.0, 0.03)]}
    got = score_routing(table, templates, {"charts: a": "dear", "charts: b": "cheap", "charts: x": "dear",
                                           "math": "cheap"})
    assert got["unseen"] == {"charts: c": "dear"}  # two chart templates of three on dear
    assert got["accuracy"] == 1.0 and got["cost_per_task"] == pytest.approx((0.03 + 0.01 + 0.03 + 0.001) / 4)
    # on its own table, the reward optimum scores what it reported
    best = reward_optimal_routes(table, templates, cost_lambda=1.0)
    again = score_routing(table, templates, best["routes"])
    assert again["unseen"] == {} and again["accuracy"] == pytest.approx(best["accuracy"])
    assert again["cost_per_task"] == pytest.approx(best["cost_per_task"])
    with pytest.raises(ConfigError, match="routes this table lacks"):
        score_routing(table, templates, {"math": "oracle"})
    with pytest.raises(ConfigError, match="no route for benchmark 'charts'"):
        score_routing(table, templates, {"math": "cheap"})


def test_an_exact_reward_tie_goes_to_the_cheaper_route_whatever_the_float_sums():
    # cheap: wrong for $0.001; dear: right for $0.01. At weight 0.05 / $0.009 their rewards tie
    # exactly (0 - 1/9 = 1 - 10/9), though the float sums differ in the last bits
    r = lambda ok, cost: SimpleNamespace(outcome=ok, total_cost=cost)  # noqa: E731
    table = {"cheap": [r(0.0, 0.001)], "dear": [r(1.0, 0.01)]}
    lam = 0.05 / (0.01 - 0.001)
    rewards = route_rewards(table, ["t"], cost_lambda=lam)["t"]
    assert rewards["cheap"] == pytest.approx(rewards["dear"])
    assert reward_optimal_routes(table, ["t"], cost_lambda=lam)["routes"] == {"t": "cheap"}


def test_a_split_on_a_real_cue_beats_its_shuffles_and_a_split_by_a_coin_does_not():
    from maestro_core.frontier import split_gain

    table, templates = random_table(7, 120)
    rng = random.Random(1)
    # on a cue: each item of template a to the route that is right there when one is (an oracle
    # split); a coin: the same routes at random, blind to the outcomes
    cue = [("cheap" if table["cheap"][i].outcome else "dear") if t == "a" else "mid" for i, t in enumerate(templates)]
    coin = [rng.choice(["cheap", "dear"]) if t == "a" else "mid" for t in templates]
    smart, blind = split_gain(table, templates, cue, shuffles=2000), split_gain(table, templates, coin, shuffles=2000)
    assert set(smart["templates"]) == {"a"} and smart["skipped"] == {"b": "one route", "c": "one route"}
    a = smart["templates"]["a"]
    n_a = templates.count("a")
    assert a["n"] == n_a and sum(a["routes"].values()) == n_a
    # the shuffles' mean is each route's share times its accuracy on the template
    exact = sum(k * a["each_route_alone"][r] / n_a for r, k in a["routes"].items())
    assert a["expected"] == pytest.approx(exact, abs=0.3)
    assert a["correct"] > a["expected"] + 3 and a["p"] < 0.01 and smart["total"]["p"] == a["p"]
    b = blind["templates"]["a"]
    assert b["p"] > 0.05 and abs(b["correct"] - b["expected"]) < 5
    # a route the table lacks is not scored; bad input is an error
    lacks = split_gain(table, templates, ["other" if r == "cheap" else r for r in coin], shuffles=10)
    assert lacks["skipped"]["a"] == "a route the table lacks" and lacks["total"]["templates"] == 0
    with pytest.raises(ConfigError, match="routes for"):
        split_gain(table, templates, coin[:-1])
    with pytest.raises(ConfigError, match="shuffles"):
        split_gain(table, templates, coin, shuffles=0)
