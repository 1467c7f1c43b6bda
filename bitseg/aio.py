"""An asyncio client for a bitseg server, over grpc.aio.

    from bitseg.aio import Client

    async with Client("127.0.0.1:50051") as client:
        n = await client.count({"field": "country", "op": "eq", "value": "DE"})
        async for profile_id in client.members(segment="vip", limit=100):
            ...

The same methods, arguments, results and errors as bitseg.client.Client, awaited;
members(), pages() and rows() are async iterators. Requests are built and replies read
by the same functions as the synchronous client's (bitseg.client); only the sending
differs. Create it inside the event loop that uses it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitseg import client as c
from bitseg.client import (
    DEFAULT_ADDR,
    DEFAULT_BATCH,
    DEFAULT_TIMEOUT,
    MAX_MESSAGE_BYTES,
    CountResult,
    Explanation,
    MembershipChange,
    Metrics,
    Overlap,
    Page,
    Preview,
    Profile,
    RefreshResult,
    Segment,
    SizePoint,
    UpsertResult,
    _errors,
    _Unary,
    _Upload,
)
from bitseg.v1 import bitseg_pb2_grpc as pb_grpc

__all__ = ["Client"]


class Client:
    """An asyncio connection to one bitseg server; use `async with`, or await close().

    `timeout` (seconds, None for none) bounds each unary call; streaming calls have no
    deadline unless given one. `tls_ca` (a PEM file, or its bytes) connects with TLS
    trusting that CA; `token` is sent as `authorization: Bearer TOKEN` on every call.
    """

    def __init__(self, addr: str = DEFAULT_ADDR, timeout: float | None = DEFAULT_TIMEOUT,
                 *, tls_ca: str | Path | bytes | None = None, token: str | None = None
                 ) -> None:
        self.addr = addr
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_ca is None:
            self._channel = grpc.aio.insecure_channel(addr, options=options)
        else:
            pem = tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes()
            self._channel = grpc.aio.secure_channel(
                addr, grpc.ssl_channel_credentials(root_certificates=pem), options=options)
        self._metadata = None if token is None else (("authorization", f"Bearer {token}"),)
        self._stub = pb_grpc.SegmentsStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"aio.Client({self.addr!r})"

    async def _call(self, build: Callable[..., _Unary], *args: Any) -> Any:
        """Make the request with `build`, send it, and read the reply."""
        with _errors():
            call = build(*args)
            reply = await getattr(self._stub, call.method)(
                call.request, timeout=self.timeout, metadata=self._metadata)
        return call.result(reply)

    # ------------------------------------------------------------------ evaluation
    async def count(self, rule: Any = None, segment: str | None = None,
                    as_of: datetime | str | None = None) -> int:
        """How many live profiles satisfy the rule (or are in the segment)."""
        return await self._call(c.count_call, rule, segment, as_of)

    async def count_result(self, rule: Any = None, segment: str | None = None,
                           as_of: datetime | str | None = None) -> CountResult:
        """count() with the evaluation time and the as_of it used."""
        return await self._call(c.count_result_call, rule, segment, as_of)

    async def members(self, rule: Any = None, segment: str | None = None,
                      as_of: datetime | str | None = None, limit: int | None = None,
                      page_size: int | None = None, cursor: str | None = None,
                      timeout: float | None = None) -> AsyncIterator[str]:
        """The ids of the profiles that satisfy the rule, in load order, streamed."""
        async for page in self.pages(rule, segment, as_of, limit, page_size, cursor,
                                     timeout):
            for profile_id in page.ids:
                yield profile_id

    async def pages(self, rule: Any = None, segment: str | None = None,
                    as_of: datetime | str | None = None, limit: int | None = None,
                    page_size: int | None = None, cursor: str | None = None,
                    timeout: float | None = None, fields: Iterable[str] = ()
                    ) -> AsyncIterator[Page]:
        """members() page by page, each with the cursor that resumes after it."""
        with _errors():
            request = c.members_request(rule, segment, as_of, limit, page_size, cursor,
                                        fields)
            stream = self._stub.Members(request, timeout=timeout, metadata=self._metadata)
            try:
                async for reply in stream:
                    yield c.page_of(reply)
            finally:
                stream.cancel()  # a consumer that stops early frees the server's worker

    async def rows(self, fields: Iterable[str], rule: Any = None, segment: str | None = None,
                   as_of: datetime | str | None = None, limit: int | None = None,
                   page_size: int | None = None, timeout: float | None = None
                   ) -> AsyncIterator[Profile]:
        """The members with the named profile fields (None for a value they lack)."""
        async for page in self.pages(rule, segment, as_of, limit, page_size, None, timeout,
                                     fields=list(fields)):
            for row in page.rows:
                yield row

    async def preview(self, rule: Any = None, segment: str | None = None,
                      as_of: datetime | str | None = None, limit: int = 10) -> Preview:
        """The total, and the first `limit` profiles with all their fields."""
        return await self._call(c.preview_call, rule, segment, as_of, limit)

    async def metrics(self, rule: Any = None, segment: str | None = None,
                      as_of: datetime | str | None = None, amount_field: str = "amount"
                      ) -> Metrics:
        """Profiles, orders, customers, revenue, their shares, average order value."""
        return await self._call(c.metrics_call, rule, segment, as_of, amount_field)

    async def insights(self, rule: Any = None, segment: str | None = None,
                       fields: Iterable[str] = (), as_of: datetime | str | None = None,
                       top: int = 0, buckets: int = 0) -> dict[str, Any]:
        return await self._call(c.insights_call, rule, segment, fields, as_of, top, buckets)

    async def bulk_action(self, action: str, field: str, value: Any = None, rule: Any = None,
                          segment: str | None = None, dry_run: bool = False,
                          as_of: datetime | str | None = None) -> dict[str, Any]:
        return await self._call(c.bulk_action_call, action, field, value, rule, segment,
                                dry_run, as_of)

    async def actions(self, limit: int = 0) -> list[dict[str, Any]]:
        return await self._call(c.actions_call, limit)

    async def refresh_traits(self, as_of: datetime | str | None = None,
                             config: Any = None) -> dict[str, Any]:
        return await self._call(c.refresh_traits_call, as_of, config)

    async def overlap(self, segments: Iterable[str],
                      as_of: datetime | str | None = None) -> Overlap:
        """Each named segment's size and every pairwise intersection."""
        return await self._call(c.overlap_call, segments, as_of)

    async def is_member(self, profile_id: str, rule: Any = None, segment: str | None = None,
                        as_of: datetime | str | None = None) -> bool:
        """Whether the profile satisfies the rule; NotFoundError for an unknown profile."""
        return await self._call(c.is_member_call, profile_id, rule, segment, as_of)

    async def segments_of(self, profile_id: str,
                          as_of: datetime | str | None = None) -> list[str]:
        """The names of the segments the profile is in."""
        return await self._call(c.segments_of_call, profile_id, as_of)

    async def explain(self, rule: Any = None, segment: str | None = None,
                      as_of: datetime | str | None = None) -> Explanation:
        """The rule in plain words, and its tree with the count at every node."""
        return await self._call(c.explain_call, rule, segment, as_of)

    async def profile(self, profile_id: str) -> Profile:
        """A profile's current values; NotFoundError for an unknown profile."""
        return await self._call(c.profile_call, profile_id)

    async def describe(self, top: int = 20) -> c.Description:
        """Every profile field, event type and order field (Client.describe)."""
        return await self._call(c.describe_call, top)

    async def values(self, field: str, limit: int = 20) -> c.FieldInfo:
        """The most common values of a keyword, keywords or bool profile field."""
        return await self._call(c.values_call, field, limit)

    async def is_member_many(self, profile_ids: Iterable[str], rule: Any = None,
                             segment: str | None = None,
                             as_of: datetime | str | None = None) -> c.BatchMembership:
        """is_member for up to 10,000 profiles in one call; unknown ids are listed."""
        return await self._call(c.is_member_many_call, profile_ids, rule, segment, as_of)

    async def segments_of_many(self, profile_ids: Iterable[str],
                               as_of: datetime | str | None = None) -> c.BatchSegments:
        """segments_of for up to 10,000 profiles in one call; unknown ids are listed."""
        return await self._call(c.segments_of_many_call, profile_ids, as_of)

    # ------------------------------------------------------------------ ingestion
    async def upsert_profiles(self, profiles: Iterable[Any], batch_size: int = DEFAULT_BATCH,
                              timeout: float | None = None) -> UpsertResult:
        """Upsert profiles (dicts, sent batch_size at a time) or batches (lists of dicts)."""
        return await self._upload(c.upsert_upload(profiles, batch_size), timeout)

    async def track_events(self, events: Iterable[Any], batch_size: int = DEFAULT_BATCH,
                           timeout: float | None = None) -> int:
        """Append events (dicts like events.jsonl lines, or batches of them); how many."""
        return await self._upload(c.events_upload(events, batch_size), timeout)

    async def add_orders(self, orders: Iterable[Any], batch_size: int = DEFAULT_BATCH,
                         timeout: float | None = None) -> int:
        """Append orders (dicts like orders.jsonl lines, or batches of them); how many."""
        return await self._upload(c.orders_upload(orders, batch_size), timeout)

    async def _upload(self, upload: _Upload, timeout: float | None) -> Any:
        with _errors():
            reply = await getattr(self._stub, upload.method)(
                iter(upload), timeout=timeout, metadata=self._metadata)
        return upload.result(reply)

    async def delete_profiles(self, profile_ids: Iterable[str]) -> int:
        """Delete profiles by id, all or none; NotFoundError names an unknown id."""
        return await self._call(c.delete_profiles_call, profile_ids)

    # ------------------------------------------------------------------ segments
    async def create_segment(self, name: str, kind: str, rule: Any = None,
                             profile_ids: Iterable[str] = (),
                             as_of: datetime | str | None = None,
                             refresh_every: int | None = None, tags: Iterable[str] = (),
                             template: str | None = None,
                             params: Mapping[str, Any] | None = None) -> Segment:
        """kind: "static", "dynamic" or "materialized" (see Client.create_segment)."""
        return await self._call(c.create_segment_call, name, kind, rule, profile_ids, as_of,
                                refresh_every, tags, template, params)

    async def update_segment(self, name: str, rule: Any = None,
                             refresh_every: int | None = None,
                             as_of: datetime | str | None = None) -> Segment:
        """Change a segment's rule and/or refresh interval (0 removes the schedule)."""
        return await self._call(c.update_segment_call, name, rule, refresh_every, as_of)

    async def split_segment(self, name: str, salt: str,
                            into: Mapping[str, float] | Iterable[Any], rule: Any = None,
                            prefix: str | None = None,
                            as_of: datetime | str | None = None) -> list[Segment]:
        """Split a segment (or rule) by sample buckets (see Client.split_segment)."""
        return await self._call(c.split_segment_call, name, salt, into, rule, prefix, as_of)

    async def get_segment(self, name: str) -> Segment:
        return await self._call(c.get_segment_call, name)

    async def list_segments(self, tag: str | None = None) -> list[Segment]:
        """Every segment by name; with `tag`, only those carrying it."""
        return await self._call(c.list_segments_call, tag)

    async def add_tags(self, name: str, tags: Iterable[str]) -> Segment:
        """Tag a segment (at most 32 tags in all); the segment."""
        return await self._call(c.tags_call, "AddTags", name, tags)

    async def remove_tags(self, name: str, tags: Iterable[str]) -> Segment:
        """Remove tags of a segment (those it lacks are ignored); the segment."""
        return await self._call(c.tags_call, "RemoveTags", name, tags)

    async def templates(self) -> list[c.Template]:
        """The server's segment templates: the built-in ones, then the user's."""
        return await self._call(c.templates_call)

    async def delete_segment(self, name: str) -> None:
        await self._call(c.delete_segment_call, name)

    async def add_to_segment(self, name: str, profile_ids: Iterable[str]) -> MembershipChange:
        """Add profiles to a static segment; `changed` counts those that entered."""
        return await self._call(c.add_to_segment_call, name, profile_ids)

    async def remove_from_segment(self, name: str,
                                  profile_ids: Iterable[str]) -> MembershipChange:
        """Remove profiles from a static segment; `changed` counts those that left."""
        return await self._call(c.remove_from_segment_call, name, profile_ids)

    async def refresh_segment(self, name: str,
                              as_of: datetime | str | None = None) -> RefreshResult:
        """Recount a materialized segment now (at as_of), recording entries and exits."""
        return await self._call(c.refresh_segment_call, name, as_of)

    async def segment_history(self, name: str) -> list[SizePoint]:
        """The segment's size history, oldest first."""
        return await self._call(c.segment_history_call, name)

    async def record_segment_size(self, name: str,
                                  as_of: datetime | str | None = None) -> SizePoint:
        """Record a history point of the segment's size (at as_of) now; the point."""
        return await self._call(c.record_segment_size_call, name, as_of)

    # ------------------------------------------------------------------ health
    async def health(self, service: str = "") -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ..."""
        with _errors():
            stub = health_pb2_grpc.HealthStub(self._channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                     timeout=self.timeout, metadata=self._metadata)
        return c.health_status(reply)
