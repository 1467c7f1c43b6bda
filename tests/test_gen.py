"""The synthetic dataset generator (bitseg.loaders.gen): format, consistency, reproducibility."""

from __future__ import annotations

import gzip
import re
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from bitseg.loaders import gen

PROFILES = 3_500
AS_OF = datetime(2026, 11, 1, tzinfo=timezone.utc)
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MONEY_RE = re.compile(r"^-?\d+\.\d{1,2}$")


def _read(path: Path) -> list[dict[str, Any]]:
    """Every line of a .jsonl or .jsonl.gz file, parsed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return [orjson.loads(line) for line in handle]


def _ts(text: str) -> datetime:
    """An ISO 'YYYY-MM-DDTHH:MM:SSZ' timestamp as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _fits(type_: str, value: Any) -> bool:
    """Whether a JSON value fits a CONTRACT §1 schema type."""
    if type_ == "keyword":
        return isinstance(value, str)
    if type_ == "keywords":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if type_ == "bool":
        return isinstance(value, bool)
    if type_ == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ == "float":
        return isinstance(value, float)
    if type_ == "date":
        return isinstance(value, str) and bool(DATE_RE.match(value)) and bool(
            date.fromisoformat(value))
    if type_ == "timestamp":
        return isinstance(value, str) and bool(TS_RE.match(value))
    raise AssertionError(f"unknown type {type_}")


def _cents(value: float) -> int:
    """A money float as integer cents, asserting it has at most 2 decimals."""
    assert MONEY_RE.match(repr(value)), value
    return round(value * 100)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small multi-chunk dataset (tiny chunks and write slices exercise the seams)."""
    out = tmp_path_factory.mktemp("gen") / "ds"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "CHUNK", 1_000)
        mp.setattr(gen, "WRITE_ROWS", 4_000)
        counts = gen.generate(out, profiles=PROFILES, seed=7)
    return {
        "dir": out,
        "counts": counts,
        "schema": orjson.loads((out / "schema.json").read_bytes()),
        "profiles": _read(out / "profiles.jsonl"),
        "events": _read(out / "events.jsonl"),
        "orders": _read(out / "orders.jsonl"),
    }


def test_writes_the_four_files_and_counts_match_lines(dataset: dict[str, Any]) -> None:
    names = sorted(p.name for p in dataset["dir"].iterdir())
    assert names == ["events.jsonl", "orders.jsonl", "profiles.jsonl", "schema.json"]
    for kind in ("profiles", "events", "orders"):
        raw = (dataset["dir"] / f"{kind}.jsonl").read_bytes()
        assert raw.endswith(b"\n")
        assert raw.count(b"\n") == len(dataset[kind]) == dataset["counts"][kind]
    assert dataset["counts"]["profiles"] == PROFILES
    assert dataset["counts"]["events"] > 5 * PROFILES
    assert dataset["counts"]["orders"] > PROFILES


def test_profiles_have_ids_and_fields_of_declared_types(dataset: dict[str, Any]) -> None:
    declared = dataset["schema"]["profiles"]
    assert [p["id"] for p in dataset["profiles"]] == [f"u{i}" for i in range(PROFILES)]
    for profile in dataset["profiles"]:
        for key, value in profile.items():
            if key != "id" and value is not None:
                assert _fits(declared[key], value), (key, value)
        assert _cents(profile["ltv"]) >= 0
        created = _ts(profile["created_at"])
        assert AS_OF - timedelta(days=3 * 365 + 1) <= created <= AS_OF


def test_events_have_required_keys_and_typed_properties(dataset: dict[str, Any]) -> None:
    declared = dataset["schema"]["events"]
    ids = {p["id"] for p in dataset["profiles"]}
    for event in dataset["events"]:
        assert event["profile"] in ids
        assert isinstance(event["event"], str) and event["event"]
        assert TS_RE.match(event["ts"])
        for key, value in event.items():
            if key not in ("profile", "event", "ts"):
                assert _fits(declared[key], value), (key, value)


def test_orders_have_required_keys_items_and_exact_amounts(dataset: dict[str, Any]) -> None:
    declared = dataset["schema"]["orders"]
    ids = {p["id"] for p in dataset["profiles"]}
    orders = dataset["orders"]
    assert [o["id"] for o in orders] == [f"o{i}" for i in range(len(orders))]
    for order in orders:
        assert order["profile"] in ids and TS_RE.match(order["ts"])
        assert order["currency"] == "EUR"
        assert 1 <= len(order["items"]) <= 5
        for key, value in order.items():
            if key not in ("id", "profile", "ts", "items"):
                assert _fits(declared[key], value), (key, value)
        total = 0
        for item in order["items"]:
            assert set(item) == {"sku", "category", "brand", "qty", "price"}
            for key, value in item.items():
                assert _fits(declared[f"items.{key}"], value), (key, value)
            total += item["qty"] * _cents(item["price"])
        assert _cents(order["amount"]) == total, order


def test_skus_map_consistently_to_brand_category_and_list_price(
        dataset: dict[str, Any]) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for order in dataset["orders"]:
        for item in order["items"]:
            assert seen.setdefault(item["sku"], (item["brand"], item["category"])) == (
                item["brand"], item["category"])
    assert len(seen) > 200
    assert len({b for b, _ in seen.values()}) == 10
    assert len({c for _, c in seen.values()}) == 8
    for event in dataset["events"]:
        if event["event"] == "add_to_cart" and event["sku"] in seen:
            assert seen[event["sku"]][1] == event["category"]


def test_times_respect_signup_windows_and_only_points_are_future(
        dataset: dict[str, Any]) -> None:
    created = {p["id"]: _ts(p["created_at"]) for p in dataset["profiles"]}
    future = 0
    for event in dataset["events"]:
        ts = _ts(event["ts"])
        assert ts >= created[event["profile"]]
        assert ts >= AS_OF - timedelta(days=400)
        if ts > AS_OF:
            assert event["event"] == "points_accrued"
            assert ts <= AS_OF + timedelta(days=14)
            future += 1
    assert future > 0
    for order in dataset["orders"]:
        ts = _ts(order["ts"])
        assert created[order["profile"]] <= ts <= AS_OF
        assert ts >= AS_OF - timedelta(days=2 * 365)


def test_points_and_ltv_agree_with_events_and_orders(dataset: dict[str, Any]) -> None:
    points: Counter[str] = Counter()
    for event in dataset["events"]:
        if event["event"] == "points_accrued" and _ts(event["ts"]) <= AS_OF:
            points[event["profile"]] += event["points"]
    ltv: Counter[str] = Counter()
    for order in dataset["orders"]:
        if order["status"] in ("paid", "delivered"):
            ltv[order["profile"]] += _cents(order["amount"])
    for profile in dataset["profiles"]:
        assert profile["points"] == points[profile["id"]]
        assert _cents(profile["ltv"]) == ltv[profile["id"]]


def test_missing_values_nulls_and_multi_valued_tags_occur(dataset: dict[str, Any]) -> None:
    profiles = dataset["profiles"]
    for field in ("age", "birthday", "city", "gender", "country", "subscribed"):
        assert any(field not in p for p in profiles), field
    for field in ("age", "birthday", "city", "gender"):
        assert any(field in p and p[field] is None for p in profiles), field
    assert any(len(p.get("tags", [])) >= 2 for p in profiles)
    assert all(len(set(p["tags"])) == len(p["tags"]) <= 4 for p in profiles if "tags" in p)
    missing_age = sum(not isinstance(p.get("age"), int) for p in profiles) / len(profiles)
    missing_birthday = sum(not p.get("birthday") for p in profiles) / len(profiles)
    assert 0.04 < missing_age < 0.12
    assert 0.10 < missing_birthday < 0.20


def test_birthdays_include_feb_29_and_agree_with_age(dataset: dict[str, Any]) -> None:
    born = [p for p in dataset["profiles"] if p.get("birthday")]
    assert sum(p["birthday"].endswith("-02-29") for p in born) >= 3
    for profile in born:
        if isinstance(profile.get("age"), int):
            b = date.fromisoformat(profile["birthday"])
            age = AS_OF.year - b.year - ((b.month, b.day) > (AS_OF.month, AS_OF.day))
            assert profile["age"] == age >= 17


def test_activity_is_skewed(dataset: dict[str, Any]) -> None:
    per_profile = Counter(e["profile"] for e in dataset["events"])
    counts = sorted(per_profile.get(p["id"], 0) for p in dataset["profiles"])
    median, top = counts[len(counts) // 2], counts[-1]
    assert median < 10 and top > 20 * max(median, 1)
    kinds = Counter(e["event"] for e in dataset["events"])
    assert set(kinds) >= {"page_view", "popup_opened", "popup_filled", "email_opened",
                          "email_clicked", "app_open", "points_accrued"}
    assert Counter(p.get("country") for p in dataset["profiles"]).most_common(1)[0][0] == "DE"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        gen.generate(tmp_path / name, profiles=400, seed=seed)
    for file in ("schema.json", "profiles.jsonl", "events.jsonl", "orders.jsonl"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    for file in ("profiles.jsonl", "events.jsonl", "orders.jsonl"):
        assert (tmp_path / "a" / file).read_bytes() != (tmp_path / "c" / file).read_bytes()


def test_gzip_output_is_readable_reproducible_and_same_content(tmp_path: Path) -> None:
    plain = gen.generate(tmp_path / "plain", profiles=300, seed=5)
    packed = gen.generate(tmp_path / "gz", profiles=300, seed=5, gzip=True)
    again = gen.generate(tmp_path / "gz2", profiles=300, seed=5, gzip=True)
    assert plain == packed == again
    for kind in ("profiles", "events", "orders"):
        gz_path = tmp_path / "gz" / f"{kind}.jsonl.gz"
        assert not (tmp_path / "gz" / f"{kind}.jsonl").exists()
        with gzip.open(gz_path, "rb") as handle:
            assert handle.read() == (tmp_path / "plain" / f"{kind}.jsonl").read_bytes()
        assert gz_path.read_bytes() == (tmp_path / "gz2" / f"{kind}.jsonl.gz").read_bytes()
        assert len(_read(gz_path)) == packed[kind]


def test_regenerating_replaces_the_other_compression_variant(tmp_path: Path) -> None:
    gen.generate(tmp_path, profiles=50, seed=1, gzip=True)
    gen.generate(tmp_path, profiles=50, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "events.jsonl", "orders.jsonl", "profiles.jsonl", "schema.json"]


def test_as_of_moves_the_present(tmp_path: Path) -> None:
    as_of = datetime(2021, 3, 15, 12, 0)  # naive: UTC
    counts = gen.generate(tmp_path, profiles=200, seed=3, as_of=as_of)
    present = as_of.replace(tzinfo=timezone.utc)
    events = _read(tmp_path / "events.jsonl")
    assert len(events) == counts["events"] > 0
    assert all(_ts(e["ts"]) <= present + timedelta(days=14) for e in events)
    assert max(_ts(p["created_at"]) for p in _read(tmp_path / "profiles.jsonl")) <= present


def test_zero_rates_and_zero_profiles(tmp_path: Path) -> None:
    counts = gen.generate(tmp_path / "a", profiles=10, events_per_profile=0,
                          orders_per_profile=0)
    assert counts == {"profiles": 10, "events": 0, "orders": 0}
    assert (tmp_path / "a" / "events.jsonl").read_bytes() == b""
    assert all(p["points"] == 0 and p["ltv"] == 0.0
               for p in _read(tmp_path / "a" / "profiles.jsonl"))
    assert gen.generate(tmp_path / "b", profiles=0) == {"profiles": 0, "events": 0, "orders": 0}


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen.generate(tmp_path, profiles=20, seed=1, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "20" in captured.err


@pytest.mark.parametrize("kwargs", [{"profiles": -1}, {"profiles": 5, "seed": -1},
                                    {"profiles": 5, "events_per_profile": -1.0}])
def test_rejects_impossible_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        gen.generate(tmp_path, **kwargs)


def _gen_cli(out: Path, *extra: str) -> int:
    from bitseg.server.cli import main

    return main(["gen", str(out), "--profiles", "150", "--seed", "4", "--quiet", *extra])


def test_cli_default_present_is_the_fixed_reproducible_one(tmp_path: Path) -> None:
    # Benchmarks and tests count on the default: data leading up to 2026-11-01.
    assert gen.DEFAULT_AS_OF == AS_OF
    assert _gen_cli(tmp_path / "cli") == 0
    gen.generate(tmp_path / "api", profiles=150, seed=4, as_of=AS_OF)
    for name in ("profiles.jsonl", "events.jsonl", "orders.jsonl"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


@pytest.mark.parametrize("text", ["2021-03-15T12:00:00Z", "2021-03-15T13:00:00+01:00",
                                  "2021-03-15T12:00:00"])
def test_cli_present_takes_an_iso_time(tmp_path: Path, text: str) -> None:
    assert _gen_cli(tmp_path / "cli", "--present", text) == 0
    gen.generate(tmp_path / "api", profiles=150, seed=4, as_of=datetime(2021, 3, 15, 12))
    for name in ("profiles.jsonl", "events.jsonl", "orders.jsonl"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


def test_cli_present_now_leads_up_to_this_moment(tmp_path: Path) -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    assert _gen_cli(tmp_path, "--present", "now", "--orders-per-profile", "20") == 0
    after = datetime.now(timezone.utc)
    orders = [_ts(o["ts"]) for o in _read(tmp_path / "orders.jsonl")]
    signups = [_ts(p["created_at"]) for p in _read(tmp_path / "profiles.jsonl")]
    assert max(orders) <= after and max(signups) <= after
    assert max(orders) > before - timedelta(days=3)  # 3,000 orders: some in the last days


def test_cli_present_rejects_other_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    assert _gen_cli(tmp_path, "--present", "yesterday") == 2
    assert capsys.readouterr().err == (
        "bitseg: --present: expected 'now' or an ISO 8601 time such as 2026-11-01T00:00:00Z, "
        "got 'yesterday'\n")
    assert not (tmp_path / "profiles.jsonl").exists()
