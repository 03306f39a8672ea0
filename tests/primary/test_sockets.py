"""Listening sockets: bound once by the primary (TCP v4/v6, Unix, inherited fd).

The first part calls ``bind_listeners`` in-process; the last tests serve real
requests through a real cluster on each kind of socket.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cluster_server import BindError, Config
from cluster_server.primary.sockets import Listener, bind_listeners

from ..conftest import HELLO_APP, Server, free_port, is_open


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")


@pytest.fixture
def bind() -> Iterator[Callable[..., Listener]]:
    made: list[Listener] = []

    def bind(**options: object) -> Listener:
        [listener] = bind_listeners(Config(app="main:app", **options))
        made.append(listener)
        return listener

    yield bind
    for listener in made:
        listener.close()


def accepts(listener: Listener, address: object) -> bool:
    """A client connection reaches the listener's accept queue."""
    family = listener.sock.family
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(address)  # type: ignore[arg-type]
        conn, _ = listener.sock.accept()
        conn.close()
    return True


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


# -- TCP ----------------------------------------------------------------------------


def test_ipv4(bind: Callable[..., Listener]) -> None:
    lst = bind(host="127.0.0.1", port=0)
    port = lst.sock.getsockname()[1]
    assert lst.sock.family == socket.AF_INET and is_listening(lst.sock)
    assert lst.display == f"http://127.0.0.1:{port}"
    assert not lst.sock.get_inheritable(), "fork shares it; exec'd children must not"
    assert accepts(lst, ("127.0.0.1", port))


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_loopback(bind: Callable[..., Listener], host: str) -> None:
    lst = bind(host=host, port=0)
    port = lst.sock.getsockname()[1]
    assert lst.sock.family == socket.AF_INET6 and is_listening(lst.sock)
    assert lst.display == f"http://[::1]:{port}"
    assert accepts(lst, ("::1", port))


def test_host_name_is_resolved_before_fork(bind: Callable[..., Listener]) -> None:
    lst = bind(host="localhost", port=0)
    assert lst.sock.family in (socket.AF_INET, socket.AF_INET6)
    assert lst.display.startswith("http://localhost:")


def test_tls_shows_https(bind: Callable[..., Listener], tmp_path: Path) -> None:
    for name in ("k.pem", "c.pem"):
        (tmp_path / name).write_text("not checked at bind time")
    lst = bind(port=0, ssl_keyfile=str(tmp_path / "k.pem"), ssl_certfile=str(tmp_path / "c.pem"))
    assert lst.display.startswith("https://127.0.0.1:")


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
def test_port_in_use_names_host_and_port(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as taken:
        taken.bind((host, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError) as info:
            bind_listeners(Config(app="main:app", host=host, port=port))
    assert str(info.value) == (
        f"port {port} on {host} is in use by another process; pick another --port or stop that process"
    )


def test_unknown_host() -> None:
    with pytest.raises(BindError, match=r"cannot resolve host 'no-such-host\.invalid'.*check --host"):
        bind_listeners(Config(app="main:app", host="no-such-host.invalid", port=0))


def test_address_not_on_this_machine() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a real interface. Only bind() is tried.
    with pytest.raises(BindError, match="the address is not on this machine; check --host"):
        bind_listeners(Config(app="main:app", host="192.0.2.1", port=0))


# -- Unix sockets -------------------------------------------------------------------------


def test_unix_socket_is_created_and_removed(bind: Callable[..., Listener], tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    lst = bind(uds=path)
    assert lst.display == f"unix:{path}"
    assert lst.sock.family == socket.AF_UNIX and is_listening(lst.sock)
    assert accepts(lst, path)
    lst.close()
    assert not os.path.exists(path), "the socket file is removed on exit"


def test_stale_unix_socket_file_is_replaced(bind: Callable[..., Listener], tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays: what a crashed server leaves behind
    assert os.path.exists(path)
    lst = bind(uds=path)
    assert accepts(lst, path)


def test_unix_socket_in_use_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        with pytest.raises(BindError, match=r"unix socket .* is in use by another process"):
            bind_listeners(Config(app="main:app", uds=path))
        assert os.path.exists(path), "a live server's socket file is left alone"


def test_unix_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(BindError, match="exists and is not a socket"):
        bind_listeners(Config(app="main:app", uds=str(path)))
    assert path.read_text() == "keep me"


# -- inherited fds -------------------------------------------------------------------------


def test_inherited_listening_fd(bind: Callable[..., Listener]) -> None:
    outer = socket.socket()
    outer.bind(("127.0.0.1", 0))
    outer.listen()
    port = outer.getsockname()[1]
    lst = bind(fd=outer.detach())
    assert lst.display == f"fd {lst.sock.fileno()} (http://127.0.0.1:{port})"
    assert accepts(lst, ("127.0.0.1", port))


def test_inherited_fd_not_yet_listening_gets_listen(bind: Callable[..., Listener]) -> None:
    outer = socket.socket()
    outer.bind(("127.0.0.1", 0))
    lst = bind(fd=outer.detach())
    assert is_listening(lst.sock)


def test_fd_that_is_not_a_socket() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(BindError, match=f"--fd {r} is not an open socket"):
            bind_listeners(Config(app="main:app", fd=r))
    finally:
        os.close(r)
        os.close(w)


def test_fd_that_is_a_datagram_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(BindError, match="is not a stream socket"):
            bind_listeners(Config(app="main:app", fd=udp.fileno()))
        assert udp.fileno() >= 0 and is_open(udp.fileno()), "the caller's socket is not closed on error"


# -- serving through each kind of socket -------------------------------------------------


def test_serves_on_ipv6(start_server: Callable[..., Server], write_app: Callable[[str, str], Path]) -> None:
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    write_app("hello", HELLO_APP)
    port = free_port()
    server = start_server("hello:app", "--host", "::1", "--port", str(port)).wait_ready()
    assert f"http://[::1]:{port}" in server.log()
    assert httpx.get(f"http://[::1]:{port}/", timeout=10).text.isdigit()


def test_serves_on_unix_socket(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("hello", HELLO_APP)
    path = tmp_path / "app.sock"
    server = start_server("hello:app", "--uds", str(path), "--workers", "2").wait_ready()
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=10) as client:
        assert int(client.get("http://x/").text) in server.worker_pids()
    server.signal(15)
    assert server.wait_exit() == 0
    assert not path.exists(), "the primary removes its socket file"


def test_serves_on_inherited_fd(start_server: Callable[..., Server], write_app: Callable[[str, str], Path]) -> None:
    write_app("hello", HELLO_APP)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port, fd = sock.getsockname()[1], sock.fileno()
    try:
        server = start_server("hello:app", "--fd", str(fd), pass_fds=(fd,)).wait_ready()
    finally:
        sock.close()  # only the server holds it now
    assert f"serving fd {fd} (http://127.0.0.1:{port})" in server.log()
    assert int(httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text) in server.worker_pids()
