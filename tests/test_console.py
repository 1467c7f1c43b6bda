"""The console end to end: `bitseg serve --http 0` on a small generated dataset, its HTTP
JSON API called directly, and its page driven in headless Chromium (Debian's `chromium`,
which `make browser` installs) through Playwright. Every number the page shows is checked
against the gRPC API. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest_grpc import ServerProcess, run_cli
from playwright.sync_api import Browser, Page, expect, sync_playwright

from bitseg.client import Client

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CONSOLE = re.compile(r"^bitseg console on (http://\S+/)\s*$")
PROFILES = 2000
WAIT_MS = 10_000  # the longest a page waits for an answer before the test fails

YOUNG_GERMAN_CARTS = {"and": [
    {"field": "country", "op": "eq", "value": "DE"},
    {"field": "age", "op": "between", "value": [18, 40]},
    {"event": "add_to_cart", "where": {"field": "category", "op": "eq", "value": "apparel"},
     "having": {"agg": "count", "op": "gte", "value": 1}}]}


def chromium() -> str:
    """Debian's chromium binary; its absence fails the test with how to install it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("the console tests need Debian's chromium: run `make browser` (as root "
                    "it runs apt-get install -y chromium), or `sudo apt-get install -y "
                    "chromium`", pytrace=False)
    return found


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("console")
    for args in (("gen", str(root / "data"), "--profiles", str(PROFILES), "--seed", "11"),
                 ("load", str(root / "data"), "--db", str(root / "store"))):
        done = run_cli(*args, timeout=120)
        assert done.returncode == 0, done.stderr
    return root / "store"


def console_url(server: ServerProcess) -> str:
    for line in server.lines:
        found = CONSOLE.match(line.rstrip("\n"))
        if found:
            return found.group(1)
    raise AssertionError("the server did not print the console's address:\n" + server.stderr())


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[ServerProcess]:
    running = ServerProcess(store, ["--http", "0"])
    try:
        yield running
    finally:
        assert running.stop() == 0, running.stderr()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.addr) as connected:
        yield connected


def post(url: str, method: str, body: object = None, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST /api/v1/METHOD (or /export for "/export"): (status, the JSON answer)."""
    request = urllib.request.Request(
        url + (method[1:] if method.startswith("/") else "api/v1/" + method),
        data=json.dumps(body or {}).encode(), method="POST",
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {token}"} if token else {}),
                 **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ------------------------------------------------------------------ the HTTP API
def test_api_answers_as_grpc_does(server: ServerProcess, client: Client) -> None:
    url = console_url(server)
    assert url.startswith("http://127.0.0.1:")
    status, counted = post(url, "Count", {"rule_json": json.dumps(YOUNG_GERMAN_CARTS)})
    assert status == 200
    assert int(counted["count"]) == client.count(YOUNG_GERMAN_CARTS) > 0
    status, described = post(url, "Describe", {"top": 3})
    assert status == 200 and int(described["profiles"]) == PROFILES
    assert "country" in {f["name"] for f in described["fields"]}


def test_api_errors_are_the_grpc_ones(server: ServerProcess) -> None:
    url = console_url(server)
    bad_rule = {"and": [{"field": "country", "op": "eq", "value": "DE"},
                        {"field": "country", "op": "gt", "value": "DE"}]}
    status, error = post(url, "Count", {"rule_json": json.dumps(bad_rule)})
    assert status == 400 and error["code"] == "INVALID_ARGUMENT"
    assert "$.and[1]" in error["message"]
    assert post(url, "GetSegment", {"name": "no-such"})[0] == 404
    status, error = post(url, "Count", {"rule_jsn": "{}"})
    assert status == 400 and "CountRequest" in error["message"]
    status, error = post(url, "Nope")
    assert status == 404 and error["code"] == "NOT_FOUND"
    assert post(url, "Members", {"rule_json": "{\"all\": true}"})[0] == 404  # a stream
    status, error = post(url, "/export", {"segment": "no-such", "fields": ["age"]})
    assert status == 404 and "no-such" in error["message"]
    status, error = post(url, "/export", {"rule_json": "{\"all\": true}", "fields": ["agex"]})
    assert status == 400 and "agex" in error["message"]


def test_api_refuses_other_sites(server: ServerProcess, client: Client) -> None:
    """A page of another site may POST a form or text/plain (no CORS preflight), or
    rebind its DNS name to 127.0.0.1: neither reaches a method."""
    url = console_url(server)
    made = {"name": "csrf", "kind": "SEGMENT_KIND_DYNAMIC", "rule_json": "{\"all\": true}"}
    for headers in ({"Content-Type": "text/plain"},
                    {"Content-Type": "application/x-www-form-urlencoded"},
                    {"Host": "evil.example:80"}):
        status, error = post(url, "CreateSegment", made, headers=headers)
        assert status in (400, 403), (headers, status, error)
        assert error["code"] in ("INVALID_ARGUMENT", "PERMISSION_DENIED")
    assert "csrf" not in {s.name for s in client.list_segments()}
    assert post(url, "Count", {"rule_json": "{\"all\": true}"},
                headers={"Host": "localhost"})[0] == 200


def test_api_takes_the_grpc_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("read r-token\nwrite w-token\n")
    guarded = ServerProcess(tmp_path / "empty", ["--http", "0", "--tokens", str(tokens)])
    try:
        url = console_url(guarded)
        rule = {"rule_json": "{\"all\": true}"}
        assert post(url, "Count", rule) == (401, post(url, "Count", rule)[1])
        assert post(url, "Count", rule)[1]["code"] == "UNAUTHENTICATED"
        assert post(url, "Count", rule, token="wrong")[0] == 401
        assert post(url, "Count", rule, token="r-token")[0] == 200
        made = {"name": "x", "kind": "SEGMENT_KIND_DYNAMIC", "rule_json": "{\"all\": true}"}
        assert post(url, "CreateSegment", made, token="r-token")[0] == 403
        assert post(url, "CreateSegment", made, token="w-token")[0] == 200
        with urllib.request.urlopen(url, timeout=10) as page:  # the page itself is open
            assert b"bitseg console" in page.read()
    finally:
        assert guarded.stop() == 0, guarded.stderr()


# ------------------------------------------------------------------ the page
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable,
                                              args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, server: ServerProcess) -> Iterator[Page]:
    opened = browser.new_page(viewport={"width": 1200, "height": 900})
    opened.set_default_timeout(WAIT_MS)
    failures: list[str] = []
    opened.on("pageerror", lambda exc: failures.append(str(exc)))
    opened.goto(console_url(server))
    yield opened
    opened.close()
    assert not failures, f"the page raised: {failures}"


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)


def build_by_clicking(page: Page) -> None:
    """country is DE, age between 18 and 40, added apparel to a cart."""
    page.wait_for_selector("[data-testid=count][data-count]")
    conditions = page.locator(".cond")
    add = page.locator(".group .add-cond").first
    add.click()
    conditions.nth(0).locator("select.field").select_option("country")
    conditions.nth(0).locator("input.value").fill("DE")
    add.click()
    conditions.nth(1).locator("select.field").select_option("age")
    conditions.nth(1).locator("select.op").select_option("between")
    conditions.nth(1).locator("input.value").fill("18, 40")
    add.click()
    conditions.nth(2).locator("select.kind").select_option("event")
    conditions.nth(2).locator("select.event").select_option("add_to_cart")
    conditions.nth(2).locator("select.where-field").select_option("category")
    conditions.nth(2).locator("input.where-value").fill("apparel")


def test_builder_count_is_the_grpc_count(page: Page, client: Client) -> None:
    build_by_clicking(page)
    expected = client.count(YOUNG_GERMAN_CARTS)
    assert 0 < expected < PROFILES
    expect(page.get_by_test_id("count")).to_have_text(f"{expected:,}")
    expect(page.get_by_test_id("summary")).to_contain_text("add_to_cart")
    assert json.loads(page.input_value("#rule-json")) == YOUNG_GERMAN_CARTS
    germans = client.count({"field": "country", "op": "eq", "value": "DE"})
    expect(page.locator(".cond").first.locator(".node-count")).to_have_text(f"{germans:,}")
    shot(page, "builder")


def test_saved_segment_is_in_the_list(page: Page, client: Client) -> None:
    client.create_segment("untagged-everyone", "dynamic", {"all": True})
    build_by_clicking(page)
    page.fill("#save-name", "young-german-carts")
    page.select_option("#save-kind", "SEGMENT_KIND_MATERIALIZED")
    page.fill("#save-tags", "console, de")
    page.click("#save")
    expect(page.get_by_test_id("segment-size")).to_have_text(
        f"{client.count(YOUNG_GERMAN_CARTS):,}")
    saved = client.get_segment("young-german-carts")
    assert saved.kind == "materialized" and sorted(saved.tags) == ["console", "de"]

    page.goto(console_url_of(page) + "#/segments")
    row = page.locator('tr[data-segment="young-german-carts"]')
    expect(row.locator(".kind")).to_have_text("materialized")
    expect(row.locator(".size")).to_have_text(f"{saved.size:,}")
    expect(row.locator(".tags .tag")).to_have_text(["console", "de"])
    expect(page.locator('tr[data-segment="untagged-everyone"]')).to_have_count(1)
    page.select_option("#tag-filter", "console")
    expect(page.locator("#segment-list tbody tr")).to_have_count(
        len(client.list_segments(tag="console")))
    expect(page.locator('tr[data-segment="untagged-everyone"]')).to_have_count(0)
    shot(page, "segments")


def console_url_of(page: Page) -> str:
    return page.url.split("#", 1)[0]


def test_history_chart_has_the_api_points(page: Page, client: Client) -> None:
    carts = {"event": "add_to_cart", "window": {"last_days": 30}}
    client.create_segment("recent-carts", "materialized", carts, as_of="2026-09-01T00:00:00Z")
    for day in ("2026-09-20", "2026-10-10", "2026-11-01"):
        client.refresh_segment("recent-carts", as_of=f"{day}T00:00:00Z")
    points = client.segment_history("recent-carts")
    assert len(points) >= 4 and len({p.size for p in points}) > 1

    page.goto(console_url_of(page) + "#/segment/recent-carts")
    circles = page.locator("svg.line-chart circle.point")
    expect(circles).to_have_count(len(points))
    shown = [(datetime.fromisoformat(c.get_attribute("data-time").replace("Z", "+00:00")),
              int(c.get_attribute("data-size"))) for c in circles.all()]
    assert shown == [(p.time, p.size) for p in points]
    labels = page.locator("svg.line-chart .axis.y text").all_text_contents()
    assert "profiles" in labels and "0" in labels
    expect(page.locator("#segment-explain li").first).to_be_visible()
    expect(page.locator("#segment-insights svg").first).to_be_visible()
    # the builder, asked for first, answered late: it must not land on this page
    expect(page.locator("h1")).to_have_count(1)
    shot(page, "segment")


def test_overlap_heatmap_cells(page: Page, client: Client) -> None:
    rules = {"ov-germans": {"field": "country", "op": "eq", "value": "DE"},
             "ov-young": {"field": "age", "op": "between", "value": [18, 30]},
             "ov-carts": {"event": "add_to_cart"}}
    for name, rule in rules.items():
        client.create_segment(name, "dynamic", rule)
    page.goto(console_url_of(page) + "#/segments")
    for name in rules:
        page.check(f'.pick[value="{name}"]')
    page.click("#overlap-picked")
    cells = page.locator("svg.heatmap g.cell")
    expect(cells).to_have_count(9)
    for a in rules:
        for b in rules:
            both = client.count({"and": [rules[a], rules[b]]})
            cell = page.locator(f'g.cell[data-row="{a}"][data-col="{b}"]')
            expect(cell.locator("text")).to_have_text(f"{both:,}")
    shot(page, "overlap")


def test_invalid_json_rule_shows_its_error_at_its_node(page: Page) -> None:
    page.wait_for_selector("[data-testid=count][data-count]")
    page.click(".group .add-cond")
    page.select_option(".cond select.field", "country")
    page.fill(".cond input.value", "DE")
    page.click(".group .add-json")
    node = page.locator(".node:has(> textarea.json-node)")
    node.locator("textarea").fill('{"field": "country", "op": "eqq", "value": "DE"}')
    expect(node.locator("> .node-error")).to_contain_text("$.and[1].op")
    expect(node.locator("> .node-error")).to_contain_text("eqq")
    assert page.locator(".node.has-error").count() == 1
    expect(page.get_by_test_id("count")).to_have_text("—")
    shot(page, "builder-error")

    node.locator("textarea").fill('{"field": "country", "op": ')  # not JSON at all
    expect(node.locator("> .node-error")).to_contain_text("JSON")
    node.locator("textarea").fill('{"field": "country", "op": "eq", "value": "FR"}')
    expect(node.locator("> .node-error")).to_be_hidden()
    expect(page.get_by_test_id("count")).to_have_text("0")


def test_template_save_tags_and_control_groups(page: Page, client: Client) -> None:
    page.wait_for_selector("[data-testid=count][data-count]")
    page.fill("#save-name", "abandoners")
    page.select_option("#save-kind", "SEGMENT_KIND_STATIC")
    page.select_option("#save-template", "cart_abandoners")
    page.fill('.template-param[data-param="days"]', "400")
    page.click("#save")
    page.wait_for_url("**#/segment/abandoners")
    saved = client.get_segment("abandoners")
    expect(page.get_by_test_id("segment-size")).to_have_text(f"{saved.size:,}")
    assert saved.kind == "static" and "template:cart_abandoners" in saved.tags
    assert saved.rule["window"] == {"last_days": 400}

    page.fill("#tag-input", "q4")
    page.click("#tag-add")
    expect(page.locator("#tag-editor .tag", has_text="q4")).to_have_count(1)
    assert "q4" in client.get_segment("abandoners").tags

    page.fill("#split-parts", "test 80, control 20")
    page.click("#split")
    expect(page.locator("#split-result")).to_contain_text("abandoners-control")
    test, control = client.get_segment("abandoners-test"), client.get_segment("abandoners-control")
    assert test.size + control.size == saved.size
    expect(page.locator("#split-result")).to_have_text(
        f"abandoners-test: {test.size:,}; abandoners-control: {control.size:,}")

    page.fill("#export-fields", "city, age")
    page.fill("#export-require", "age")
    with page.expect_download() as downloading:
        page.click("#export")
    lines = Path(downloading.value.path()).read_text().splitlines()
    kept = client.count({"and": [{"segment": "abandoners"}, {"field": "age", "op": "exists"}]})
    assert lines[0] == "id,city,age" and len(lines) == 1 + kept > 1
    expect(page.locator("#export-result")).to_contain_text(
        f"{kept:,} of {saved.size:,} members exported")
