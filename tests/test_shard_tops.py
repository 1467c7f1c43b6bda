"""Dynamic segments with a `top` rule, and bulk actions on top rules, over 1, 2 and 3
shards, against one plain store built from the same records (server/shard_reads.py,
"asked again"; server/shard_actions.py).

The data is test_shard_segments': `n` takes 4 values, so every top cut falls among tied
profiles and the tie-break (external id, ascending) decides across shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_shard_segments import BEST, NESTED, Plain, records, sharded
from test_shards import AS_OF, Front, nodes

from bitseg import Client
from bitseg.server.shard_reads import resolve_tops

IDS = [str(p["id"]) for p in records()] + ["nobody"]
KEPT = [p for p in IDS[:-1] if p != "p3"]  # (deleted below)
# dynamic segments: a top of their own, a top inside a top, a top of a top segment, and
# segments naming them under and/or/not, through a segment between
DYNAMIC = {
    "best": BEST,
    "nested": NESTED,
    "inner": {"top": {"n": 2, "by": "x", "of": {"segment": "best"}}},
    "uses": {"and": [{"segment": "best"}, {"not": {"field": "x", "op": "gt", "value": 1}}]},
    "chain": {"or": [{"segment": "uses"}, {"not": {"segment": "nested"}}]},
    "plain": {"field": "n", "op": "gt", "value": 1},
}
RULES = [
    {"segment": "best"},
    {"segment": "chain"},
    {"segment": "inner"},
    {"and": [{"segment": "best"}, {"not": {"segment": "nested"}}]},
    {"not": {"segment": "best"}},
    {"or": [{"top": {"n": 3, "by": "x", "of": {"segment": "uses"}}}, {"segment": "inner"}]},
]


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Plain]:
    found = Plain(tmp_path / "plain")
    yield found
    found.close()


@pytest.fixture(params=[1, 2, 3])
def front(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Front]:
    found = sharded(tmp_path, request.param)
    yield found
    found.close()


def reads(client: Client) -> dict[str, Any]:
    """Every read that names the dynamic top segments, as comparable data."""
    found: dict[str, Any] = {}
    for rule in RULES:
        key = repr(rule)
        batch = client.is_member_many(IDS, rule, as_of=AS_OF)
        found[key] = (client.count(rule, as_of=AS_OF),
                      sorted(client.members(rule, as_of=AS_OF)),
                      batch.answers, batch.unknown,
                      [client.is_member(p, rule, as_of=AS_OF) for p in KEPT[:6]],
                      nodes(client.explain(rule, as_of=AS_OF).root),
                      client.metrics(rule, as_of=AS_OF).profiles,
                      client.preview(rule, as_of=AS_OF).total)
    found["sizes"] = {s.name: s.size for s in client.list_segments()}
    found["got"] = {name: client.get_segment(name).size for name in DYNAMIC}
    found["of"] = {p: client.segments_of(p) for p in KEPT}
    many = client.segments_of_many(IDS)
    found["of_many"] = (many.segments, many.unknown)
    overlap = client.overlap(list(DYNAMIC), as_of=AS_OF)
    found["overlap"] = (overlap.sizes, overlap.matrix)
    for name in ("best", "chain"):  # number fields: a search over the shards' values
        found[f"insights {name}"] = client.insights(segment=name, fields=["n", "x"],
                                                    as_of=AS_OF)
        found[f"insights {name}"].pop("eval_micros")
    return found


def test_reads_naming_a_dynamic_top_segment_are_one_stores(plain: Plain, front: Front
                                                           ) -> None:
    for client in (plain.client, front.client):
        for name, rule in DYNAMIC.items():
            made = client.create_segment(name, "dynamic", rule)
            assert made.name == name
    expected = reads(plain.client)
    assert expected[repr({"segment": "best"})][0] == 5
    assert 0 < expected[repr({"segment": "chain"})][0] < len(IDS) - 1
    assert reads(front.client) == expected
    # a write that moves profiles in and out of the top 5: raised, lowered, deleted
    changed = [{"id": "p2", "n": 3}, {"id": "p5", "n": 9}, {"id": 8, "n": -1},
               {"id": "p13", "n": 3}]
    for client in (plain.client, front.client):
        client.upsert_profiles(changed)
        client.delete_profiles(["p3"])
    again = reads(plain.client)
    assert again[repr({"segment": "best"})][1] != expected[repr({"segment": "best"})][1]
    assert reads(front.client) == again


def test_segments_naming_a_dynamic_top_segment_are_one_stores(plain: Plain, front: Front
                                                              ) -> None:
    """A materialized segment and a static one made from a rule naming one, a dynamic
    segment updated to a top rule, and a size recorded."""
    for client in (plain.client, front.client):
        client.create_segment("best", "dynamic", {"field": "n", "op": "gt", "value": 1})
        client.update_segment("best", BEST)  # refused over shards before
        client.create_segment("inner", "dynamic", DYNAMIC["inner"])
        client.create_segment("mat", "materialized", {"segment": "inner"}, as_of=AS_OF)
        client.create_segment("stat", "static", {"not": {"segment": "best"}}, as_of=AS_OF)
        client.record_segment_size("inner", as_of=AS_OF)
        client.add_tags("inner", ["vip"])
        client.upsert_profiles([{"id": "p5", "n": 9}])
        client.refresh_segment("mat", as_of=AS_OF)

    def state(client: Client) -> Any:
        return ({s.name: (s.size, s.tags) for s in client.list_segments()},
                {n: sorted(client.members(segment=n, as_of=AS_OF))
                 for n in ("best", "inner", "mat", "stat")},
                [(p.size, p.cause) for p in client.segment_history("inner")],
                [(p.size, p.cause) for p in client.segment_history("mat")])

    expected = state(plain.client)
    assert "p5" in expected[1]["best"] and expected[1]["mat"] and expected[1]["stat"]
    assert state(front.client) == expected


AUDITED = ("action", "field", "value", "rule", "segment", "members", "changed")


def test_bulk_actions_on_top_rules_are_one_stores(plain: Plain, front: Front) -> None:
    asked = [({"rule": BEST}, "set", "tier", "gold"),
             ({"segment": "best"}, "set", "tier", "silver"),
             ({"rule": {"and": [NESTED, {"not": {"segment": "best"}}]}}, "add", "tags", "t"),
             ({"segment": "inner"}, "unset", "tier", None)]
    answers: dict[Client, list[Any]] = {}
    for client in (plain.client, front.client):
        client.create_segment("best", "dynamic", BEST)
        client.create_segment("inner", "dynamic", DYNAMIC["inner"])
        answers[client] = []
        for target, action, field, value in asked:
            dry = client.bulk_action(action, field, value, dry_run=True, as_of=AS_OF,
                                     **target)
            done = client.bulk_action(action, field, value, as_of=AS_OF, **target)
            answers[client].append((dry["members"], dry["changed"], done["members"],
                                    done["changed"]))
            client.upsert_profiles([{"id": "p5", "n": 9}])  # the next one's top moves
    assert answers[front.client] == answers[plain.client]
    assert answers[plain.client][0] == (5, 5, 5, 5)
    assert all(a[2] for a in answers[plain.client])

    def state(client: Client) -> Any:
        return ([{k: e[k] for k in AUDITED} for e in client.actions()],
                {v: sorted(client.members({"field": "tier", "op": "eq", "value": v}))
                 for v in ("gold", "silver")},
                sorted(client.members({"field": "tags", "op": "eq", "value": "t"})))

    assert state(front.client) == state(plain.client)


def test_an_export_of_a_dynamic_top_segment_is_one_stores(plain: Plain, front: Front,
                                                          tmp_path: Path) -> None:
    from bitseg.index.exports import Exports, ExportScheduler
    from bitseg.server.shard_reads import ShardExports

    written = {}
    for name, client, exports in (("plain", plain.client, Exports(plain.engine)),
                                  ("front", front.client, ShardExports(front.shards))):
        client.create_segment("best", "dynamic", BEST)
        client.create_segment("inner", "dynamic", DYNAMIC["inner"])
        client.create_export_schedule("inner", 3600, ["n", "x"], str(tmp_path / name),
                                      format="jsonl")
        client.create_export_schedule("best", 3600, ["n"], str(tmp_path / name),
                                      format="jsonl")
        assert len(ExportScheduler(exports).run_once()) == 2
        written[name] = {s: sorted((tmp_path / name / f"{s}-000001.jsonl").read_text()
                                   .splitlines()) for s in ("best", "inner")}
    assert written["front"] == written["plain"]
    assert len(written["plain"]["best"]) == 5 and len(written["plain"]["inner"]) == 2


def test_a_shard_of_several_never_answers_its_own_top(plain: Plain, front: Front) -> None:
    """Asked directly, without the front's sets, it refuses; through the front the
    sets are chosen first, a split of such a segment's too."""
    shards = front.shards
    for client in (plain.client, front.client):
        client.create_segment("best", "dynamic", BEST)
    ok, answer = shards._wait(0, shards._submit(0, "count", ({"segment": "best"}, AS_OF)))
    if shards.count == 1:  # one shard's top N is the store's
        assert (ok, answer) == (True, front.client.count(segment="best", as_of=AS_OF))
    else:
        assert not ok and answer[1] == "TopsUnresolved"
    pieces = {}
    for name, client in (("plain", plain.client), ("front", front.client)):
        made = client.split_segment("best", "s1", {"a": 50, "rest": 50}, as_of=AS_OF)
        pieces[name] = {s.name: sorted(client.members(segment=s.name, as_of=AS_OF))
                        for s in made}
    assert pieces["front"] == pieces["plain"]
    assert sum(len(m) for m in pieces["plain"].values()) == 5


def test_top_sets_chosen_before_a_segment_changed_are_chosen_again(plain: Plain,
                                                                   front: Front) -> None:
    shards = front.shards
    for client in (plain.client, front.client):
        client.create_segment("best", "dynamic", BEST)
    stale = resolve_tops(shards, {"segment": "best"}, AS_OF)
    for client in (plain.client, front.client):
        client.update_segment("best", {"top": {"n": 5, "by": "x"}})
    expected = sorted(plain.client.members(segment="best", as_of=AS_OF))
    asked = ("page", {"segment": "best"}, AS_OF, None, 10)  # (.., ids, external ids, ..)
    found = shards.each("with_tops", per_shard=[(mine, *asked) for mine in stale])
    assert sorted(e for page in found for e in page[4]) == expected
    assert shards.call(0, "with_tops", stale[0], *asked)[4] == found[0][4]
