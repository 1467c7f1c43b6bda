"""The block split (issue 16, session 9) writes what the line-at-a-time split wrote.

`reference_split` below is the split as it was before blocks and worker processes: one
line at a time, parsed by orjson, hashed by shard_of. The block split must write the
same bytes to every shard's copy (gzip'd copies compared decompressed) and refuse the
same first line with the same words, with blocks of a few bytes (so lines and blocks
end anywhere) and with worker processes.
"""

from __future__ import annotations

import csv
import gzip
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitseg.index.errors import DataError
from bitseg.index.shard_key import shard_of
from bitseg.loaders import gen
from bitseg.loaders import split as block_split
from bitseg.loaders.dataset import (
    EVENT_FILES,
    ORDER_FILES,
    PROFILE_FILES,
    _parse_line,
    _pick,
)
from bitseg.loaders.split import copy_name, shard_folder, split_dataset

BOM = b"\xef\xbb\xbf"


# ------------------------------------------------------------- the naive reference
def _reference_file(file: Path, key: str, shards: int) -> list[bytes]:
    """Each shard's copy of one JSON Lines file, line at a time; DataError as the split
    told it before blocks."""
    copies = [b""] * shards
    opener: Any = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as stream:
        for number, line in enumerate(stream, 1):
            if line.isspace() or not line:
                continue
            if number == 1 and line.startswith(BOM):
                line = line[len(BOM):]
            record = _parse_line(line, file.name, number)
            try:
                shard = shard_of(record.get(key), shards)
            except DataError as exc:
                raise DataError(exc.reason, field=key, file=file.name,
                                line=number) from None
            copies[shard] += line if line.endswith(b"\n") else line + b"\n"
    return copies


def _reference_csv(file: Path, shards: int) -> list[bytes]:
    """Each shard's copy of profiles.csv: the header, then its records."""
    copies: list[list[list[str]]] = [[] for _ in range(shards)]
    with open(file, encoding="utf-8-sig", newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader)
        at = [h.strip() for h in header].index("id")
        for shard in copies:
            shard.append(header)
        for row in reader:
            if any(cell.strip() for cell in row):
                copies[shard_of(row[at], shards)].append(row)
    found = []
    for rows in copies:
        with open(file.parent / "_written.csv", "w", encoding="utf-8", newline="") as out:
            csv.writer(out).writerows(rows)
        found.append((file.parent / "_written.csv").read_bytes())
    (file.parent / "_written.csv").unlink()
    return found


def reference_split(source: Path, shards: int) -> dict[str, list[bytes]]:
    """{copy name: each shard's copy, uncompressed} of the whole dataset."""
    found: dict[str, list[bytes]] = {}
    for names, key in ((PROFILE_FILES, "id"), (EVENT_FILES, "profile"),
                       (ORDER_FILES, "profile")):
        file = _pick(source, names)
        if file is None:
            continue
        if file.name.endswith(".csv"):
            found[file.name] = _reference_csv(file, shards)
        else:
            found[copy_name(file.name)] = _reference_file(file, key, shards)
    return found


def written(out: Path, shards: int, names: list[str], compress: bool) -> dict[str, list[bytes]]:
    """What split_dataset wrote, by copy name, decompressed."""
    found: dict[str, list[bytes]] = {}
    for name in names:
        if compress and not name.endswith(".csv"):
            found[name] = [gzip.decompress((shard_folder(out, s) / (name + ".gz")).read_bytes())
                           for s in range(shards)]
        else:
            found[name] = [(shard_folder(out, s) / name).read_bytes() for s in range(shards)]
    return found


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", call()
    except DataError as exc:
        return "error", (str(exc), exc.file, exc.line, exc.field)
    except UnicodeEncodeError as exc:  # an id with a lone surrogate
        return "unicode", str(exc)


def _small_blocks(stack: ExitStack, workers: bool) -> None:
    """Blocks of 97 bytes (lines cut anywhere); worker processes even for a tiny file;
    ids whose shard is remembered forgotten after 3."""
    stack.enter_context(mock.patch.object(block_split, "BLOCK_BYTES", 97))
    stack.enter_context(mock.patch.object(block_split, "KNOWN_IDS", 3))
    stack.enter_context(mock.patch.object(block_split, "PARALLEL_BYTES",
                                          0 if workers else 1 << 60))


def assert_same_split(source: Path, out: Path, shards: int, compress: bool,
                      workers: bool) -> None:
    expected = _outcome(lambda: reference_split(source, shards))
    with ExitStack() as stack:
        _small_blocks(stack, workers)
        got = _outcome(lambda: split_dataset(source, shards, out, compress))
    if expected[0] != "ok":
        assert got == expected
        return
    assert got[0] == "ok", got
    names = list(expected[1])
    assert written(out, shards, names, compress) == expected[1]
    counted = {copy_name(n): c for n, c in got[1].lines.items()}
    assert counted == {n: sum(c.count(b"\n") for c in copies) - (n.endswith(".csv") * shards)
                       for n, copies in expected[1].items()}


# ------------------------------------------------------------------- the generator's data
@pytest.mark.parametrize(("compress", "workers"), [(False, True), (True, False)])
def test_the_generators_data_splits_as_before(tmp_path: Path, compress: bool,
                                              workers: bool) -> None:
    gen.generate(tmp_path / "data", profiles=300, seed=9)
    assert_same_split(tmp_path / "data", tmp_path / "split", 3, compress, workers)


def test_gzipped_inputs_and_csv_profiles_split_as_before(tmp_path: Path) -> None:
    gen.generate(tmp_path / "data", profiles=200, seed=10, gzip=True)
    people = [orjson.loads(line) for line in
              gzip.decompress((tmp_path / "data" / "profiles.jsonl.gz").read_bytes()).splitlines()]
    (tmp_path / "data" / "profiles.jsonl.gz").unlink()
    with open(tmp_path / "data" / "profiles.csv", "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "country"])
        for person in people:
            writer.writerow([person["id"], person.get("country", "")])
    assert_same_split(tmp_path / "data", tmp_path / "split", 2, False, True)


# ------------------------------------------------------------------ adversarial lines
IDS = st.one_of(
    st.text(min_size=0, max_size=6),  # unicode, empty, quotes and backslashes
    st.integers(-(2 ** 63), 2 ** 63 - 1), st.booleans(), st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["u1", "u2", '"profile":"u1"', '{"id":"x"}', "\\", "\u00e9", "1"]),
    st.lists(st.just("u1"), max_size=1))
OTHER = st.dictionaries(st.sampled_from(["event", "ts", "p", "id", "profile", "n"]),
                        st.one_of(IDS, st.dictionaries(st.sampled_from(["id", "profile"]),
                                                       IDS, max_size=2)), max_size=3)


GOOD_IDS = st.one_of(st.text(min_size=1, max_size=6), st.integers(-(2 ** 63), 2 ** 63 - 1),
                    st.sampled_from(["u1", "u2", '"id":"u1"', "\\", "\u00e9", "1"]))


@st.composite
def lines(draw: st.DrawFn, key: str, good: bool) -> bytes:
    """One line: an object with the key (first, last, nested before it, twice, escaped,
    missing), a blank line, or something that is not an object; with `good` an object
    with an id (or a blank line)."""
    if good:
        if draw(st.integers(0, 9)) == 0:
            return draw(st.sampled_from([b"", b" ", b"\t", b"\r", b" \x0b\x0c "]))
        record = draw(OTHER)
        record.pop(key, None)
        record[draw(st.sampled_from([key, "_"]))] = draw(GOOD_IDS)
        record[key] = draw(GOOD_IDS)
        if draw(st.booleans()):  # the key first
            record = {key: record.pop(key), **record}
        return _dressed(draw, orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS))
    kind = draw(st.sampled_from(["object"] * 8 + ["blank", "broken", "not object"]))
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t", b"\r", b" \x0b\x0c "]))
    if kind == "broken":
        return draw(st.sampled_from([b"{", b'{"' + key.encode() + b'":"u1"', b"{'id': 1}",
                                     b'{"' + key.encode() + b'":"u1"}}', b"\xff\xfe",
                                     b'{"' + key.encode() + b'":"\\ud800"}', b"nul"]))
    if kind == "not object":
        return draw(st.sampled_from([b"[]", b'["u1"]', b"1", b'"u1"', b"null"]))
    record = draw(OTHER)
    if draw(st.booleans()):
        record[key] = draw(IDS)
    text = orjson.dumps(record)
    if draw(st.booleans()) and key in record:  # the key twice: the last one counts
        text = text[:-1] + (b"," if len(record) else b"") + b'"' + key.encode() + \
            b'":' + orjson.dumps(draw(IDS)) + b"}"
    return _dressed(draw, text)


def _dressed(draw: st.DrawFn, text: bytes) -> bytes:
    """The line with escapes where orjson writes none, or spaces where it writes none."""
    if b"null" not in text and b"true" not in text and draw(st.booleans()):
        text = text.replace(b"u", b"\\u0075").replace(b"\\\\u0075", b"\\\\u")
    if draw(st.booleans()):
        text = b" " + text.replace(b":", b" : ").replace(b",", b" ,\t") + b" \r"
    return text


@st.composite
def datasets(draw: st.DrawFn) -> dict[str, bytes]:
    """A dataset folder's JSON Lines files (line 1 with a BOM or not, the last line
    ending in a newline or not)."""
    files = {}
    for name, key in (("profiles.jsonl", "id"), ("events.jsonl", "profile")):
        good = draw(st.lists(lines(key, True), min_size=1, max_size=12))
        for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # a line the split may refuse
            good.insert(draw(st.integers(0, len(good))), draw(lines(key, False)))
        body = b"\n".join(good)
        if draw(st.booleans()):
            body += b"\n"
        if draw(st.integers(0, 5)) == 0:
            body = BOM + body
        if name == "events.jsonl" and draw(st.booleans()):
            name += ".gz"
            body = gzip.compress(body)
        files[name] = body
    return files


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(files=datasets(), shards=st.sampled_from([1, 2, 3]), compress=st.booleans(),
       workers=st.sampled_from([False, False, False, True]))
def test_adversarial_lines_split_as_before(tmp_path_factory: pytest.TempPathFactory,
                                           files: dict[str, bytes], shards: int,
                                           compress: bool, workers: bool) -> None:
    root = tmp_path_factory.mktemp("adversarial")
    (root / "data").mkdir()
    for name, body in files.items():
        (root / "data" / name).write_bytes(body)
    assert_same_split(root / "data", root / "split", shards, compress, workers)


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("workers", [False, True])
def test_the_first_bad_line_in_file_order_is_named(tmp_path: Path, workers: bool) -> None:
    gen.generate(tmp_path / "data", profiles=100, seed=12)
    events = tmp_path / "data" / "events.jsonl"
    lines = events.read_bytes().splitlines(keepends=True)
    lines[40] = b'{"profile": true, "event": "view"}\n'  # a bad id, then bad JSON later
    lines[90] = b'{"profile": "u1", \n'
    events.write_bytes(b"".join(lines))
    with ExitStack() as stack:
        _small_blocks(stack, workers)
        with pytest.raises(DataError) as caught:
            split_dataset(tmp_path / "data", 2, tmp_path / "split")
    assert (caught.value.file, caught.value.line, caught.value.field) == \
        ("events.jsonl", 41, "profile")
    assert str(caught.value) == ("events.jsonl, line 41, field 'profile': expected a "
                                 "non-empty string or integer id")
