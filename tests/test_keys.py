"""The stored bytes of every key layout (index/keys.py), pinned: stores written before
the layouts were brought into one module must open and read as they did. The expected
keys are spelled out here byte by byte, with their own digest, not keys.py's."""

from __future__ import annotations

import hashlib
import struct
from datetime import date

from pyroaring import BitMap

from bitseg.index import keys as K
from bitseg.index.engine import Engine
from bitseg.index.segments import open_segments
from bitseg.index.store import CHUNK_BITS, Store
from bitseg.loaders.dataset import load_dataset

TS = "2026-10-30T00:00:00Z"
CHUNK0 = b"\x00" + b"\x00\x00\x00\x00"  # 0 u32(0): chunk 0 of a bitmap


def blake(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=20).hexdigest().encode()


def entries(store: Store, db: str) -> dict[bytes, bytes]:
    with store.read() as txn:
        return {bytes(k): bytes(v) for k, v in store.items(txn, db)}


def test_name_limits_are_the_stores_and_fit_lmdb_keys():
    assert K.MAX_KEY_BYTES == 511
    assert (K.BITMAP_NAME_BYTES, K.STREAM_NAME_BYTES, K.ORDER_NAME_BYTES) == (506, 500, 400)
    assert K.BITMAP_NAME_BYTES + len(b"\x00") + 4 <= K.MAX_KEY_BYTES
    assert K.STREAM_NAME_BYTES + len(b"cd") + 4 <= K.MAX_KEY_BYTES
    assert K.ORDER_NAME_BYTES + len(b"b\x1f\x00") + 4 <= K.MAX_KEY_BYTES
    assert K.digest(b"x") == blake(b"x") and len(K.digest(b"x")) == 40


def test_profile_bitmaps_at_the_name_limit_and_past_it(tmp_path):
    fits, past = "v" * 496, "w" * 497  # names of 506 and 507 bytes: "p␟ref␟v␟" + JSON
    with Engine.open(tmp_path / "s") as engine:
        engine.upsert_profiles([{"id": "a", "ref": fits}, {"id": "b", "ref": past}])
        bitmaps, meta = entries(engine.store, "bitmaps"), entries(engine.store, "meta")
    text = b'"' + past.encode() + b'"'
    assert set(bitmaps) == {b"live" + CHUNK0, b"p\x1fref\x1fx" + CHUNK0,
                            b'p\x1fref\x1fv\x1f"' + fits.encode() + b'"' + CHUNK0,
                            b"p\x1fref\x1fh\x1f" + blake(text) + CHUNK0}
    assert len(b'p\x1fref\x1fv\x1f"' + fits.encode() + b'"') == 506
    assert BitMap.deserialize(bitmaps[b"p\x1fref\x1fh\x1f" + blake(text) + CHUNK0]) == BitMap([1])
    assert meta[b"value:" + blake(text)] == text
    with Engine.open(tmp_path / "s") as engine:  # and they read back as the values
        assert engine.members({"field": "ref", "op": "eq", "value": past}) == ["b"]
        assert engine.members({"field": "ref", "op": "eq", "value": fits}) == ["a"]


def test_event_streams_at_the_name_limit_and_past_it(tmp_path):
    fits, past = "v" * 488, "w" * 489  # "view␟page␟" + JSON: 500 and 501 bytes
    with Engine.open(tmp_path / "s") as engine:
        engine.track_events([{"profile": "a", "event": "view", "ts": TS, "page": fits},
                             {"profile": "a", "event": "view", "ts": TS, "page": past}])
        events = entries(engine.store, "events")
    day = struct.pack(">I", (date(2026, 10, 30) - date(1970, 1, 1)).days + 2**31)
    streams = {b"view", b'view\x1fpage\x1f"' + fits.encode() + b'"',
               b"view\x1fpage\x1f#" + blake(b'"' + past.encode() + b'"')}
    assert {k[6:] for k in events if k.startswith(b"cd")} == streams
    assert all(b"cd" + day + stream in events for stream in streams)
    assert {k[2:] for k in events if k.startswith(b"kd")} == streams
    assert b"bview\x1f" + day + struct.pack(">I", 0) in events
    assert b"v-catalog" in events


def test_order_bitmaps_at_the_name_limit_and_past_it(tmp_path):
    fits, past = "v" * 389, "w" * 390  # "v␟status␟" + JSON: 400 and 401 bytes
    with Engine.open(tmp_path / "s") as engine:
        engine.add_orders([{"id": "o1", "profile": "a", "ts": TS, "status": fits},
                           {"id": "o2", "profile": "a", "ts": TS, "status": past}])
        orders = entries(engine.store, "orders")
    long_name = b'v\x1fstatus\x1f"' + past.encode() + b'"'
    short = b"#" + blake(long_name)
    bitmaps = {k for k in orders if k.startswith(b"b\x1f")}
    assert {b"b\x1flive" + CHUNK0, b"b\x1fx\x1fstatus" + CHUNK0,
            b'b\x1fv\x1fstatus\x1f"' + fits.encode() + b'"' + CHUNK0,
            b"b\x1f" + short + CHUNK0} <= bitmaps
    assert orders[b"n\x1f" + short] == long_name
    assert orders[b"i\x1fo2"] == struct.pack(">I", 1)
    assert b"r\x1f" + struct.pack(">I", 1) in orders and b"meta" in orders
    with Engine.open(tmp_path / "s") as engine:
        rule = {"orders": {"field": "status", "op": "eq", "value": past},
                "having": {"agg": "count", "op": "gte", "value": 1}}
        assert engine.members(rule) == ["a"]


def test_segment_keys(tmp_path):
    with Engine.open(tmp_path / "s") as engine:
        engine.upsert_profiles([{"id": "a"}, {"id": "b"}])
        open_segments(engine).create("vip", "static", ids=["b"], as_of=TS)
        found = entries(engine.store, "segments")
    at = (date(2026, 10, 30) - date(1970, 1, 1)).days * 86_400_000_000
    assert set(found) == {b"d\x00vip", b"m\x00vip\x00" + struct.pack(">I", 0),
                          b"h\x00vip\x00" + struct.pack(">QI", at + 2**63, 0)}
    assert BitMap.deserialize(found[b"m\x00vip\x00\x00\x00\x00\x00"]) == BitMap([1])


def test_put_chunks_writes_touched_chunks_and_replaces_the_whole(tmp_path):
    store = Store(tmp_path / "s")
    prefix, step = b"b\x1fname\x00", 1 << CHUNK_BITS
    bitmap = BitMap([1, 2, 2 * step + 5])
    with store.write() as txn:
        store.put_chunks(txn, "orders", prefix, BitMap([step + 1]), None)
        store.put_chunks(txn, "orders", prefix, bitmap, None)  # replaces chunk 1
    assert entries(store, "orders") == {prefix + K.u32(0): BitMap([1, 2]).serialize(),
                                        prefix + K.u32(2): BitMap([2 * step + 5]).serialize()}
    with store.write() as txn:  # chunk 0 left without ids is deleted; 2 is not touched
        store.put_chunks(txn, "orders", prefix, BitMap([7 * step]), [0, 7])
    assert set(entries(store, "orders")) == {prefix + K.u32(2), prefix + K.u32(7)}
    store.close()


def test_event_keys_split_back_into_their_parts():
    stream = K.stream_key("view", "page", "/a")
    assert stream == 'view\x1fpage\x1f"/a"' and not K.stream_digested(stream)
    assert K.stream_digested(K.stream_key("view", "page", "x" * 600))
    assert K.count_key(b"d", -3, stream) == b"cd" + struct.pack(">I", 2**31 - 3) + \
        stream.encode()
    assert K.count_parts(K.count_key(b"d", -3, stream)) == (b"d", -3, stream)
    assert K.block_key("view", 20_000, 7) == b"bview\x1f" + struct.pack(">II", 2**31 + 20_000, 7)
    assert K.block_parts(K.block_key("view", -1, 7)) == ("view", -1, 7)
    assert K.catalog_parts(K.catalog_key(b"t", "view")) == (b"t", "view")


def test_order_rows_of_a_load_are_runs_after_every_other_key(tmp_path):
    """A load's rows: "s" SEP u32(first id), the last prefix of "orders" (appended)."""
    lines = b"".join(b'{"id":"o%d","profile":"a","ts":"%s","amount":%d}\n' % (i, TS.encode(), i)
                     for i in range(3))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "orders.jsonl").write_bytes(lines)
    (tmp_path / "d" / "profiles.jsonl").write_bytes(b'{"id":"a"}\n')
    with Engine.open(tmp_path / "s") as engine:
        load_dataset(tmp_path / "d", engine)
        orders = entries(engine.store, "orders")
    assert [k for k in orders if k.startswith((b"r\x1f", b"s\x1f"))] == [
        b"s\x1f" + struct.pack(">I", 0)]
    assert max(orders) == b"s\x1f" + struct.pack(">I", 0)
