"""TLS options: client certificates, ciphers, and bad key material caught before any fork.

(HTTPS, wss and SSE over TLS under each scheduling policy: tests/test_streaming.py.)
"""

from __future__ import annotations

import http.client
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..conftest import HELLO_APP, ROOT, TLSFiles, run_cli, scheduling_args, scheduling_policies


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``cluster-server ARGS`` to its end in its own session, with a minimal environment."""
    env = {"PYTHONPATH": f"{ROOT}:{cwd}", "PATH": "/usr/bin:/bin"}
    code, out, err = run_cli(cwd, *args, env=env)
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.parametrize("policy", scheduling_policies())
def test_client_certificates_required(start_server: Any, write_app: Any, tls_files: TLSFiles, policy: str) -> None:
    write_app("hello", HELLO_APP)
    server = start_server(
        "hello:app",
        *tls_files.server_args(),
        "--ssl-ca-certs",
        str(tls_files.ca_certs),
        "--ssl-cert-reqs",
        "2",
        *scheduling_args(policy),
    ).wait_ready()
    url = f"https://127.0.0.1:{server.port}/"
    ctx = tls_files.client_context()
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.get(url, verify=ctx, timeout=10)
    client_cert = tls_files.ca.issue_cert("client@example.test")
    client_cert.configure_cert(ctx)
    response = httpx.get(url, verify=ctx, timeout=10)
    assert response.status_code == 200 and int(response.text) in server.worker_pids()


def test_ciphers_are_applied(start_server: Any, write_app: Any, tls_files: TLSFiles) -> None:
    write_app("hello", HELLO_APP)
    server = start_server("hello:app", *tls_files.server_args(), "--ssl-ciphers", "ECDHE+AESGCM").wait_ready()
    ctx = tls_files.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 suites are not chosen by the cipher string
    ctx.set_ciphers("ECDHE+CHACHA20")
    with pytest.raises(httpx.HTTPError):  # no cipher in common
        httpx.get(f"https://127.0.0.1:{server.port}/", verify=ctx, timeout=10)
    ctx.set_ciphers("ECDHE+AESGCM")
    assert httpx.get(f"https://127.0.0.1:{server.port}/", verify=ctx, timeout=10).status_code == 200


def test_bad_tls_material_is_one_error_at_start(tmp_path: Path, write_app: Any, tls_files: TLSFiles) -> None:
    write_app("hello", HELLO_APP)
    (tmp_path / "other").mkdir()
    other = TLSFiles(tmp_path / "other")
    # a key that does not match the certificate
    result = _cli("hello:app", "--port", "0", "--ssl-certfile", str(tls_files.certfile),
                  "--ssl-keyfile", str(other.keyfile), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Error: cannot load the TLS key/certificate" in result.stderr
    assert "spawned" not in result.stderr  # caught before any worker was forked
    # a cipher string OpenSSL rejects
    result = _cli("hello:app", "--port", "0", *tls_files.server_args(), "--ssl-ciphers", "NO-SUCH-CIPHER", cwd=tmp_path)
    assert result.returncode == 2 and "Error: --ssl-ciphers 'NO-SUCH-CIPHER'" in result.stderr, result.stderr
    # client verification without a CA
    result = _cli("hello:app", *tls_files.server_args(), "--ssl-cert-reqs", "2", cwd=tmp_path)
    assert result.returncode == 2 and "give --ssl-ca-certs too" in result.stderr, result.stderr
    # TLS options without a certificate
    result = _cli("hello:app", "--ssl-ca-certs", str(tls_files.ca_certs), cwd=tmp_path)
    assert result.returncode == 2 and "need --ssl-certfile" in result.stderr, result.stderr


def test_encrypted_key_with_password_from_the_environment(
    start_server: Any, write_app: Any, tls_files: TLSFiles, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(tls_files.keyfile.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    write_app("hello", HELLO_APP)
    tls_args = ["--ssl-certfile", str(tls_files.certfile), "--ssl-keyfile", str(encrypted)]
    result = _cli("hello:app", *tls_args, "--ssl-keyfile-password", "wrong", cwd=tmp_path)
    assert result.returncode == 2 and "Error: cannot load the TLS key/certificate" in result.stderr, result.stderr
    server = start_server("hello:app", *tls_args, env={"CLUSTER_SERVER_SSL_KEYFILE_PASSWORD": "s3cret"}).wait_ready()
    response = httpx.get(f"https://127.0.0.1:{server.port}/", verify=tls_files.client_context(), timeout=10)
    assert response.status_code == 200


def test_an_idle_tls_client_does_not_hold_a_draining_worker(
    start_server: Any, write_app: Any, tls_files: TLSFiles
) -> None:
    """A keep-alive TLS client that sits idle and does not read (a pool's spare
    connection) never answers the server's close_notify. The drain closes the
    connection after its idle window; the worker must then be gone within a few
    seconds, not at the graceful timeout (20 s here) nor at the event loop's own
    30 s TLS shutdown limit."""
    write_app("hello", HELLO_APP)
    args = ("--workers", "1", "--graceful-timeout", "20", "--timeout-keep-alive", "60")
    server = start_server("hello:app", *tls_files.server_args(), *args).wait_ready()
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=tls_files.client_context(), timeout=10)
    try:
        conn.request("GET", "/")
        old_pid = conn.getresponse().read().decode()
        server.signal(signal.SIGHUP)
        server.wait_log("worker draining:")
        began = time.monotonic()
        server.wait_log(f"[pid {old_pid}] exited", timeout=10)
        assert time.monotonic() - began < 5  # the 1 s window, then at most 1 s for the TLS close
    finally:
        conn.close()
