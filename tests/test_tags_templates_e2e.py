"""Tags and templates end to end: a real `bitseg serve` (with a user templates folder),
the Client, and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest_grpc import ServerProcess, run_cli
from conftest_grpc import cli_ok as cli

from bitseg.client import Client
from bitseg.errors import InvalidArgumentError, NotFoundError

MINE = {"name": "plan_members", "description": "Profiles on one of `plans`",
        "params": [{"name": "plans", "type": "strings", "default": ["premium"]}],
        "rule": {"field": "plan", "op": "in", "value": {"$param": "plans"}}}
PROFILES = [{"id": f"u{i}", "plan": ["free", "premium", "basic"][i % 3], "n": i}
            for i in range(30)]


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "plans.json").write_bytes(orjson.dumps(MINE))
    proc = ServerProcess(tmp_path / "db", ["--templates", str(folder)])
    try:
        with Client(proc.addr) as client:
            client.upsert_profiles(PROFILES)
        yield proc
    finally:
        proc.stop()


def test_tags_and_templates_through_the_client(server: ServerProcess) -> None:
    with Client(server.addr) as client:
        names = [t.name for t in client.templates()]
        assert names[-1] == "plan_members" and "rfm_champions" in names
        mine = client.templates()[-1]
        assert not mine.builtin and mine.params[0].default == ["premium"]

        made = client.create_segment("paying", "dynamic", template="plan_members",
                                     params={"plans": ["premium", "basic"]}, tags=["crm"])
        assert made.size == 20 and made.tags == ["crm", "template:plan_members"]
        assert made.rule == {"field": "plan", "op": "in", "value": ["premium", "basic"]}
        client.create_segment("small", "static", rule={"field": "n", "op": "lt", "value": 5})
        assert client.add_tags("small", ["crm", "q4"]).tags == ["crm", "q4"]
        assert [s.name for s in client.list_segments(tag="crm")] == ["paying", "small"]
        assert client.remove_tags("paying", ["crm"]).tags == ["template:plan_members"]
        assert [s.name for s in client.list_segments(tag="crm")] == ["small"]
        assert client.get_segment("small").tags == ["crm", "q4"]

        with pytest.raises(InvalidArgumentError, match="parameter 'plans': expected a "
                                                       "non-empty list of texts"):
            client.create_segment("x", "dynamic", template="plan_members", params={"plans": []})
        with pytest.raises(InvalidArgumentError, match="unknown parameter 'plan'"):
            client.create_segment("x", "dynamic", template="plan_members", params={"plan": "a"})
        with pytest.raises(NotFoundError, match="template 'nope' not found"):
            client.create_segment("x", "dynamic", template="nope")
        with pytest.raises(InvalidArgumentError, match="expected 1-64 characters"):
            client.add_tags("small", ["no spaces"])
        with pytest.raises(NotFoundError):
            client.add_tags("absent", ["a"])
        assert "x" not in [s.name for s in client.list_segments()]


def test_tags_and_templates_through_the_cli(server: ServerProcess) -> None:
    listing = cli(server, "templates")
    assert "lapsed_customers: Have ordered, but their last order is more than `days` days " \
           "ago\n    --param days=90  (int, at least 1)" in listing
    assert "plan_members (user): Profiles on one of `plans`\n    --param plans=premium  " \
           "(strings)" in listing
    assert json.loads(cli(server, "templates", "--json"))[-1]["name"] == "plan_members"

    out = cli(server, "segment", "create", "prem", "--materialized",
              "--from-template", "plan_members", "--param", "plans=premium", "--tag", "vip")
    assert out.startswith("prem: materialized, 10 members\n")
    assert "tags: template:plan_members, vip\n" in out
    assert cli(server, "segment", "tag", "prem", "q4", "crm") == \
        "prem: crm, q4, template:plan_members, vip\n"
    assert cli(server, "segment", "untag", "prem", "vip", "q4") == \
        "prem: crm, template:plan_members\n"
    cli(server, "segment", "create", "all", "--dynamic", "--rule", '{"all": true}')
    assert cli(server, "segment", "list") == \
        "all\tdynamic\t30\nprem\tmaterialized\t10\tcrm,template:plan_members\n"
    assert cli(server, "segment", "list", "--tag", "crm") == \
        "prem\tmaterialized\t10\tcrm,template:plan_members\n"
    assert json.loads(cli(server, "segment", "get", "prem", "--json"))["tags"] == \
        ["crm", "template:plan_members"]

    bad = run_cli("segment", "create", "y", "--dynamic", "--from-template", "plan_members",
                  "--param", "plans", "--addr", server.addr)
    assert bad.returncode == 2 and "expected NAME=VALUE, got 'plans'" in bad.stderr
    bad = run_cli("segment", "create", "y", "--dynamic", "--from-template",
                  "lapsed_customers", "--param", "days=abc", "--addr", server.addr)
    assert bad.returncode == 2
    assert bad.stderr == "bitseg: template 'lapsed_customers': parameter 'days': expected " \
                         "a whole number, got 'abc'\n"


def test_a_bad_templates_folder_stops_the_start(tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "clash.json").write_bytes(orjson.dumps({**MINE, "name": "new_customers"}))
    done = run_cli("serve", "--db", str(tmp_path / "db"), "--create", "--port", "0",
                   "--templates", str(folder))
    assert done.returncode == 2
    assert f"--templates: {folder / 'clash.json'}: name 'new_customers' is taken by a " \
           f"built-in template" in done.stderr
