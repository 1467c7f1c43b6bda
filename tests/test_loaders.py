"""Tests of bitseg.loaders.dataset: dataset folders loaded into a real Engine."""

from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from bitseg.index.engine import Engine
from bitseg.index.errors import BitsegError, DataError, NotFound, SchemaError
from bitseg.loaders.dataset import (
    LoadReport,
    iter_jsonl,
    iter_profiles_csv,
    load_dataset,
    read_schema,
)

ALL = {"all": True}

SCHEMA = {"profiles": {"country": "keyword", "tags": "keywords", "age": "int", "ltv": "float",
                       "subscribed": "bool", "birthday": "date", "created_at": "timestamp"}}

PROFILES = [
    {"id": "u1", "country": "DE", "tags": ["vip", "newsletter"], "age": 34, "ltv": 1520.5,
     "subscribed": True, "birthday": "1991-05-02", "created_at": "2024-03-01T10:00:00Z",
     "city": "Berlin", "points": 120, "score": 4.5, "labels": ["a", "b"]},
    {"id": "u2", "country": "FR", "tags": ["vip"], "ltv": 99.99, "subscribed": False,
     "created_at": "2024-03-02T10:00:00+02:00", "city": "Paris", "points": 7},
    {"id": 7, "country": "DE", "age": 19, "subscribed": True, "birthday": "2005-12-31",
     "score": 0.25},
]

# The same three profiles as CSV; empty cells are absent fields, BOOLs in any case.
PROFILES_CSV = (
    "id,country,tags,age,ltv,subscribed,birthday,created_at,city,points,score,labels\n"
    "u1,DE,vip|newsletter,34,1520.50,true,1991-05-02,2024-03-01T10:00:00Z,Berlin,120,4.5,a|b\n"
    "u2,FR,vip,,99.99,FALSE,,2024-03-02T10:00:00+02:00,Paris,7,,\n"
    "7,DE,,19,,1,2005-12-31,,,,0.25,\n"
)

EXPECTED = {
    "u1": {"id": "u1", "country": "DE", "tags": ["newsletter", "vip"], "age": 34,
           "ltv": 1520.5, "subscribed": True, "birthday": "1991-05-02",
           "created_at": "2024-03-01T10:00:00Z", "city": "Berlin", "points": 120,
           "score": 4.5, "labels": ["a", "b"]},
    "u2": {"id": "u2", "country": "FR", "tags": ["vip"], "ltv": 99.99, "subscribed": False,
           "created_at": "2024-03-02T08:00:00Z", "city": "Paris", "points": 7},
    "7": {"id": "7", "country": "DE", "age": 19, "subscribed": True,
          "birthday": "2005-12-31", "score": 0.25},
}


def jsonl(*records: Any) -> bytes:
    """Records as JSON Lines; a str record is written as the raw line."""
    return b"".join((r.encode() if isinstance(r, str) else orjson.dumps(r)) + b"\n"
                    for r in records)


def make_dataset(folder: Path, files: dict[str, bytes | str | dict]) -> Path:
    """Write a dataset folder; .gz names are gzipped, dicts written as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = orjson.dumps(content) if isinstance(content, dict) else content
        data = data.encode() if isinstance(data, str) else data
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return folder


def snapshot(engine: Engine) -> tuple[int, list[str], dict[str, dict]]:
    """Everything a failed load must leave as it was."""
    members = engine.members(ALL)
    return engine.total(), members, {m: engine.profile(m) for m in members}


@pytest.fixture
def engine(tmp_path: Path):
    with Engine.open(tmp_path / "store") as opened:
        yield opened


# --- the three profile formats ----------------------------------------------------------


@pytest.mark.parametrize("name", ["profiles.jsonl", "profiles.jsonl.gz", "profiles.csv"])
def test_every_format_loads_the_same_profiles(tmp_path: Path, name: str) -> None:
    content = PROFILES_CSV if name.endswith(".csv") else jsonl(*PROFILES)
    folder = make_dataset(tmp_path / "data", {"schema.json": SCHEMA, name: content})
    with Engine.open(tmp_path / "store") as engine:
        report = load_dataset(folder, engine)
        assert isinstance(report, LoadReport)
        assert (report.profiles_created, report.profiles_updated) == (3, 0)
        assert (report.events, report.orders) == (0, 0)
        assert report.seconds >= 0
        assert engine.total() == 3
        assert {pid: engine.profile(pid) for pid in EXPECTED} == EXPECTED
        assert engine.schema.profiles["points"] == "int"
        assert engine.schema.profiles["score"] == "float"
        assert engine.schema.profiles["labels"] == "keywords"
        assert engine.count({"field": "tags", "op": "eq", "value": "vip"}) == 2


def test_loading_again_updates_instead_of_creating(tmp_path: Path, engine: Engine) -> None:
    folder = make_dataset(tmp_path / "data", {"profiles.jsonl": jsonl(*PROFILES)})
    load_dataset(folder, engine)
    report = load_dataset(folder, engine)
    assert (report.profiles_created, report.profiles_updated) == (0, 3)
    assert engine.total() == 3


# --- CSV conversion ---------------------------------------------------------------------


def csv_records(tmp_path: Path, text: str, types: dict[str, str]) -> list[tuple[int, dict]]:
    path = tmp_path / "profiles.csv"
    path.write_text(text, encoding="utf-8")
    return list(iter_profiles_csv(path, types))


def test_csv_declared_types_convert_the_text(tmp_path: Path) -> None:
    types = {"n": "int", "x": "float", "b": "bool", "d": "date", "t": "timestamp",
             "k": "keyword", "ks": "keywords"}
    text = ("id,n,x,b,d,t,k,ks\n"
            "1,-12,3,TRUE,2024-01-31,2024-01-31T10:00:00,a|b,vip|news||x\n"
            "2,0,-0.5,0,,,007,solo\n"
            "3,,,false,,,,|\n")
    assert csv_records(tmp_path, text, types) == [
        (2, {"id": "1", "n": -12, "x": 3.0, "b": True, "d": "2024-01-31",
             "t": "2024-01-31T10:00:00", "k": "a|b", "ks": ["vip", "news", "x"]}),
        (3, {"id": "2", "n": 0, "x": -0.5, "b": False, "k": "007", "ks": ["solo"]}),
        (4, {"id": "3", "b": False}),
    ]


def test_csv_infers_undeclared_fields_from_the_first_cell(tmp_path: Path) -> None:
    text = ("id,b,n,x,d,t,ks,k,zip\n"
            "u1,True,42,1.25,2024-02-29,2024-02-29T23:59:59Z,a|b,hello,007\n"
            "u2,false,7,3,2023-01-01,2023-01-01T00:00:00+01:00,c,12,123\n")
    assert csv_records(tmp_path, text, {}) == [
        (2, {"id": "u1", "b": True, "n": 42, "x": 1.25, "d": "2024-02-29",
             "t": "2024-02-29T23:59:59Z", "ks": ["a", "b"], "k": "hello", "zip": "007"}),
        # later cells follow the column's inferred type: 3 is a float, "12" a keyword
        (3, {"id": "u2", "b": False, "n": 7, "x": 3.0, "d": "2023-01-01",
             "t": "2023-01-01T00:00:00+01:00", "ks": ["c"], "k": "12", "zip": "123"}),
    ]


def test_csv_line_numbers_are_physical_lines(tmp_path: Path) -> None:
    text = 'id,note,n\n\nu1,"two\nlines",1\nu2,x,oops\n'
    with pytest.raises(DataError) as caught:
        csv_records(tmp_path, text, {"n": "int"})
    error = caught.value
    assert (error.file, error.line, error.field) == ("profiles.csv", 5, "n")
    assert "oops" in str(error)


@pytest.mark.parametrize(("text", "line", "field"), [
    ("id,b\nu1,yes\n", 2, "b"),
    ("id,x\nu1,1.5\nu2,NaN\n", 3, "x"),
    ("id,name\nu1,a,b\n", 2, None),
    ("name\nu1\n", 1, None),
    ("id,a,a\n", 1, "a"),
])
def test_csv_bad_cells_and_headers(tmp_path: Path, text: str, line: int, field: str) -> None:
    with pytest.raises(DataError) as caught:
        csv_records(tmp_path, text, {"b": "bool", "x": "float"})
    assert (caught.value.file, caught.value.line, caught.value.field) == (
        "profiles.csv", line, field)


def test_csv_bom_and_short_rows(tmp_path: Path) -> None:
    text = "\ufeffid,a,b\nu1,x\n"
    assert csv_records(tmp_path, text, {}) == [(2, {"id": "u1", "a": "x"})]


# --- JSON Lines -------------------------------------------------------------------------


def test_iter_jsonl_skips_blank_lines_and_counts_them(tmp_path: Path) -> None:
    for name in ("p.jsonl", "p.jsonl.gz"):
        make_dataset(tmp_path, {name: jsonl({"id": "a"}, "", "   ", {"id": "b"})})
        assert list(iter_jsonl(tmp_path / name)) == [(1, {"id": "a"}), (4, {"id": "b"})]


@pytest.mark.parametrize("bad", ['{"id": "u9", ', "[1, 2]", "42", "null", '"text"'])
def test_a_bad_json_line_changes_nothing(tmp_path: Path, engine: Engine, bad: str) -> None:
    load_dataset(make_dataset(tmp_path / "one", {"profiles.jsonl": jsonl(*PROFILES)}), engine)
    before = snapshot(engine)
    folder = make_dataset(tmp_path / "two", {"profiles.jsonl.gz": jsonl(
        {"id": "new"}, {"id": "u1", "city": "Hamburg"}, bad, {"id": "later"})})
    with pytest.raises(DataError) as caught:
        load_dataset(folder, engine)
    error = caught.value
    assert (error.file, error.line, error.field) == ("profiles.jsonl.gz", 3, None)
    assert "not valid JSON" in str(error)
    assert snapshot(engine) == before


def test_a_value_against_the_schema_changes_nothing(tmp_path: Path, engine: Engine) -> None:
    folder = make_dataset(tmp_path / "one", {"schema.json": SCHEMA,
                                             "profiles.jsonl": jsonl(*PROFILES)})
    load_dataset(folder, engine)
    before = snapshot(engine)
    bad = make_dataset(tmp_path / "two", {"profiles.jsonl": jsonl(
        {"id": "new", "age": 5}, {"id": "u1", "age": 35}, "", {"id": "u2", "age": "old"})})
    with pytest.raises(DataError) as caught:
        load_dataset(bad, engine)
    error = caught.value
    assert (error.file, error.line, error.field) == ("profiles.jsonl", 4, "age")
    assert "profiles.jsonl" in str(error) and "line 4" in str(error) and "age" in str(error)
    assert snapshot(engine) == before
    with pytest.raises(NotFound):
        engine.profile("new")


def test_a_csv_value_against_the_schema_changes_nothing(tmp_path: Path, engine: Engine) -> None:
    load_dataset(make_dataset(tmp_path / "one", {"schema.json": SCHEMA,
                                                 "profiles.jsonl": jsonl(*PROFILES)}), engine)
    before = snapshot(engine)
    bad = make_dataset(tmp_path / "two", {"profiles.csv": "id,age,birthday\n"
                                          "new,5,2000-01-01\nu1,36,\nu2,,1999-02-30\n"})
    with pytest.raises(DataError) as caught:
        load_dataset(bad, engine)
    assert (caught.value.file, caught.value.line, caught.value.field) == (
        "profiles.csv", 4, "birthday")
    assert snapshot(engine) == before


# --- updates ----------------------------------------------------------------------------


def test_a_later_line_updates_the_profile(tmp_path: Path, engine: Engine) -> None:
    folder = make_dataset(tmp_path / "data", {"profiles.jsonl": jsonl(
        {"id": "u1", "city": "Berlin", "age": 30, "tags": ["a"]},
        {"id": "u1", "age": 31, "tags": None},
    )})
    report = load_dataset(folder, engine)
    assert report.profiles_created == 1
    assert engine.total() == 1
    assert engine.profile("u1") == {"id": "u1", "city": "Berlin", "age": 31}
    assert engine.count({"field": "tags", "op": "exists"}) == 0

    again = make_dataset(tmp_path / "again", {"profiles.csv": "id,city,age\nu1,Bonn,\n"})
    report = load_dataset(again, engine)
    assert (report.profiles_created, report.profiles_updated) == (0, 1)
    assert engine.profile("u1") == {"id": "u1", "city": "Bonn", "age": 31}


# --- the folder -------------------------------------------------------------------------


def test_missing_profiles_file(tmp_path: Path, engine: Engine) -> None:
    folder = make_dataset(tmp_path / "data", {"schema.json": SCHEMA})
    with pytest.raises(DataError, match="no profiles file") as caught:
        load_dataset(folder, engine)
    assert str(folder) in str(caught.value)
    assert engine.total() == 0


def test_missing_folder(tmp_path: Path, engine: Engine) -> None:
    with pytest.raises(BitsegError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", engine)


def test_two_profiles_files_are_ambiguous(tmp_path: Path, engine: Engine) -> None:
    folder = make_dataset(tmp_path / "data", {"profiles.jsonl": jsonl({"id": "a"}),
                                              "profiles.csv": "id\nb\n"})
    with pytest.raises(DataError, match="profiles.jsonl and profiles.csv"):
        load_dataset(folder, engine)
    assert engine.total() == 0


@pytest.mark.parametrize("schema", [
    b'{"profiles": {"age": "int",}}',
    b'{"profiles": {"age": "integer"}}',
    b'{"profiles": ["age"]}',
    b'{"people": {"age": "int"}}',
    b'[]',
])
def test_malformed_schema_json(tmp_path: Path, engine: Engine, schema: bytes) -> None:
    folder = make_dataset(tmp_path / "data", {"schema.json": schema,
                                              "profiles.jsonl": jsonl({"id": "a"})})
    with pytest.raises(SchemaError, match="schema.json"):
        load_dataset(folder, engine)
    with pytest.raises(SchemaError, match="schema.json"):
        read_schema(folder)
    assert engine.total() == 0


def test_schema_conflicting_with_the_store(tmp_path: Path, engine: Engine) -> None:
    load_dataset(make_dataset(tmp_path / "one", {"profiles.jsonl": jsonl({"id": "a", "age": 3})}),
                 engine)
    folder = make_dataset(tmp_path / "two", {"schema.json": {"profiles": {"age": "keyword"}},
                                             "profiles.jsonl": jsonl({"id": "b"})})
    with pytest.raises(SchemaError, match="^schema.json: profiles.age: declared keyword"):
        load_dataset(folder, engine)
    assert engine.total() == 1
    assert engine.schema.profiles["age"] == "int"


def test_read_schema(tmp_path: Path) -> None:
    assert read_schema(tmp_path) is None
    make_dataset(tmp_path, {"schema.json": SCHEMA})
    assert read_schema(tmp_path) == SCHEMA
    assert read_schema(tmp_path / "schema.json") == SCHEMA


# --- events and orders ------------------------------------------------------------------


class RecordingEngine:
    """Just enough of an engine to see what the loader hands over."""

    def __init__(self, *methods: str) -> None:
        self.schema = SimpleNamespace(profiles={})
        self.calls: list[tuple[str, str, list]] = []
        for method in methods:
            setattr(self, method, self._recorder(method))

    def declare_schema(self, schema: dict, *, source: str = "schema") -> None:
        self.calls.append(("declare_schema", "", [schema]))

    def upsert_profiles(self, pairs: Any, *, file: str) -> SimpleNamespace:
        rows = list(pairs)
        self.calls.append(("upsert_profiles", file, rows))
        return SimpleNamespace(created=len(rows), updated=0, version=1)

    def _recorder(self, method: str) -> Any:
        def record(pairs: Any, *, file: str) -> None:
            self.calls.append((method, file, list(pairs)))
        return record


EVENTS_AND_ORDERS = {
    "profiles.jsonl": jsonl({"id": "u1"}),
    "events.jsonl.gz": jsonl({"profile": "u1", "event": "open", "ts": "2026-01-01T00:00:00Z"},
                             "", {"profile": "u2", "event": "open", "ts": "2026-01-02"}),
    "orders.jsonl": jsonl({"id": "o1", "profile": "u1", "ts": "2026-01-01", "items": []}),
}


def test_events_and_orders_go_to_the_engine_when_it_can_take_them(tmp_path: Path) -> None:
    engine = RecordingEngine("track_events", "add_orders")
    report = load_dataset(make_dataset(tmp_path / "data", EVENTS_AND_ORDERS), engine)
    assert (report.profiles_created, report.events, report.orders) == (1, 2, 1)
    assert [(method, file, [line for line, _ in rows]) for method, file, rows in engine.calls] == [
        ("upsert_profiles", "profiles.jsonl", [1]),
        ("track_events", "events.jsonl.gz", [1, 3]),
        ("add_orders", "orders.jsonl", [1]),
    ]


@pytest.mark.parametrize(("methods", "refused"), [
    ((), "events.jsonl.gz"), (("track_events",), "orders.jsonl"),
])
def test_events_or_orders_are_refused_before_loading_anything(
    tmp_path: Path, methods: tuple[str, ...], refused: str,
) -> None:
    engine = RecordingEngine(*methods)
    with pytest.raises(BitsegError, match=rf"{refused}: loading \w+ is not supported yet"):
        load_dataset(make_dataset(tmp_path / "data", EVENTS_AND_ORDERS), engine)
    assert engine.calls == []


# --- progress ---------------------------------------------------------------------------


def test_progress_bar_on_stderr(tmp_path: Path, engine: Engine, capsys: Any) -> None:
    folder = make_dataset(tmp_path / "data", {"profiles.jsonl.gz": jsonl(*PROFILES)})
    load_dataset(folder, engine, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "profiles.jsonl.gz" in captured.err
    assert "100%" in captured.err  # advanced by every byte of the compressed file
