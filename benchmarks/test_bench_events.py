"""Event and order rules at benchmark scale (issue 3's numbers; RESULTS.md)."""

from __future__ import annotations

from conftest import AS_OF

POPUP_3_IN_30 = {"event": "popup_opened", "window": {"last_days": 30},
                 "having": {"agg": "count", "op": "gte", "value": 3}}
PAGE_VIEWS_3_IN_30 = {"event": "page_view", "window": {"last_days": 30},
                      "having": {"agg": "count", "op": "gte", "value": 3}}
ANY_10_IN_365 = {"event": "*", "window": {"last_days": 365},
                 "having": {"agg": "count", "op": "gte", "value": 10}}
SPRING_POPUP_2_IN_90 = {"event": "popup_opened",
                        "where": {"field": "popup", "op": "eq", "value": "spring"},
                        "window": {"last_days": 90},
                        "having": {"agg": "count", "op": "gte", "value": 2}}
POINTS_NEXT_7 = {"event": "points_accrued", "window": {"next_days": 7},
                 "having": {"agg": "sum", "of": "points", "op": "between", "value": [100, 500]}}


MID_MONTH = "2026-10-17T13:45:00Z"  # a window that starts and ends inside months


def _count(benchmark, engine, rule, as_of=AS_OF):
    result = benchmark(engine.count, rule, as_of=as_of)
    benchmark.extra_info["count"] = result
    assert result == len(engine.evaluate(rule, as_of=as_of))
    return result


def test_event_count_gte3_last30(benchmark, engine):
    assert _count(benchmark, engine, POPUP_3_IN_30) > 0


def test_event_count_gte3_last30_mid_month(benchmark, engine):
    """The same rule with as_of mid-month and mid-day: two partial days read raw and no
    month mostly inside the window (AS_OF, at midnight on the 1st, is the best case:
    October's bucket minus one day)."""
    assert _count(benchmark, engine, POPUP_3_IN_30, MID_MONTH) > 0


def test_event_page_views_gte3_last30(benchmark, engine):
    assert _count(benchmark, engine, PAGE_VIEWS_3_IN_30) > 0


def test_event_any_gte10_last365(benchmark, engine):
    assert _count(benchmark, engine, ANY_10_IN_365) > 0


def test_event_where_spring_gte2_last90(benchmark, engine):
    _count(benchmark, engine, SPRING_POPUP_2_IN_90)


def test_event_sum_points_next7(benchmark, engine):
    _count(benchmark, engine, POINTS_NEXT_7)
