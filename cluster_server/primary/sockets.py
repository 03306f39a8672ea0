"""Listening sockets, bound once by the primary before any fork."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from cluster_server._config import Config
from cluster_server._errors import BindError
from cluster_server.scheduling.protocol import defer_accept


@dataclass
class Listener:
    sock: socket.socket
    #: how to show it to a human: "http://127.0.0.1:8000", "unix:/run/app.sock"
    display: str
    #: a Unix socket path we created and must remove on exit
    unlink_path: str | None = None

    def close(self) -> None:
        self.sock.close()
        if self.unlink_path is not None:
            try:
                os.unlink(self.unlink_path)
            except FileNotFoundError:
                pass


def bind_listeners(config: Config) -> list[Listener]:
    """Bind and listen on every socket the config names. Raises BindError.

    Sockets handed over by a predecessor (an upgrade) or by systemd (socket
    activation) come first: then nothing is bound.
    """
    inherited = inherited_listeners(config.backlog)
    if inherited:
        return inherited
    if config.fd is not None:
        return [_from_fd(config.fd, config.backlog)]
    if config.uds is not None:
        return [_bind_unix(config.uds, config.backlog)]
    tls = config.ssl_certfile is not None
    return [_bind_tcp(config.host, config.port, config.backlog, tls, reserve=config.scheduling == "reuseport")]


def _family_of(host: str) -> socket.AddressFamily:
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        # A name: resolve it once, here, before any fork.
        try:
            info = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise BindError(f"cannot resolve host {host!r} ({exc.strerror}); check --host") from None
        return socket.AddressFamily(info[0][0])
    return socket.AF_INET6 if addr.version == 6 else socket.AF_INET


def _bind_tcp(host: str, port: int, backlog: int, tls: bool, reserve: bool = False) -> Listener:
    """Bind host:port and listen; with ``reserve`` (``--scheduling reuseport``), bind with
    SO_REUSEPORT and do not listen: the socket only holds the port (and proves it free)
    while each worker listens on its own SO_REUSEPORT socket. A bound socket that does
    not listen gets no connections from the kernel's reuseport group."""
    family = _family_of(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reserve:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
        if not reserve:
            sock.listen(backlog)
            defer_accept(sock)
    except OSError as exc:
        sock.close()
        raise BindError(_bind_message(exc, f"port {port} on {host}", port)) from None
    bound_port = sock.getsockname()[1]
    scheme = "https" if tls else "http"
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    return Listener(sock, f"{scheme}://{shown}:{bound_port}")


def _bind_message(exc: OSError, what: str, port: int | None) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"{what} is in use by another process; pick another --port or stop that process"
    if exc.errno == errno.EACCES:
        if port is not None and port < 1024:
            return (
                f"permission denied binding {what}: ports below 1024 need root or "
                "CAP_NET_BIND_SERVICE; pick --port 1024 or above"
            )
        return f"permission denied binding {what}; check the path's permissions"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot bind {what}: the address is not on this machine; check --host"
    return f"cannot bind {what}: {exc.strerror or exc}"


#: how long a probe of a Unix socket waits for its connect
PROBE_TIMEOUT = 1.0


def probe_unix(path: str) -> bool | None:
    """Does a server listen on the Unix socket at ``path``? None: cannot tell.

    Only ``ECONNREFUSED`` means nobody listens (a socket file left by a killed
    server, safe to replace); a full queue means a live server, and any other
    error (no permission, say) proves nothing. Bounded by ``PROBE_TIMEOUT``.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except (BlockingIOError, TimeoutError):
        return True  # listening, with a full queue
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # nobody will ever answer (or the file went meanwhile)
    except OSError:
        return None
    finally:
        probe.close()
    return True


def _bind_unix(path: str, backlog: int) -> Listener:
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise BindError(f"--uds {path} exists and is not a socket; remove it or pick another path")
        listening = probe_unix(path)
        if listening:
            raise BindError(f"unix socket {path} is in use by another process; stop it or pick another --uds")
        if listening is None:
            raise BindError(
                f"--uds {path} exists and cannot be checked (is it in use?); remove it or pick another path"
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: nobody is listening on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(_bind_message(exc, f"unix socket {path}", None)) from None
    return Listener(sock, f"unix:{path}", unlink_path=path)


def _from_fd(fd: int, backlog: int, systemd: bool = False) -> Listener:
    what = f"systemd's fd {fd}" if systemd else f"--fd {fd}"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(f"{what} is not an open socket ({exc.strerror}); check the fd number") from None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        hint = "; use ListenStream= in the .socket unit" if systemd else ""
        raise BindError(f"{what} is not a stream socket{hint}")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.listen(backlog)
    name = sock.getsockname()
    shown = f"unix:{name}" if sock.family == socket.AF_UNIX else f"http://{name[0]}:{name[1]}"
    return Listener(sock, f"fd {fd} ({shown}{', from systemd' if systemd else ''})")


# -- sockets passed in: systemd socket activation, and upgrades -----------------

#: systemd's first passed fd (sd_listen_fds(3))
SD_LISTEN_FDS_START = 3
#: how an upgrading primary hands its sockets to its successor (JSON; see ops/upgrade.py)
INHERIT_ENV = "CLUSTER_SERVER_INHERIT"


def inherited_listeners(backlog: int) -> list[Listener]:
    """Listening sockets this process was given, if any; the variables are removed."""
    handed = take_inherited()
    if handed is not None:
        listeners = []
        for item in handed.get("listeners", []):
            os.set_inheritable(int(item["fd"]), False)
            lst = _from_fd(int(item["fd"]), backlog)
            lst.display = str(item.get("display") or lst.display)
            # A Unix socket's file stays the predecessor's until the handover (ops/upgrade.py):
            # a successor that fails must not remove it.
            lst.unlink_path = None
            listeners.append(lst)
        return listeners
    return [_from_fd(fd, backlog, systemd=True) for fd in listen_fds()]


_inherited: dict[str, Any] | None = None
_inherited_read = False


def take_inherited() -> dict[str, Any] | None:
    """What a predecessor handed over in CLUSTER_SERVER_INHERIT (read once, then unset).

    Like LISTEN_PID, it names the pid it is meant for: a stale variable that
    leaked into another process is ignored.
    """
    global _inherited, _inherited_read
    if not _inherited_read:
        _inherited_read = True
        raw = os.environ.pop(INHERIT_ENV, None)
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
            if isinstance(data, dict) and data.get("pid") == os.getpid():
                _inherited = data
    return _inherited


def listen_fds(unset: bool = True) -> list[int]:
    """The fds systemd passed (``LISTEN_FDS``), if ``LISTEN_PID`` is this process; like sd_listen_fds(3)."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(0, n)))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            raise BindError(f"systemd passed fd {fd} (LISTEN_FDS={n}), but it is not open") from None
    return fds
