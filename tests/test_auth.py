"""Auth and TLS against a real `bitseg serve`: bearer tokens in two roles, checked in one
interceptor; health open; TLS with a self-signed certificate made here by openssl."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest_grpc import ServerProcess, bitseg_command, run_cli

from bitseg.client import Client, ClientError

READ, WRITE = "r-3f1c9a", "w-8d20be"
ALL = '{"all": true}'


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    if shutil.which("openssl") is None:  # fail loudly: a missing tool must be seen, not skipped
        pytest.fail("these tests make their TLS certificate with the openssl command; "
                    "install it (Debian package openssl)")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key, tokens = tmp / "cert.pem", tmp / "key.pem", tmp / "tokens"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    tokens.write_text(f"# role token\nread {READ}\n\nwrite {WRITE}\n")
    (tmp / "read.token").write_text(READ + "\n")
    server = ServerProcess(tmp / "s", ["--tls-cert", str(cert), "--tls-key", str(key),
                                       "--tokens", str(tokens)])
    try:
        with Client(server.addr, tls_ca=cert, token=WRITE) as client:
            client.upsert_profiles([{"id": "a", "country": "DE"}, {"id": "b"}])
        yield server, cert, tmp
    finally:
        server.stop()


def test_a_read_token_reads_over_tls(secured):
    server, cert, _ = secured
    with Client(server.addr, tls_ca=cert, token=READ) as client:
        assert client.count({"field": "country", "op": "eq", "value": "DE"}) == 1
        assert list(client.members({"all": True})) == ["a", "b"]
        assert client.list_segments() == []


@pytest.mark.parametrize("token", [None, "nope"])
def test_no_token_or_an_unknown_one_is_unauthenticated(secured, token):
    server, cert, _ = secured
    with Client(server.addr, tls_ca=cert, token=token) as client:
        with pytest.raises(ClientError) as caught:
            client.count({"all": True})
        assert caught.value.code == "UNAUTHENTICATED"
        with pytest.raises(ClientError) as caught:
            list(client.members({"all": True}))
        assert caught.value.code == "UNAUTHENTICATED"


def test_a_read_token_on_a_write_is_permission_denied_and_changes_nothing(secured):
    server, cert, _ = secured
    with Client(server.addr, tls_ca=cert, token=READ) as client:
        for write in (lambda: client.upsert_profiles([{"id": "x"}]),
                      lambda: client.create_segment("s", "static", profile_ids=["a"]),
                      lambda: client.delete_profiles(["a"])):
            with pytest.raises(ClientError) as caught:
                write()
            assert caught.value.code == "PERMISSION_DENIED"
            assert "needs a write token" in caught.value.message
        assert client.count({"all": True}) == 2


def test_health_answers_without_a_token_and_plaintext_gets_nothing(secured):
    server, cert, _ = secured
    with Client(server.addr, tls_ca=cert) as client:
        assert client.health() == "SERVING"
    with Client(server.addr, timeout=3) as plain:
        with pytest.raises(ClientError) as caught:
            plain.count({"all": True})
        assert caught.value.code == "UNAVAILABLE"


def test_the_cli_takes_the_ca_and_a_token_file_or_the_environment(secured):
    server, cert, tmp = secured
    out = run_cli("count", "--addr", server.addr, "--tls-ca", str(cert),
                  "--token-file", str(tmp / "read.token"), "--rule", ALL)
    assert (out.returncode, out.stdout) == (0, "2\n"), out.stderr
    env = {**os.environ, "BITSEG_TOKEN": READ}
    out = subprocess.run([*bitseg_command(), "count", "--addr", server.addr, "--tls-ca", str(cert),
                          "--rule", ALL], capture_output=True, text=True, env=env, timeout=30)
    assert (out.returncode, out.stdout) == (0, "2\n"), out.stderr
    out = run_cli("segment", "create", "v", "--static", "--ids", "a", "--addr", server.addr,
                  "--tls-ca", str(cert), "--token-file", str(tmp / "read.token"))
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and "write token" in out.stderr


def test_each_refused_call_is_one_line_in_the_server_log(secured):
    server, cert, _ = secured
    with Client(server.addr, tls_ca=cert, token="wrong") as client:
        with pytest.raises(ClientError):
            client.count({"all": True})
    lines = [line for line in server.lines if "Count failed: UNAUTHENTICATED" in line]
    assert lines and "unknown token" in lines[-1] and " ms: " in lines[-1]
    assert "Traceback" not in server.stderr()


def test_a_non_loopback_address_without_tokens_warns(tmp_path):
    server = ServerProcess(tmp_path / "s", ["--host", "0.0.0.0"])
    try:
        assert "warning: listening on 0.0.0.0 without --tokens" in server.stderr()
    finally:
        server.stop()
    quiet = ServerProcess(tmp_path / "s")
    try:
        assert "warning" not in quiet.stderr()
    finally:
        quiet.stop()


def test_a_bad_tokens_file_is_refused_at_start_naming_the_line(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("read abc\nadmin xyz\n")
    out = run_cli("serve", "--db", str(tmp_path / "s"), "--create", "--port", "0",
                  "--tokens", str(tokens))
    assert out.returncode == 2
    assert f"{tokens}:2: expected `read TOKEN` or `write TOKEN`" in out.stderr
