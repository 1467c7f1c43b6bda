"""Segment templates at the engine level: each built-in on generated data counts what the
same rule written by hand counts, parameters are typed and checked, and a folder of
user templates is read, refused when bad (naming the file) and may not shadow."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from bitseg.index.engine import Engine
from bitseg.index.errors import NotFound
from bitseg.index.segments import open_segments
from bitseg.index.templates import BUILTINS, TemplateError, load_catalogue, template_of
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.gen import generate

PRESENT = datetime(2026, 11, 29, 12, tzinfo=timezone.utc)
PAID = {"field": "status", "op": "in", "value": ["paid", "delivered"]}

# Each built-in with the parameters given, and the rule it must count like, by hand.
BY_HAND: dict[str, tuple[dict[str, Any], Any]] = {
    "cart_abandoners": ({"days": 14}, {
        "sequence": [{"event": "add_to_cart"}], "then_not": {"orders": {"all": True}},
        "within_days": 1, "window": {"last_days": 14}}),
    "engaged_mobile_users": ({"min_opens": "1", "platforms": "ios,android"}, {
        "event": "app_open", "where": {"field": "platform", "op": "in",
                                       "value": ["ios", "android"]},
        "window": {"last_days": 90}, "having": {"agg": "count", "op": "gte", "value": 1}}),
    "email_engaged_in_country": ({"country": "FR", "days": 60}, {
        "and": [{"field": "country", "op": "eq", "value": "FR"},
                {"or": [{"event": "email_opened", "window": {"last_days": 60}},
                        {"event": "email_clicked", "window": {"last_days": 60}}]}]}),
    "visitors_never_bought": ({}, {
        "and": [{"event": "page_view", "window": {"last_days": 30}},
                {"not": {"orders": {"all": True}}}]}),
    "new_customers": ({"days": "60"}, {
        "and": [{"orders": {"all": True}, "window": {"last_days": 60}},
                {"not": {"orders": {"all": True},
                         "window": {"from": "2000-01-01T00:00:00Z",
                                    "to": "2026-09-30T12:00:00.000001Z"}}}]}),
    "lapsed_customers": ({}, {
        "and": [{"orders": {"all": True}},
                {"not": {"orders": {"all": True}, "window": {"last_days": 90}}},
                {"not": {"orders": {"all": True}, "window": {
                    "from": "2026-08-31T12:00:00Z", "to": "2026-08-31T12:00:00.000001Z"}}}]}),
    "big_spenders_on_brand": ({"brand": "nova", "min_spend": "99.5"}, {
        "items": {"field": "brand", "op": "eq", "value": "nova"}, "orders": PAID,
        "window": {"last_days": 365},
        "having": {"agg": "sum", "of": "spend", "op": "gt", "value": 99.5}}),
    "birthday_this_week": ({}, {
        "field": "birthday", "op": "anniversary_in", "value": {"next_days": 7}}),
    "rfm_champions": ({"min_orders": 2, "min_spend": 150}, {
        "and": [{"orders": {"all": True}, "window": {"last_days": 30}},
                {"orders": PAID, "window": {"last_days": 365},
                 "having": {"agg": "count", "op": "gte", "value": 2}},
                {"orders": PAID, "window": {"last_days": 365},
                 "having": {"agg": "sum", "of": "amount", "op": "gte", "value": 150}}]}),
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    home = tmp_path_factory.mktemp("templates")
    generate(home / "data", profiles=600, seed=7, as_of=PRESENT)
    with Engine.open(home / "db") as engine:
        load_dataset(home / "data", engine)
        yield engine


def test_every_builtin_is_checked_here() -> None:
    assert sorted(BY_HAND) == sorted(t.name for t in BUILTINS)


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_a_template_counts_what_its_rule_by_hand_counts(demo: Engine, name: str) -> None:
    params, by_hand = BY_HAND[name]
    template = load_catalogue().get(name)
    expected = demo.count(by_hand, as_of=PRESENT)
    assert expected > 0  # the demo data has such profiles
    assert demo.count(template.instantiate(params), as_of=PRESENT) == expected
    assert demo.count(template.instantiate(), as_of=PRESENT) > 0  # the defaults too


def test_a_segment_from_a_template_is_ordinary_and_editable(demo: Engine) -> None:
    segs = open_segments(demo)
    catalogue = load_catalogue()
    rule, tags = catalogue.source("lapsed_customers", {"days": "120"})
    info, change = segs.create("lapsed", "materialized", rule=rule, tags=["crm", *tags],
                               as_of=PRESENT)
    assert info.tags == ("crm", "template:lapsed_customers")
    assert info.rule == {"orders": {"all": True}, "having": {
        "agg": "last", "op": "lt", "value": {"days_ago": 120}}}  # the rule, not a reference
    assert info.size == change.entered == demo.count(rule, as_of=PRESENT)
    stricter = {"and": [rule, {"field": "country", "op": "eq", "value": "DE"}]}
    updated, _ = segs.update("lapsed", rule=stricter, as_of=PRESENT)
    assert updated.size == demo.count(stricter, as_of=PRESENT) < info.size
    assert updated.tags == info.tags
    segs.delete("lapsed")


def test_substitution_is_structural() -> None:
    template = load_catalogue().get("email_engaged_in_country")
    sneaky = 'DE"}, {"all": true}, {"field": "country", "op": "eq", "value": "x'
    rule = template.instantiate({"country": sneaky})
    assert rule["and"][0] == {"field": "country", "op": "eq", "value": sneaky}
    assert len(rule["and"]) == 2
    assert template.rule["and"][0]["value"] == {"$param": "country"}  # untouched


@pytest.mark.parametrize(("params", "message"), [
    ({"dayz": 3}, "template 'lapsed_customers': unknown parameter 'dayz'; it takes days"),
    ({"days": "soon"}, "parameter 'days': expected a whole number, got 'soon'"),
    ({"days": 1.5}, "parameter 'days': expected a whole number, got 1.5"),
    ({"days": True}, "parameter 'days': expected a whole number, got True"),
    ({"days": "0"}, "parameter 'days': expected at least 1, got '0'"),
])
def test_bad_params_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("(", r"\(")):
        load_catalogue().get("lapsed_customers").instantiate(params)


def test_params_of_each_type_read_from_text() -> None:
    catalogue = load_catalogue()
    spend = catalogue.get("big_spenders_on_brand")
    assert spend.values({"min_spend": "12.5"})["min_spend"] == 12.5
    assert spend.values({"min_spend": "12"})["min_spend"] == 12
    with pytest.raises(TemplateError, match="expected a number, got 'lots'"):
        spend.values({"min_spend": "lots"})
    with pytest.raises(TemplateError, match="expected a non-empty text, got ''"):
        spend.values({"brand": ""})
    mobile = catalogue.get("engaged_mobile_users")
    assert mobile.values({"platforms": '["ios"]'})["platforms"] == ["ios"]
    with pytest.raises(TemplateError, match="expected a non-empty list of texts"):
        mobile.values({"platforms": [1]})
    with pytest.raises(NotFound, match="template 'nope' not found"):
        catalogue.get("nope")
    with pytest.raises(TemplateError, match="a rule or a template, not both"):
        catalogue.source("new_customers", {}, rule={"all": True})
    with pytest.raises(TemplateError, match="params are for a template"):
        catalogue.source(None, {"days": "3"}, rule={"all": True})


GOOD = {"name": "vip_in_country", "description": "VIPs of a country",
        "params": [{"name": "country", "type": "string", "default": "DE"},
                   {"name": "vip", "type": "bool", "default": True}],
        "rule": {"and": [{"field": "country", "op": "eq", "value": {"$param": "country"}},
                         {"field": "subscribed", "op": "eq", "value": {"$param": "vip"}}]}}


def write(folder: Path, name: str, data: Any) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else orjson.dumps(data))
    return path


def test_user_templates_are_listed_after_the_builtins(tmp_path: Path, demo: Engine) -> None:
    write(tmp_path / "t", "vip.json", GOOD)
    (tmp_path / "t" / "notes.txt").write_text("not a template")
    catalogue = load_catalogue(tmp_path / "t")
    names = [t.name for t in catalogue]
    assert names == [*(t.name for t in BUILTINS), "vip_in_country"]
    mine = catalogue.get("vip_in_country")
    assert not mine.builtin and mine.source.endswith("vip.json")
    rule = mine.instantiate({"country": "FR", "vip": "false"})
    assert rule["and"][1]["value"] is False
    assert demo.count(rule) == demo.count({"and": [
        {"field": "country", "op": "eq", "value": "FR"},
        {"field": "subscribed", "op": "eq", "value": False}]}) > 0


@pytest.mark.parametrize(("data", "message"), [
    (b"{not json", "cannot read a JSON template"),
    ({**GOOD, "rule": {"field": "country", "op": "eq", "value": {"$param": "cuntry"}}},
     "$.rule.value: parameter 'cuntry' is not declared in params"),
    ({**GOOD, "params": [*GOOD["params"], {"name": "n", "type": "int", "default": 1}]},
     "params: 'n' is declared but the rule never uses it"),
    ({**GOOD, "params": [{"name": "country", "type": "string", "default": 7},
                         GOOD["params"][1]]},
     "params[0].default: expected a non-empty text, got 7"),
    ({**GOOD, "params": [{"name": "country", "type": "text", "default": "DE"},
                         GOOD["params"][1]]},
     "params[0].type: expected one of int, number, string, strings, bool"),
    ({key: v for key, v in GOOD.items() if key != "rule"}, "missing key 'rule'"),
    ({**GOOD, "name": "has space"}, "name: expected 1-48 characters"),
    ({**GOOD, "rule": {"field": "country", "op": "eq",
                       "value": {"$param": "country", "x": 1}}},
     '$.rule.value: a placeholder is {"$param": NAME} and nothing else'),
])
def test_a_bad_user_template_names_its_file(tmp_path: Path, data: Any, message: str) -> None:
    write(tmp_path / "t", "a-good.json", {**GOOD, "name": "fine"})
    path = write(tmp_path / "t", "bad.json", data)
    with pytest.raises(TemplateError) as failed:
        load_catalogue(tmp_path / "t")
    assert str(failed.value).startswith(f"{path}: ")
    assert message in str(failed.value)


def test_a_user_template_may_not_shadow(tmp_path: Path) -> None:
    write(tmp_path / "t", "mine.json", {**GOOD, "name": "new_customers"})
    with pytest.raises(TemplateError, match="name 'new_customers' is taken by a built-in"):
        load_catalogue(tmp_path / "t")
    write(tmp_path / "u", "a.json", GOOD)
    write(tmp_path / "u", "b.json", GOOD)
    with pytest.raises(TemplateError, match=r"b\.json: name 'vip_in_country' is taken by "
                                            r"the template of .*a\.json"):
        load_catalogue(tmp_path / "u")
    with pytest.raises(TemplateError, match="not a folder"):
        load_catalogue(tmp_path / "missing")


def test_builtins_are_valid_templates() -> None:
    for template in BUILTINS:
        data = template.to_json()
        del data["builtin"]
        assert template_of(data) == template
