"""Every message that crosses a channel, declared once: its name, its direction, its fields.

A channel (``wire/channel.py``) carries JSON objects whose key ``t`` is the
message type. The type names below are the only spelling of them in the
package: senders build ``{"t": READY}``, dispatchers compare with ``READY``, so
a misspelled type is a ``NameError`` (and a mypy error), not a message that is
silently never handled. :data:`CATALOGUE` says, for each channel, who sends
what with which fields; docs/architecture.md's "Channels and messages" table is
generated from it (``python -m cluster_server.cli.docs``, or
``python -m cluster_server.wire.messages --markdown`` to print it) and a test
fails when the two differ.

The catalogue is documentation the code can check, not a validator: nothing
here runs per message. The hand-off's ``conn``/``ack`` and the heartbeats are
sent per connection and per tick, and stay plain dicts compared by name.
Receivers check the fields they use (a malformed message is logged and
dropped, never raised into a loop).

Four kinds of channel exist, one socketpair each (see :data:`CHANNELS`):

- ``worker``: the HTTP primary and each HTTP worker (``primary/loop.py`` and
  its components; ``worker/main.py``);
- ``template``: the HTTP primary and a template process (``templates/``);
- ``watcher``: the ``--reload`` file watcher to the HTTP primary;
- ``cluster``: a ``cluster_server.cluster`` primary and each of its workers
  (``cluster/primary.py``, ``cluster/worker.py``).

A name may mean different things on different channels (``ready``, ``error``):
a message type is (channel, name).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Final

# -- the type names (the value of "t") -------------------------------------------------------

# worker channel: an HTTP worker's life
READY: Final = "ready"
HEARTBEAT: Final = "hb"
BOOT_ERROR: Final = "boot_error"
HEALTH: Final = "health"
# worker channel: connection hand-off (--scheduling round-robin / least-busy); cluster channel: SCHED_RR
CONN: Final = "conn"
ACK: Final = "ack"
# worker and cluster channels: the messaging API (cluster.send, broadcast, request)
MSG: Final = "msg"
BCAST: Final = "bcast"
REQ: Final = "req"
RES: Final = "res"
# cluster channel: a cluster-API worker's life and its shared listening sockets
ONLINE: Final = "online"
LISTEN: Final = "listen"
LISTENING: Final = "listening"
DISCONNECT: Final = "disconnect"
DISCONNECTING: Final = "disconnecting"
# any channel: a message over 64 KiB, in a memfd sent with this envelope (wire/channel.py)
LARGE: Final = "large"
# template channel (and READY, ERROR)
SPAWN: Final = "spawn"
SPAWNED: Final = "spawned"
SPAWN_FAILED: Final = "spawn_failed"
STALE: Final = "stale"
ERROR: Final = "error"
# watcher channel (and ERROR)
WATCHING: Final = "watching"
CHANGES: Final = "changes"


# -- the catalogue ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelKind:
    """One kind of channel: its two ends and where each end's code lives."""

    name: str
    #: (one end, its module), (the other end, its module)
    ends: tuple[tuple[str, str], tuple[str, str]]
    purpose: str


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    meaning: str
    optional: bool = False


@dataclass(frozen=True)
class MessageType:
    channel: str
    name: str
    sender: str
    receiver: str
    purpose: str
    fields: tuple[Field, ...] = ()
    #: the file descriptors that travel with it (SCM_RIGHTS); "" for none
    fds: str = ""

    @property
    def direction(self) -> str:
        return f"{self.sender} -> {self.receiver}"


def _f(name: str, type_: str, meaning: str, optional: bool = False) -> Field:
    return Field(name, type_, meaning, optional)


CHANNELS: Final = (
    ChannelKind(
        "worker",
        (("primary", "primary/loop.py"), ("worker", "worker/main.py")),
        "one per HTTP worker, made when it is forked (by the primary or a template)",
    ),
    ChannelKind(
        "template",
        (("primary", "templates/launcher.py"), ("template", "templates/process.py")),
        "one per template process (--preload, --reload): workers are forked from it",
    ),
    ChannelKind(
        "watcher",
        (("primary", "templates/reload.py"), ("watcher", "templates/reload.py")),
        "the --reload file watcher, a process of its own (watchfiles starts threads)",
    ),
    ChannelKind(
        "cluster",
        (("primary", "cluster/primary.py"), ("worker", "cluster/worker.py")),
        "one per worker of a cluster_server.cluster program (cluster.fork())",
    ),
)

# fmt: off
_ID = _f("id", "int", "request id, unique among the sender's open requests")
_DATA = _f("data", "JSON", "the payload")
_ANSWER = (
    _ID,
    _f("data", "JSON", "the answer", optional=True),
    _f("error", "str", "why there is no answer (instead of data)", optional=True),
)


_HANDLE = _f("handle", '"socket"', "a socket came with it (Node's sendHandle)", optional=True)
_ADVANCED = _f(
    "a", "str", "serialization='advanced': the data in wire/advanced.py's tagged JSON, instead of data", optional=True
)


def _messaging(channel: str, primary_asks: bool) -> tuple[MessageType, ...]:
    """``msg``, ``bcast``, ``req``, ``res``: the messaging API's protocol, one for both channels
    that carry it (``worker``: the HTTP primary answers, never asks; ``cluster``: both ask, and
    a msg may carry a socket, ``cluster/handles.py``)."""
    adv = (_ADVANCED,) if primary_asks else ()
    msg = (_DATA, *adv, _HANDLE) if primary_asks else (_DATA,)
    msg_fds = "1 with a handle: the socket" if primary_asks else ""
    both = (
        MessageType(
            channel, MSG, "worker", "primary", "cluster.send(data): the message event (HTTP: logged at debug level)",
            msg, msg_fds,
        ),
        MessageType(
            channel, BCAST, "worker", "primary", "cluster.broadcast(data): sent on as msg to every other worker",
            (_DATA, *adv, _f("self", "bool", "the sender gets it too")),
        ),
        MessageType(
            channel, REQ, "worker", "primary",
            "await cluster.request(data), answered by res (HTTP: the built-in workers, incr, get)", (_ID, _DATA, *adv),
        ),
        MessageType(
            channel, MSG, "primary", "worker",
            "a broadcast, or worker.send(data): cluster.on_message, cluster.recv()", msg, msg_fds,
        ),
    )
    if not primary_asks:
        return (*both, MessageType(channel, RES, "primary", "worker", "the answer to a req", _ANSWER))
    return (
        *both,
        MessageType(channel, RES, "worker", "primary", "the answer to a req from the primary", (*_ANSWER, *adv)),
        MessageType(
            channel, REQ, "primary", "worker",
            "await worker.request(data), answered by res from the worker's cluster.on_request handler",
            (_ID, _DATA, *adv),
        ),
        MessageType(
            channel, RES, "primary", "worker", "the answer to a req or a listen",
            (*_ANSWER, *adv, _f("kind", '"bind"', "listen failed: raise BindError", optional=True)),
            "1 for a listen answer under SCHED_NONE: the listening socket",
        ),
    )


def _large(channel: str) -> tuple[MessageType, ...]:
    """``large``: the envelope of a message over 64 KiB (``wire/channel.py``; any channel can
    carry one, those of the messaging API are where a program makes them)."""
    fields = (_f("n", "int", "the message's size (at most 256 MiB)"),)
    what = "a message over 64 KiB: the memfd holds it (the same ordering; its own fds come first)"
    fds = "the message's own, then a sealed memfd of n bytes"
    return (
        MessageType(channel, LARGE, "worker", "primary", what, fields, fds),
        MessageType(channel, LARGE, "primary", "worker", what, fields, fds),
    )


CATALOGUE: Final = (
    # -- worker channel ------------------------------------------------------------------------
    MessageType(
        "worker", READY, "worker", "primary",
        "lifespan startup completed and the sockets are served: the worker counts as capacity",
        (
            _f(
                "error_page",
                "bool",
                "--reload only: the app could not start (its boot_error came first) and the worker "
                "answers every request with a 500 page saying why",
                optional=True,
            ),
        ),
    ),
    MessageType(
        "worker", HEARTBEAT, "worker", "primary",
        "every --heartbeat-interval s, from the event loop (its absence marks a hung worker)",
        (_f("r", "int", "requests served in total"), _f("c", "int", "connections open now")),
    ),
    MessageType(
        "worker", BOOT_ERROR, "worker", "primary",
        "the worker cannot start; it exits next (status 3), once the primary took this and what came before "
        "(under --reload it serves the error page instead, and says ready with error_page)",
        (
            _f("error", "str", "what is wrong, in one line"),
            _f(
                "stage",
                '"bind" | "privileges" | "load" | "lifespan"',
                "where it failed: the error the first generation stops with",
                optional=True,
            ),
        ),
    ),
    MessageType(
        "worker", HEALTH, "primary", "worker",
        "what --health-path answers from now on (worker/health.py)",
        (_f("ok", "bool", "healthy"), _f("status", "str", '"starting", "ok" or "shutting down"')),
    ),
    MessageType(
        "worker", CONN, "primary", "worker",
        "connections accepted by the primary, handed over (scheduling/)",
        (
            _f("b", "int", "batch number, acknowledged by ack"),
            _f("q", "1", "least-busy is queueing in the primary: report load drops at once", optional=True),
            _f("force", "true", "serve them even while draining (nobody else can)", optional=True),
        ),
        "1 to 253 accepted connections",
    ),
    MessageType(
        "worker", ACK, "worker", "primary",
        "which handed-over connections the worker took or refused, and its load (scheduling/)",
        (
            _f("b", "list[int]", "batches taken, every fd", optional=True),
            _f("r", "list[int]", "batches refused: the worker is draining", optional=True),
            _f("f", "list[list[int]]", "[batch, index, ...] refused at the worker's fd limit", optional=True),
            _f("k", "int", "connections taken in total", optional=True),
            _f("o", "int", "connections open now (least-busy: busy ones)", optional=True),
            _f("c", "int", "least-busy: connections open now, idle or not", optional=True),
        ),
    ),
    *_messaging("worker", primary_asks=False),
    *_large("worker"),
    # -- template channel ----------------------------------------------------------------------
    MessageType(
        "template", SPAWN, "primary", "template",
        "fork a worker (a double fork: the primary, a child subreaper, becomes its parent)",
        (_f("id", "int", "the worker's slot"), _f("generation", "int", "its generation")),
        "1: the worker's end of its new worker channel",
    ),
    MessageType(
        "template", SPAWNED, "template", "primary", "spawn done: the worker runs", (_f("pid", "int", "its pid"),)
    ),
    MessageType(
        "template", SPAWN_FAILED, "template", "primary", "spawn failed: no worker", (_f("error", "str", "why"),)
    ),
    MessageType(
        "template", READY, "template", "primary",
        "imports done, gc frozen: the template takes spawn requests",
        (_f("modules", "int", "modules it imported"), _f("seconds", "float", "how long that took")),
    ),
    MessageType(
        "template", ERROR, "template", "primary",
        "the template cannot serve (the app does not import, an import started a thread); it exits next",
        (
            _f("error", "str", "what is wrong"),
            _f("threaded", "bool", "an import started a thread", optional=True),
            _f("stage", '"privileges"', "--user/--group could not be switched to", optional=True),
        ),
    ),
    MessageType(
        "template", STALE, "template", "primary",
        "--reload: a dependency the template imported changed on disk; the primary builds a new template",
        (_f("files", "list[str]", "the first 20 changed files"), _f("n", "int", "how many changed")),
    ),
    # -- watcher channel -----------------------------------------------------------------------
    MessageType("watcher", WATCHING, "watcher", "primary", "the watches are in place"),
    MessageType(
        "watcher", CHANGES, "watcher", "primary",
        "files changed (one debounced batch): roll to a new generation",
        (_f("files", "list[str]", "the first 100 changed files"), _f("n", "int", "how many changed")),
    ),
    MessageType(
        "watcher", ERROR, "watcher", "primary",
        "the watcher failed; it exits next and is restarted", (_f("error", "str", "what failed"),),
    ),
    # -- cluster channel -----------------------------------------------------------------------
    MessageType("cluster", ONLINE, "worker", "primary", "the worker runtime started (the online event)"),
    *_large("cluster"),
    MessageType(
        "cluster", LISTEN, "worker", "primary",
        "cluster.listen(address): the primary binds it once and answers res: with the socket "
        "(SCHED_NONE), or with {addr, rr: true} and adds the worker to the address's round-robin handle",
        (
            _ID,
            _f("addr", "[host, port] | str", "a TCP address or a Unix socket path"),
            _f("backlog", "int", "listen backlog"),
            _f("index", "int", "port 0: the worker's n-th listen of that host (from 0): one port per n", optional=True),
            _f("type", '"dgram"', "a datagram socket (UDP, Unix), always shared", optional=True),
            _f("h", "int", "the worker's id for this listener (SCHED_RR: conn and ack name it)", optional=True),
        ),
    ),
    MessageType(
        "cluster", ACK, "worker", "primary",
        "SCHED_RR: which handed-over connections the worker's server accepted, or gives back "
        "(the worker channel's ack, for one listener; cluster/rr.py)",
        (
            _f("h", "int", "the listener"),
            _f("b", "list[int]", "batches accepted by the server", optional=True),
            _f("r", "list[int]", "batches given back: the listener is closed", optional=True),
            _f("f", "list[list[int]]", "[batch, index, ...] given back (at the fd limit, or closed)", optional=True),
            _f("close", "true", "the listener is closed: route nothing more to it", optional=True),
        ),
    ),
    MessageType(
        "cluster", LISTENING, "worker", "primary",
        "the worker serves on a listening socket (the listening event)",
        (_f("addr", "[host, port] | str", "the address it serves"),),
    ),
    MessageType(
        "cluster", DISCONNECTING, "worker", "primary",
        "the worker disconnects of its own accord (worker.exited_after_disconnect)",
    ),
    MessageType(
        "cluster", CONN, "primary", "worker",
        "SCHED_RR: a connection the primary accepted, for one of the worker's listeners (cluster/rr.py)",
        (_f("b", "int", "batch number, acknowledged by ack"), _f("h", "int", "the listener")),
        "1 accepted connection",
    ),
    MessageType(
        "cluster", DISCONNECT, "primary", "worker",
        "worker.disconnect(): close your servers and the channel, then exit",
    ),
    *_messaging("cluster", primary_asks=True),
)
# fmt: on


def names() -> frozenset[str]:
    """Every type name in use, on any channel."""
    return frozenset(m.name for m in CATALOGUE)


def of_channel(channel: str, receiver: str | None = None) -> tuple[MessageType, ...]:
    """The messages of one channel kind (those ``receiver`` gets, if given), in catalogue order."""
    return tuple(m for m in CATALOGUE if m.channel == channel and receiver in (None, m.receiver))


# -- the generated documentation ----------------------------------------------------------------

BEGIN: Final = (
    "<!-- BEGIN MESSAGES: generated from cluster_server/wire/messages.py by "
    "`python -m cluster_server.cli.docs`; do not edit by hand -->"
)
END: Final = "<!-- END MESSAGES -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _fields(m: MessageType) -> str:
    if not m.fields:
        return "—"
    parts = [f"`{f.name}`{'?' if f.optional else ''}: {f.type} — {f.meaning}" for f in m.fields]
    return _cell("<br>".join(parts))


def markdown() -> str:
    """The channels table and one message table per channel kind (GitHub/mkdocs tables)."""
    lines = [
        "| channel | ends (code) | what it is |",
        "| --- | --- | --- |",
    ]
    for ch in CHANNELS:
        (a, a_mod), (b, b_mod) = ch.ends
        lines.append(f"| `{ch.name}` | {a} (`{a_mod}`), {b} (`{b_mod}`) | {_cell(ch.purpose)} |")
    for ch in CHANNELS:
        lines += [
            "",
            f"### The `{ch.name}` channel",
            "",
            "| message | direction | fields (`?`: optional) | fds | what it says |",
            "| --- | --- | --- | --- | --- |",
        ]
        for m in of_channel(ch.name):
            fds = _cell(m.fds) if m.fds else "—"
            lines.append(f"| `{m.name}` | {m.direction} | {_fields(m)} | {fds} | {_cell(m.purpose)} |")
    return "\n".join(lines) + "\n"


def render_between_markers(current: str) -> str:
    """``current`` (a page) with the text between :data:`BEGIN` and :data:`END` regenerated."""
    start, end = current.find(BEGIN), current.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no message-table markers ({BEGIN!r} ... {END!r})")
    return current[: start + len(BEGIN)] + "\n" + markdown() + current[end:]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--markdown"]:
        print("usage: python -m cluster_server.wire.messages --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
