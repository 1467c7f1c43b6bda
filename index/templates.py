"""Segment templates: ready-made rules with typed parameters ("smart segments").

A template is a name, a description, parameters (each with a type, a default and
optionally a minimum) and a rule in the CONTRACT §2 JSON form in which a value may be
the placeholder {"$param": NAME}. Instantiating replaces every placeholder node of the
parsed JSON tree with the parameter's typed value (never by formatting text), so a
value can only ever be a value: a string stays a string, wherever it is put.

The catalogue holds the built-in templates below and, optionally, a user's templates
read from a folder of JSON files (one template per `*.json` file) when the server
starts; a bad file is an error naming the file, and a user template may not take a
built-in's name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson

from bitseg.index.errors import BitsegError, NotFound, RuleError
from bitseg.index.rules import check_depth

PLACEHOLDER = "$param"
NAME = re.compile(r"[A-Za-z0-9_.-]{1,48}")  # "template:" + NAME is a valid tag
TAG_PREFIX = "template:"
TYPES = {
    "int": "a whole number",
    "number": "a number",
    "string": "a non-empty text",
    "strings": "a non-empty list of texts",
    "bool": "true or false",
}
_INT = re.compile(r"[+-]?\d+")
_TEMPLATE_KEYS = {"name", "description", "params", "rule"}
_PARAM_KEYS = {"name", "type", "default", "description", "min"}


class TemplateError(BitsegError):
    """A template file that is not a valid template, or bad parameters for one."""


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a template."""

    name: str
    type: str  # a key of TYPES
    default: Any
    description: str = ""
    min: int | float | None = None  # int and number parameters

    def value(self, given: Any, where: str) -> Any:
        """The typed value of `given`: a value of this type, or its text (CLI, gRPC)."""
        value = _from_text(self.type, given) if isinstance(given, str) else given
        if not _fits(self.type, value):
            raise TemplateError(f"{where}: expected {TYPES[self.type]}, got {given!r}")
        if self.min is not None and value < self.min:
            raise TemplateError(f"{where}: expected at least {self.min}, got {given!r}")
        return value

    def to_json(self) -> dict[str, Any]:
        found = {"name": self.name, "type": self.type, "default": self.default,
                 "description": self.description}
        return found if self.min is None else {**found, "min": self.min}


@dataclass(frozen=True, slots=True)
class Template:
    """A rule with placeholders, and the parameters that fill them."""

    name: str
    description: str
    params: tuple[Param, ...]
    rule: Any  # JSON form, with {"$param": NAME} placeholders
    source: str = "built-in"  # or the file it was read from

    @property
    def builtin(self) -> bool:
        return self.source == "built-in"

    @property
    def tag(self) -> str:
        """The tag a segment made from this template carries."""
        return TAG_PREFIX + self.name

    def values(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every parameter's typed value: the given one, else its default."""
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            takes = ", ".join(known) or "no parameters"
            raise TemplateError(f"template {self.name!r}: unknown parameter {unknown[0]!r}; "
                                f"it takes {takes}")
        return {p.name: p.value(given[p.name], f"template {self.name!r}: parameter "
                                               f"{p.name!r}") if p.name in given else p.default
                for p in self.params}

    def instantiate(self, given: Mapping[str, Any] | None = None) -> Any:
        """The rule with every placeholder replaced by its parameter's value."""
        return substitute(self.rule, self.values(given))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "params": [p.to_json() for p in self.params], "rule": self.rule,
                "builtin": self.builtin}


def substitute(node: Any, values: Mapping[str, Any]) -> Any:
    """A copy of the JSON tree with each {"$param": NAME} node replaced by values[NAME]."""
    if isinstance(node, dict):
        if PLACEHOLDER in node:
            return values[node[PLACEHOLDER]]
        return {key: substitute(child, values) for key, child in node.items()}
    if isinstance(node, list):
        return [substitute(child, values) for child in node]
    return node


def placeholders(node: Any, path: str = "$") -> Iterator[tuple[str, Any]]:
    """(JSON path, the node) of every placeholder of a tree (the node may be malformed)."""
    if isinstance(node, dict):
        if PLACEHOLDER in node:
            yield path, node
            return
        for key, child in node.items():
            yield from placeholders(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from placeholders(child, f"{path}[{i}]")


def _from_text(kind: str, text: str) -> Any:
    """A parameter's value from its text; the text itself when it does not read as one
    (then _fits refuses it, naming the text)."""
    if kind == "int":
        return int(text) if _INT.fullmatch(text.strip()) else text
    if kind == "number":
        try:
            number = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
        return number if isinstance(number, (int, float)) and not isinstance(number, bool) \
            else text
    if kind == "bool":
        return {"true": True, "false": False}.get(text.strip().lower(), text)
    if kind == "strings":
        if text.lstrip().startswith("["):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                return text
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _fits(kind: str, value: Any) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "strings":
        return isinstance(value, list) and bool(value) \
            and all(isinstance(v, str) and v for v in value)
    return isinstance(value, str) and bool(value)


# ---------------------------------------------------------------------- reading one
def template_of(data: Any, source: str = "built-in") -> Template:
    """A validated Template from its JSON form; TemplateError says what is wrong where."""
    def fail(message: str) -> TemplateError:
        return TemplateError(f"{source}: {message}")

    if not isinstance(data, dict):
        raise fail("expected a JSON object with name, description, params and rule")
    missing = sorted(_TEMPLATE_KEYS - {"params"} - set(data))
    extra = sorted(set(data) - _TEMPLATE_KEYS)
    if missing or extra:
        raise fail(f"missing key {missing[0]!r}" if missing else f"unknown key {extra[0]!r}")
    name = data["name"]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise fail(f"name: expected 1-48 characters of letters, digits, _ . -, got {name!r}")
    if not isinstance(data["description"], str):
        raise fail("description: expected a text")
    raw = data.get("params", [])
    if not isinstance(raw, list):
        raise fail("params: expected a list of parameters")
    params = tuple(_param_of(p, f"params[{i}]", fail) for i, p in enumerate(raw))
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise fail(f"params: {next(n for n in names if names.count(n) > 1)!r} is declared twice")
    try:
        check_depth(data["rule"])
    except RuleError as exc:
        raise fail(f"rule: {exc}") from None
    used = set()
    for path, node in placeholders(data["rule"], "$.rule"):
        if len(node) != 1 or not isinstance(node[PLACEHOLDER], str):
            raise fail(f'{path}: a placeholder is {{"$param": NAME}} and nothing else')
        if node[PLACEHOLDER] not in names:
            raise fail(f"{path}: parameter {node[PLACEHOLDER]!r} is not declared in params")
        used.add(node[PLACEHOLDER])
    unused = [n for n in names if n not in used]
    if unused:
        raise fail(f"params: {unused[0]!r} is declared but the rule never uses it")
    return Template(name, data["description"], params, data["rule"], source)


def _param_of(data: Any, where: str, fail: Any) -> Param:
    if not isinstance(data, dict):
        raise fail(f"{where}: expected an object with name, type and default")
    missing = sorted({"name", "type", "default"} - set(data))
    extra = sorted(set(data) - _PARAM_KEYS)
    if missing or extra:
        raise fail(f"{where}: missing key {missing[0]!r}" if missing
                   else f"{where}: unknown key {extra[0]!r}")
    name, kind = data["name"], data["type"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
        raise fail(f"{where}.name: expected 1-32 of a-z, 0-9, _ (a letter first), got {name!r}")
    if kind not in TYPES:
        raise fail(f"{where}.type: expected one of {', '.join(TYPES)}, got {kind!r}")
    low = data.get("min")
    if low is not None and (kind not in ("int", "number") or not _fits("number", low)):
        raise fail(f"{where}.min: only int and number parameters take a minimum (a number)")
    if not isinstance(data.get("description", ""), str):
        raise fail(f"{where}.description: expected a text")
    param = Param(name, kind, None, data.get("description", ""), low)
    try:  # the default is a value of the type itself, not its text
        if not _fits(kind, data["default"]):
            raise TemplateError(f"expected {TYPES[kind]}, got {data['default']!r}")
        param.value(data["default"], "")
    except TemplateError as exc:
        raise fail(f"{where}.default: {str(exc).removeprefix(': ')}") from None
    return Param(name, kind, data["default"], param.description, low)


# ---------------------------------------------------------------------- the catalogue
@dataclass(frozen=True)
class Catalogue:
    """The templates a server offers: the built-ins, then the user's, by name."""

    templates: Mapping[str, Template] = field(default_factory=lambda: MappingProxyType({}))

    def get(self, name: str) -> Template:
        found = self.templates.get(name)
        if found is None:
            raise NotFound("template", name)
        return found

    def __iter__(self) -> Iterator[Template]:
        return iter(self.templates.values())

    def source(self, template: str | None, params: Mapping[str, Any] | None,
               rule: Any = None) -> tuple[Any, tuple[str, ...]]:
        """A new segment's rule and extra tags: `rule` as given, or the instantiated
        rule of `template` with its tag "template:NAME"."""
        if not template:
            if params:
                raise TemplateError("params are for a template: name the template too")
            return rule, ()
        if rule is not None:
            raise TemplateError("give a rule or a template, not both")
        chosen = self.get(template)
        return chosen.instantiate(params), (chosen.tag,)


def load_catalogue(folder: str | Path | None = None) -> Catalogue:
    """The built-ins, plus every `*.json` template of `folder` (in name order); the
    first bad file, or one taking a name already taken, is a TemplateError naming it."""
    found = {t.name: t for t in BUILTINS}
    if folder is None:
        return Catalogue(MappingProxyType(found))
    root = Path(folder)
    if not root.is_dir():
        raise TemplateError(f"{root}: not a folder of template files")
    for path in sorted(root.glob("*.json")):
        try:
            data = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise TemplateError(f"{path}: cannot read a JSON template: {exc}") from None
        template = template_of(data, str(path))
        taken = found.get(template.name)
        if taken is not None:
            whose = "a built-in template" if taken.builtin else f"the template of {taken.source}"
            raise TemplateError(f"{path}: name {template.name!r} is taken by {whose}")
        found[template.name] = template
    return Catalogue(MappingProxyType(found))


def _p(name: str) -> dict[str, str]:
    return {PLACEHOLDER: name}


_PAID = {"field": "status", "op": "in", "value": ["paid", "delivered"]}

BUILTINS: tuple[Template, ...] = tuple(template_of(t) for t in (
    {"name": "cart_abandoners",
     "description": "Added something to the cart in the last `days` days and placed no "
                    "order within `within_days` days after",
     "params": [{"name": "days", "type": "int", "default": 7, "min": 1,
                 "description": "how far back the cart additions are looked for"},
                {"name": "within_days", "type": "int", "default": 1, "min": 0,
                 "description": "days an order had to follow the cart addition"}],
     "rule": {"sequence": [{"event": "add_to_cart"}], "then_not": {"orders": {"all": True}},
              "within_days": _p("within_days"), "window": {"last_days": _p("days")}}},
    {"name": "engaged_mobile_users",
     "description": "Opened the app on one of `platforms` at least `min_opens` times in "
                    "the last `days` days",
     "params": [{"name": "days", "type": "int", "default": 90, "min": 1},
                {"name": "min_opens", "type": "int", "default": 2, "min": 1},
                {"name": "platforms", "type": "strings", "default": ["android", "ios"]}],
     "rule": {"event": "app_open",
              "where": {"field": "platform", "op": "in", "value": _p("platforms")},
              "window": {"last_days": _p("days")},
              "having": {"agg": "count", "op": "gte", "value": _p("min_opens")}}},
    {"name": "email_engaged_in_country",
     "description": "Lives in `country` and opened or clicked an email in the last "
                    "`days` days",
     "params": [{"name": "country", "type": "string", "default": "DE"},
                {"name": "days", "type": "int", "default": 30, "min": 1}],
     "rule": {"and": [{"field": "country", "op": "eq", "value": _p("country")},
                      {"or": [{"event": "email_opened", "window": {"last_days": _p("days")}},
                              {"event": "email_clicked",
                               "window": {"last_days": _p("days")}}]}]}},
    {"name": "visitors_never_bought",
     "description": "Viewed a page in the last `days` days and never placed an order",
     "params": [{"name": "days", "type": "int", "default": 30, "min": 1}],
     "rule": {"and": [{"event": "page_view", "window": {"last_days": _p("days")}},
                      {"orders": {"all": True},
                       "having": {"agg": "count", "op": "eq", "value": 0}}]}},
    {"name": "new_customers",
     "description": "Placed their first order in the last `days` days",
     "params": [{"name": "days", "type": "int", "default": 30, "min": 1}],
     "rule": {"orders": {"all": True},
              "having": {"agg": "first", "op": "gt", "value": {"days_ago": _p("days")}}}},
    {"name": "lapsed_customers",
     "description": "Have ordered, but their last order is more than `days` days ago",
     "params": [{"name": "days", "type": "int", "default": 90, "min": 1}],
     "rule": {"orders": {"all": True},
              "having": {"agg": "last", "op": "lt", "value": {"days_ago": _p("days")}}}},
    {"name": "big_spenders_on_brand",
     "description": "Spent more than `min_spend` on items of `brand` in paid or delivered "
                    "orders of the last `days` days",
     "params": [{"name": "brand", "type": "string", "default": "acme"},
                {"name": "min_spend", "type": "number", "default": 200, "min": 0},
                {"name": "days", "type": "int", "default": 365, "min": 1}],
     "rule": {"items": {"field": "brand", "op": "eq", "value": _p("brand")},
              "orders": _PAID, "window": {"last_days": _p("days")},
              "having": {"agg": "sum", "of": "spend", "op": "gt",
                         "value": _p("min_spend")}}},
    {"name": "birthday_this_week",
     "description": "Their birthday falls on one of the next `days` days, today included",
     "params": [{"name": "days", "type": "int", "default": 7, "min": 1}],
     "rule": {"field": "birthday", "op": "anniversary_in",
              "value": {"next_days": _p("days")}}},
    {"name": "rfm_champions",
     "description": "Ordered in the last `recent_days` days, and placed at least "
                    "`min_orders` paid or delivered orders worth at least `min_spend` in "
                    "the last 365 days",
     "params": [{"name": "recent_days", "type": "int", "default": 30, "min": 1},
                {"name": "min_orders", "type": "int", "default": 3, "min": 1},
                {"name": "min_spend", "type": "number", "default": 300, "min": 0}],
     "rule": {"and": [
         {"orders": {"all": True},
          "having": {"agg": "last", "op": "gt", "value": {"days_ago": _p("recent_days")}}},
         {"orders": _PAID, "window": {"last_days": 365},
          "having": {"agg": "count", "op": "gte", "value": _p("min_orders")}},
         {"orders": _PAID, "window": {"last_days": 365},
          "having": {"agg": "sum", "of": "amount", "op": "gte", "value": _p("min_spend")}}]}},
))
