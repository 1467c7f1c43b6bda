"""bitseg.aio.Client against a real `bitseg serve`: the same answers, results and errors
as the synchronous client, awaited (run with asyncio.run: no pytest plugin needed)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from conftest_grpc import ServerProcess

from bitseg import aio, errors
from bitseg.client import Client, MembershipChange, Page, Profile, Segment, UpsertResult

AS_OF = "2026-11-01T00:00:00Z"
N = 120
TOKEN = "aio-write-1"
EVEN = {"field": "n", "op": "in", "value": list(range(0, N, 2))}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("aio")
    (tmp / "tokens").write_text(f"write {TOKEN}\n")
    server = ServerProcess(tmp / "db", ["--tokens", str(tmp / "tokens")])
    try:
        yield server
    finally:
        server.stop()


def run(server: ServerProcess, scenario: Any) -> Any:
    """Run `scenario(client)` with a fresh aio client in a fresh event loop."""
    async def main() -> Any:
        async with aio.Client(server.addr, token=TOKEN) as client:
            return await scenario(client)
    return asyncio.run(main())


def test_ingest_evaluate_and_stream(server: ServerProcess) -> None:
    async def scenario(c: aio.Client) -> None:
        upserted = await c.upsert_profiles([{"id": f"p{i}", "n": i} for i in range(N)],
                                           batch_size=50)
        assert upserted == UpsertResult(batches=3, created=N, updated=0,
                                        version=upserted.version)
        assert await c.track_events([{"profile": "p1", "event": "open", "ts": AS_OF}]) == 1
        assert await c.add_orders([{"id": "o1", "profile": "p2", "ts": AS_OF,
                                    "amount": 5}]) == 1
        assert await c.health() == "SERVING"
        assert await c.count(EVEN) == N // 2
        assert (await c.count_result(EVEN, as_of=AS_OF)).count == N // 2
        ids = [i async for i in c.members(EVEN, page_size=7)]
        assert ids == [f"p{i}" for i in range(0, N, 2)]
        pages = [p async for p in c.pages(EVEN, page_size=25, limit=30)]
        assert all(isinstance(p, Page) for p in pages)
        assert [len(p.ids) for p in pages] == [25, 5] and pages[0].total == N // 2
        rest = [i async for i in c.members(EVEN, cursor=pages[-1].cursor)]
        assert ids == [*(i for p in pages for i in p.ids), *rest]
        rows = [r async for r in c.rows(["n"], EVEN, limit=2)]
        assert rows == [Profile("p0", {"n": 0}), Profile("p2", {"n": 2})]
        assert await c.is_member("p2", EVEN) is True
        assert await c.is_member("p3", EVEN) is False
        assert await c.profile("p3") == Profile("p3", {"n": 3})
        assert (await c.preview(EVEN, limit=1)).profiles == [Profile("p0", {"n": 0})]
        assert (await c.explain(EVEN)).root.count == N // 2
        assert (await c.metrics(EVEN, as_of=AS_OF)).orders == 1
        assert await c.delete_profiles(["p118"]) == 1

    run(server, scenario)
    with Client(server.addr, token=TOKEN) as sync:  # the same store, the same answers
        assert sync.count(EVEN) == N // 2 - 1


def test_segments_and_the_same_results_as_the_sync_client(server: ServerProcess) -> None:
    async def scenario(c: aio.Client) -> list[Any]:
        made = await c.create_segment("few", "static", profile_ids=["p4", "p6", "ghost"])
        assert isinstance(made, Segment) and made.unknown_ids == ["ghost"]
        await c.create_segment("even", "materialized", rule=EVEN, as_of=AS_OF)
        assert await c.add_to_segment("few", ["p8"]) == MembershipChange(1, 3, [])
        await c.remove_from_segment("few", ["p8"])
        await c.refresh_segment("even", as_of=AS_OF)
        await c.record_segment_size("few", as_of=AS_OF)
        await c.update_segment("even", refresh_every=3600)
        return [await c.get_segment("few"), await c.list_segments(),
                await c.segment_history("few"), await c.segments_of("p4", as_of=AS_OF),
                await c.overlap(["few", "even"], as_of=AS_OF)]

    got = run(server, scenario)
    with Client(server.addr, token=TOKEN) as sync:
        want = [sync.get_segment("few"), sync.list_segments(), sync.segment_history("few"),
                sync.segments_of("p4", as_of=AS_OF), sync.overlap(["few", "even"], as_of=AS_OF)]
    assert [g for g in got if not hasattr(g, "eval_micros")] \
        == [w for w in want if not hasattr(w, "eval_micros")]
    assert got[-1].matrix == want[-1].matrix == [[2, 2], [2, N // 2 - 1]]
    assert [(s.name, s.refresh_every) for s in got[1]] == [("even", 3600), ("few", None)]

    async def delete(c: aio.Client) -> None:
        await c.delete_segment("few")
        await c.delete_segment("even")
    run(server, delete)


def test_typed_errors(server: ServerProcess) -> None:
    async def raised(call: Any) -> errors.BitsegError:
        with pytest.raises(errors.BitsegError) as info:
            await call
        return info.value

    async def scenario(c: aio.Client) -> None:
        missing = await raised(c.is_member("ghost", {"all": True}))
        assert type(missing) is errors.NotFoundError and missing.code == "NOT_FOUND"
        bad = await raised(c.count({"and": [{"all": True}, {"field": "n", "op": "has_all",
                                                           "value": [1]}]}))
        assert type(bad) is errors.InvalidRuleError and bad.path == "$.and[1].op"
        with pytest.raises(errors.InvalidRuleError):
            [i async for i in c.members({"or": []})]
        await c.create_segment("dup", "static")
        assert type(await raised(c.create_segment("dup", "static"))) \
            is errors.AlreadyExistsError
        await c.delete_segment("dup")

    run(server, scenario)

    async def without_token() -> None:
        async with aio.Client(server.addr) as c:
            error = await raised(c.count({"all": True}))
            assert type(error) is errors.UnauthenticatedError
    asyncio.run(without_token())


def test_stopping_early_frees_the_stream(server: ServerProcess) -> None:
    async def scenario(c: aio.Client) -> list[str]:
        first = []
        async for profile_id in c.members({"all": True}, page_size=1):
            first.append(profile_id)
            if len(first) == 3:
                break
        return first + [str(await c.count({"all": True}))]

    got = run(server, scenario)
    assert got[:3] == ["p0", "p1", "p2"] and int(got[3]) > 3
