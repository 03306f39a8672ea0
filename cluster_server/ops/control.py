"""The control socket: line-delimited JSON over a Unix socket, served by the primary.

``cluster-server ctl`` (``cli/ctl.py``) is its client. One request per line, one
response per line::

    > {"cmd": "status"}
    < {"ok": true, "result": {...}}
    > {"cmd": "scale", "workers": 3}
    < {"ok": true, "result": {"workers": 3}}
    > nonsense
    < {"ok": false, "error": "not a JSON object: ..."}

Commands: ``status``, ``reload`` (rolling restart), ``scale`` (``workers``),
``restart`` (``id``: a one-slot rolling restart), ``stop`` (graceful),
``upgrade`` (what SIGUSR2 does).

Who may talk to it: the socket is created with mode 0600 inside a directory of
mode 0700, and each client's credentials (``SO_PEERCRED``) must be root's or
the primary's own user's; anyone else is told so and disconnected.

It never disturbs the primary: sockets are non-blocking; each client has a
bounded input line (64 KiB), a bounded output buffer (it stops reading from a
client that does not read its answers) and a deadline (a client that sends no
request for 10 s is disconnected); at most 32 clients are served at once (a
new one pushes out the one closest to its deadline).

Where it lives (``--control-socket``): by default
``$XDG_RUNTIME_DIR/cluster-server/``, else ``/run/user/UID/cluster-server/``,
else ``/tmp/cluster-server-UID/``, named by the first listening address
(``127.0.0.1_8000.sock``), which, unlike a pid, stays the same across restarts
and upgrades, and tells an operator which server it is.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import re
import selectors
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cluster_server._errors import BindError, ControlError
from cluster_server.ops.clients import Client, ClientServer
from cluster_server.primary.component import override
from cluster_server.primary.sockets import probe_unix as _probe

if TYPE_CHECKING:
    from cluster_server.ops.status import ClusterWatch
    from cluster_server.primary.loop import Primary

logger = logging.getLogger("cluster_server")

#: longest request line a client may send
MAX_LINE = 64 * 1024
#: a client is disconnected this long after it connected or finished its last request
IDLE_TIMEOUT = 10.0
MAX_CLIENTS = 32
#: sun_path is 108 bytes on Linux, with the final NUL
MAX_PATH = 107
_UCRED = struct.Struct("3i")


# -- where the socket lives ----------------------------------------------------


def runtime_dir() -> str:
    """The directory default control sockets live in, for the current user."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "cluster-server")
    uid = os.geteuid()
    if os.path.isdir(f"/run/user/{uid}"):
        return f"/run/user/{uid}/cluster-server"
    return os.path.join(tempfile.gettempdir(), f"cluster-server-{uid}")


def socket_name(sock: socket.socket) -> str:
    """A file name for a listening socket's control socket: ``127.0.0.1_8000.sock``."""
    addr = sock.getsockname()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        name = f"{addr[0]}_{addr[1]}"
    else:
        path = addr.decode(errors="replace") if isinstance(addr, bytes) else str(addr)
        name = "unix" + path.replace("/", "_")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if len(name) > 60:
        name = name[:40] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name + ".sock"


def default_path(sock: socket.socket) -> str:
    return os.path.join(runtime_dir(), socket_name(sock))


def _private_dir(path: str) -> None:
    """Create ``path`` (mode 0700) or check that it is ours and private."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise BindError(
            f"{path} is not a private directory of this user (it must be owned by uid {os.geteuid()}, "
            "mode 0700); remove it or pick --control-socket"
        )


def bind(path: str, *, replace_live: bool = False) -> socket.socket:
    """Create the control socket at ``path``, mode 0600, atomically (bind elsewhere, rename).

    A stale socket (nobody listening) is replaced. A live one means another
    server uses this path: BindError, unless ``replace_live`` (an upgrade
    taking over from its predecessor).
    """
    # Bound under a short temporary name in the same directory, then renamed.
    tmp = os.path.join(os.path.dirname(path), f".cs-{os.getpid()}.tmp")
    if max(len(os.fsencode(path)), len(os.fsencode(tmp))) > MAX_PATH:
        raise BindError(f"control socket path {path} is too long for a Unix socket; pick a shorter --control-socket")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BindError(f"{path} exists and is not a socket; remove it or pick another --control-socket")
        if not replace_live and _probe(path):
            raise BindError(
                f"another cluster-server answers on control socket {path}; stop it or pick another --control-socket"
            )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)  # no moment with a wider mode than 0600
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        os.rename(tmp, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise BindError(f"cannot create control socket {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_mask)
    sock.setblocking(False)
    return sock


# -- the server ------------------------------------------------------------------


class _Client(Client):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__(sock, deadline)
        self.outbuf = bytearray()
        self.eof = False
        self.close_when_flushed = False


def _wants_input(c: _Client) -> bool:
    # Stop reading from a client that does not read its answers (or is done):
    # its buffers stay bounded, and its deadline ends it.
    return not (c.eof or c.close_when_flushed) and len(c.outbuf) < MAX_LINE and len(c.inbuf) <= MAX_LINE


class ControlServer(ClientServer[_Client]):
    """The control socket, as a primary component."""

    max_clients = MAX_CLIENTS
    what = "control socket"

    def __init__(
        self,
        path: str | None,
        watch: ClusterWatch,
        *,
        explicit: bool = True,
        defer: bool = False,
        upgrade: Callable[[], str] | None = None,
    ) -> None:
        #: None: the default under runtime_dir(), computed once the sockets are known
        self.path = path
        self.watch = watch
        self.explicit = explicit
        self.defer = defer
        self.upgrade = upgrade
        self.primary: Primary | None = None
        self.sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self.clients: dict[int, _Client] = {}

    # -- lifecycle --

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary
        if not self.defer:
            self.activate()

    def activate(self, replace_live: bool = False) -> None:
        """Create the socket and start answering. A failure on the default path only warns."""
        p = self.primary
        assert p is not None
        if self.sock is not None:
            return
        if self.path is None:
            if not p.listeners:
                return
            self.path = default_path(p.listeners[0].sock)
        try:
            if not self.explicit:
                _private_dir(os.path.dirname(self.path))
                find_servers(os.path.dirname(self.path))  # removes sockets left by killed servers
            self.sock = bind(self.path, replace_live=replace_live)
        except (BindError, OSError) as exc:
            if self.explicit:
                raise
            logger.warning("no control socket: %s", exc)
            return
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        p.add_reader(self.sock, self._accept)
        logger.info("control socket: %s (cluster-server ctl --control-socket %s status)", self.path, self.path)

    @override
    def stop_listening(self) -> None:
        """Stop accepting (the file stays, for a successor); clients being served are finished."""
        if self.sock is None:
            return
        if self.primary is not None:
            self.primary.remove_reader(self.sock)
        self.sock.close()
        self.sock = None
        self._remove_file()

    def _remove_file(self) -> None:
        # Only if the path is still ours: an upgraded successor renamed its own over it.
        if self.path is None or self._inode is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self._inode = None

    # -- I/O --

    @override
    def _welcome(self, conn: socket.socket) -> None:
        assert self.primary is not None
        if len(self.clients) >= MAX_CLIENTS:
            # Make room by dropping the client closest to its deadline (an idle one),
            # so clients that say nothing cannot lock an operator out.
            self._drop(min(self.clients, key=lambda fd: self.clients[fd].deadline))
        client = _Client(conn, self.primary.clock() + IDLE_TIMEOUT)
        self._add(client)
        if not _peer_allowed(conn):
            self._reply(client, {"ok": False, "error": "permission denied: not the server's user or root"})
            client.close_when_flushed = True
            self._after_write(conn.fileno(), client)

    @override
    def _serve(self, fd: int, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and not self._flush(fd, client):
            return
        if mask & selectors.EVENT_READ and _wants_input(client):
            for _ in range(16):  # bounded work per wake-up
                try:
                    data = client.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self._drop(fd)
                    return
                if not data:
                    client.eof = True
                    break
                client.inbuf += data
                if len(client.inbuf) > MAX_LINE:
                    break
        self._handle_lines(client)
        self._after_write(fd, client)

    def _handle_lines(self, client: _Client) -> None:
        """Answer each complete line, while the client reads what it is sent."""
        assert self.primary is not None
        while not client.close_when_flushed and len(client.outbuf) < MAX_LINE:
            nl = client.inbuf.find(b"\n")
            if nl < 0:
                if len(client.inbuf) > MAX_LINE:
                    self._refuse(client, f"request line over {MAX_LINE} bytes")
                elif client.eof:
                    if client.inbuf.strip():  # a last request without its newline
                        self._reply(client, self.handle_line(bytes(client.inbuf)))
                    client.inbuf.clear()
                    client.close_when_flushed = True
                return
            if nl > MAX_LINE:
                self._refuse(client, f"request line over {MAX_LINE} bytes")
                return
            line = bytes(client.inbuf[:nl])
            del client.inbuf[: nl + 1]
            if line.strip():
                self._reply(client, self.handle_line(line))
                client.deadline = self.primary.clock() + IDLE_TIMEOUT

    def _refuse(self, client: _Client, error: str) -> None:
        self._reply(client, {"ok": False, "error": error})
        client.inbuf.clear()
        client.close_when_flushed = True

    def _reply(self, client: _Client, response: dict[str, Any]) -> None:
        client.outbuf += json.dumps(response, separators=(",", ":")).encode() + b"\n"

    def _flush(self, fd: int, client: _Client) -> bool:
        """Send what the kernel takes; False if the client is gone."""
        while client.outbuf:
            try:
                n = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._drop(fd)
                return False
            del client.outbuf[:n]
        return True

    def _after_write(self, fd: int, client: _Client) -> None:
        if fd not in self.clients or not self._flush(fd, client):
            return
        assert self.primary is not None
        if client.close_when_flushed and not client.outbuf:
            self._linger(fd, client)
            return
        events = (selectors.EVENT_WRITE if client.outbuf else 0) | (selectors.EVENT_READ if _wants_input(client) else 0)
        if not events:
            self._drop(fd)
            return
        self.primary.modify_reader(client.sock, events)

    # -- commands --

    def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            return {"ok": False, "error": f"not a JSON object: {line[:80]!r}"}
        except RecursionError:  # '[' x 60,000: deeper than the decoder goes
            logger.warning("control socket: refused a request nested too deeply (%d bytes)", len(line))
            return {"ok": False, "error": "request nested too deeply"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "not a JSON object"}
        try:
            return {"ok": True, "result": self.handle(req)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug answering one request must not stop the primary
            logger.exception("control socket: error handling %.200r", req)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def handle(self, req: dict[str, Any]) -> Any:
        p = self.primary
        assert p is not None
        cmd = req.get("cmd")
        if cmd == "status":
            return self.watch.snapshot()
        if cmd not in ("reload", "scale", "restart", "stop", "upgrade"):
            raise ControlError(f"unknown command {cmd!r}; try status, reload, scale, restart, stop, upgrade")
        if p.stopping:
            raise ControlError("the server is stopping")
        before = p.generation  # ``ctl ... --wait`` waits for a roll to a later generation
        if cmd == "reload":
            started = p.roll("ctl reload")
            return {"started": started, "queued": not started, "generation": p.generation, "since_generation": before}
        if cmd == "scale":
            n = req.get("workers")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
                raise ControlError(f"scale takes a number of workers from 1 to 1024, not {n!r}")
            before = len(p.slots)
            p.scale(n)
            return {"workers": len(p.slots), "before": before}
        if cmd == "restart":
            wid = req.get("id")
            if isinstance(wid, bool) or not isinstance(wid, int) or wid not in p.slots:
                raise ControlError(f"no worker {wid!r}; the worker ids are {sorted(p.slots)}")
            if p.roll_state is not None:
                raise ControlError("a rolling restart is in progress; try again when it is done")
            p.roll(f"ctl restart {wid}", slots=[wid])
            return {"id": wid, "generation": p.generation, "since_generation": before}
        if cmd == "stop":
            p.stop(graceful=True, why="ctl stop")
            return {"stopping": True}
        if self.upgrade is None:
            raise ControlError("upgrading is not available in this server")
        return {"upgrade": self.upgrade()}


def _peer_allowed(conn: socket.socket) -> bool:
    try:
        _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return False
    return uid in (0, os.geteuid())


# -- the client ------------------------------------------------------------------


def find_servers(directory: str | None = None) -> list[str]:
    """Control sockets in the default directory with a live server behind them.

    Stale ones (left by a server that was killed) are removed on the way: a
    socket appears at its final path only once it listens (it is renamed into
    place), so "connection refused" there means nobody will ever answer.
    """
    directory = directory or runtime_dir()
    alive = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.sock"))):
        listening = _probe(path)
        if listening:
            alive.append(path)
        elif listening is False:
            with contextlib.suppress(OSError):
                os.unlink(path)
    return alive


def resolve(path: str | None) -> str:
    """The control socket to use: ``path``, else the only live one in the default directory."""
    if path:
        return path
    directory = runtime_dir()
    found = find_servers(directory)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ControlError(
            f"no cluster-server is running (no live control socket in {directory}); "
            "start one, or pass --control-socket PATH"
        )
    raise ControlError(
        f"{len(found)} cluster-servers are running ({', '.join(found)}); pick one with --control-socket PATH"
    )


def request(path: str, req: dict[str, Any], timeout: float = 10.0) -> Any:
    """Send one request, return its result; ControlError says what went wrong."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        try:
            while True:
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:  # a Unix socket's listen queue is full: try again shortly
                    if time.monotonic() > deadline:
                        raise ControlError(f"the server at {path} accepts no connection (its queue is full)") from None
                    time.sleep(0.02)
        except FileNotFoundError:
            raise ControlError(
                f"no cluster-server is running at {path} (no such socket); "
                "`cluster-server ctl ls` lists the running ones"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(
                f"no cluster-server is running at {path} (connection refused: a stale socket?); "
                "`cluster-server ctl ls` lists the running ones"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied connecting to {path}; run ctl as the server's user (or root)"
            ) from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(req).encode() + b"\n")
            buf = bytearray()
            while b"\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
        except TimeoutError:
            raise ControlError(f"the server at {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise ControlError(f"the server at {path} closed the connection") from None
            raise ControlError(f"talking to {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    line = bytes(buf).split(b"\n", 1)[0]
    if not line:
        raise ControlError(f"the server at {path} closed the connection without answering")
    try:
        resp = json.loads(line)
    except ValueError:
        raise ControlError(f"the server at {path} answered something that is not JSON: {line[:80]!r}") from None
    if not isinstance(resp, dict):
        raise ControlError(f"the server at {path} answered {resp!r}")
    if not resp.get("ok"):
        raise ControlError(str(resp.get("error", "the server refused the command")))
    return resp.get("result")
