"""Fuzzing every decoder the primary runs on input it does not control.

A worker's channel (an app may write anything on it, and may run as another
user), the control socket's request lines and the metrics endpoint's HTTP
requests: whatever arrives, the primary answers or drops it, logs it, and
keeps serving. Each decoder is fuzzed in-process with hypothesis (thousands of
inputs in seconds), then a bounded random corpus goes through a real server.
"""

from __future__ import annotations

import json
import os
import random
import socket
import string
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_server._config import Config
from cluster_server._errors import ChannelError
from cluster_server.ops import control as _control
from cluster_server.ops import metrics as _metrics
from cluster_server.ops.status import ClusterWatch
from cluster_server.primary.loop import Primary
from cluster_server.primary.messaging import Messaging
from cluster_server.primary.recycle import Recycler
from cluster_server.scheduling.primary import HandOff
from cluster_server.wire.channel import MAX_MESSAGE, Channel, decode, pair

from ..conftest import asgi_app, free_port, wait_until
from ..fakes import FakeClock, FakeLauncher
from ..ops_helpers import status

#: hypothesis runs hundreds of examples per decoder: seconds, not milliseconds
pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

#: any JSON value, a few levels deep
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
#: message types the primary and its components handle, and some they do not
WORKER_TYPES = ["hb", "ready", "boot_error", "ack", "msg", "bcast", "req", "res", "listening", "online", "?"]
WORKER_FIELDS = ["r", "c", "b", "f", "k", "o", "id", "data", "self", "error", "stage", "op", "key", "by"]


def _messages() -> st.SearchStrategy[dict[str, Any]]:
    known = st.fixed_dictionaries(
        {"t": st.sampled_from(WORKER_TYPES) | st.text(max_size=5)},
        optional={name: JSON for name in WORKER_FIELDS},
    )
    # the request op values Messaging answers, with any fields
    requests = st.fixed_dictionaries(
        {
            "t": st.just("req"),
            "id": st.integers(),
            "data": st.fixed_dictionaries(
                {"op": st.sampled_from(["workers", "incr", "get", "x"])}, optional={"key": JSON, "by": JSON}
            ),
        }
    )
    acks = st.fixed_dictionaries(
        {"t": st.just("ack")},
        optional={
            "b": st.lists(st.integers(min_value=-2, max_value=5)) | JSON,
            "r": st.lists(st.integers(min_value=-2, max_value=5)) | JSON,
            "f": st.lists(st.lists(st.integers(min_value=-2, max_value=5), max_size=4)) | JSON,
            "k": st.integers() | JSON,
            "o": st.integers() | JSON,
            "c": st.integers() | JSON,
        },
    )
    return known | requests | acks


def _payloads() -> st.SearchStrategy[bytes]:
    """What a worker may put on its channel: JSON messages, any bytes, deep nesting."""
    encoded = _messages().map(lambda m: json.dumps(m, separators=(",", ":")).encode())
    nested = st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n)
    return encoded | JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=300) | nested


class _Cluster:
    """A real Primary with the components a default server has, driven without forks:
    two ready workers, worker 1 on a real channel whose other end the fuzz writes."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.launcher = FakeLauncher()
        config = Config(app="fake:app", workers=2, max_worker_memory=100)
        self.primary = Primary(config, [], launcher=self.launcher, clock=self.clock)
        self.watch = ClusterWatch()
        for c in (Messaging(), HandOff("least-busy"), self.watch, Recycler(config, rss=lambda pid: None)):
            self.primary.add_component(c)
            c.attach(self.primary)
        self.primary.manage_workers()
        self.workers = sorted(self.primary.workers.values(), key=lambda w: w.id)
        for w in self.workers:
            self.primary.handle_message(w, {"t": "ready"})
        a, b = pair()
        self.workers[0].channel = Channel(a)
        self.peer = b  # the worker's end

    def close(self) -> None:
        for w in self.workers:
            if w.channel is not None:
                w.channel.close()
        self.peer.close()

    def feed(self, payload: bytes) -> None:
        """``payload`` arrives on worker 1's channel, as the selector would report it."""
        w = self.workers[0]
        if w.channel is None or w.channel.closed:
            return
        try:
            self.peer.send(payload)
        except OSError:  # over the socket's buffer (a SEQPACKET message is sent whole)
            return
        self.primary._on_channel(w, 1)  # selectors.EVENT_READ
        self.drain_peer()

    def drain_peer(self) -> None:
        """Read what the primary answered (broadcasts, replies), so its sends never block."""
        self.peer.setblocking(False)
        try:
            while self.peer.recv(MAX_MESSAGE + 1):
                pass
        except OSError:
            pass


# -- the worker channel --------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=MAX_MESSAGE + 10) | _payloads())
def test_decode_returns_an_object_or_a_channel_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except ChannelError:
        return
    assert isinstance(msg, dict)


@FUZZ
@given(st.lists(_payloads(), min_size=1, max_size=8))
def test_any_channel_input_is_handled_and_the_primary_serves_on(payloads: list[bytes]) -> None:
    c = _Cluster()
    try:
        for data in payloads:
            c.feed(data)
            for w in c.workers[1:]:  # what a worker sends goes through handle_message directly
                try:
                    msg = decode(data)
                except ChannelError:
                    continue
                c.primary.handle_message(w, msg, [])
        c.clock.advance(1.5)
        c.primary.tick()  # deadlines and components after the input
        assert not c.primary.stopping and c.primary.fatal is None
        assert c.watch.snapshot()["workers_configured"] == 2
    finally:
        c.close()


# -- the control socket --------------------------------------------------------------

COMMANDS = ["status", "reload", "scale", "restart", "stop", "upgrade", "x"]


def _control_lines() -> st.SearchStrategy[bytes]:
    requests = st.fixed_dictionaries(
        {"cmd": st.sampled_from(COMMANDS) | JSON},
        optional={"workers": st.integers(min_value=-2, max_value=6) | JSON, "id": st.integers(-1, 4) | JSON},
    ).map(lambda r: json.dumps(r).encode())
    nested = st.integers(min_value=1, max_value=100_000).map(lambda n: b"{" * n)
    return requests | JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200) | nested


@FUZZ
@given(st.lists(_control_lines(), min_size=1, max_size=6))
def test_any_control_line_gets_a_json_answer(lines: list[bytes]) -> None:
    c = _Cluster()
    try:
        control = _control.ControlServer(None, c.watch)
        control.primary = c.primary
        for line in lines:
            answer = control.handle_line(line)
            assert isinstance(answer, dict) and isinstance(answer["ok"], bool)
            json.dumps(answer)  # what the socket sends back
            assert answer["ok"] or "internal error" not in answer["error"], answer
    finally:
        c.close()


# -- the metrics endpoint --------------------------------------------------------------


def _heads() -> st.SearchStrategy[bytes]:
    token = st.text(alphabet=string.printable, max_size=30)
    request_line = st.tuples(
        st.sampled_from(["GET", "HEAD", "POST", "get", ""]) | token,
        st.sampled_from(["/metrics", "/metrics?x=1", "/", "*"]) | token,
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/9"]) | token,
    ).map(" ".join)
    accept = st.sampled_from(
        [
            "application/openmetrics-text; version=1.0.0",
            "application/openmetrics-text; version=99; escaping=bogus",
            "text/plain;version=0.0.4",
            "*/*",
        ]
    ) | st.text(max_size=60)
    headers = st.lists(st.tuples(st.sampled_from(["Accept", "Host", "X"]) | token, accept), max_size=4)
    text = st.tuples(request_line, headers).map(lambda rh: "\r\n".join([rh[0], *(f"{k}: {v}" for k, v in rh[1])]))
    return text.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=300)


@FUZZ
@given(_heads())
def test_any_metrics_request_gets_an_http_answer(head: bytes) -> None:
    c = _Cluster()
    server = _metrics.MetricsServer("127.0.0.1:0", c.watch)
    try:
        server.primary = c.primary
        response = server.respond(head)
        status_line, _, rest = response.partition(b"\r\n")
        assert status_line.split()[0] == b"HTTP/1.1" and status_line.split()[1] in (b"200", b"400", b"404", b"405")
        headers = rest.partition(b"\r\n\r\n")[0]
        assert b"\r" not in headers.replace(b"\r\n", b""), "a header line broken by a bare CR"
    finally:
        server.close()
        c.close()


# -- a bounded random corpus through a real server -------------------------------------------

#: an app that writes a request's body, as is, onto its channel to the primary
CHANNEL_WRITER = asgi_app(
    "import os\nfrom cluster_server import cluster",
    """
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if body:
        try:
            cluster._endpoint.channel.sock.send(body)
        except OSError:
            pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
    """,
)


def _corpus(rng: random.Random, n: int) -> list[bytes]:
    """Garbage of every kind: random bytes, broken and nested JSON, wrong types, long lines."""
    out: list[bytes] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(rng.randbytes(rng.randint(1, 300)))
        elif kind == 1:
            out.append(rng.choice([b"[", b"{"]) * rng.randint(1, 60_000))
        elif kind == 2:
            out.append(json.dumps({"t": rng.choice(WORKER_TYPES), "b": [rng.randint(-5, 5)], "f": [[1, "x"]]}).encode())
        elif kind == 3:
            out.append(
                json.dumps(
                    {"cmd": rng.choice([*COMMANDS[:3], "scale", "x"]), "workers": rng.choice([0, -1, "2", 2.5, None])}
                ).encode()
            )
        elif kind == 4:
            out.append(json.dumps([rng.random() for _ in range(rng.randint(0, 20))]).encode())
        else:
            out.append(b'{"t": "' + rng.randbytes(20).hex().encode() + b'"')  # cut short
    return out


@pytest.mark.timeout(60)
def test_a_real_primary_survives_a_random_corpus_on_every_input(
    start_server: Any, write_app: Any, tmp_path: Path
) -> None:
    rng = random.Random(13)
    corpus = _corpus(rng, 240)
    write_app("writer", CHANNEL_WRITER)
    ctl = str(tmp_path / "ctl.sock")
    mport = free_port()
    srv = start_server(
        "writer:app",
        "--workers",
        "2",
        "--control-socket",
        ctl,
        "--metrics-bind",
        f"127.0.0.1:{mport}",
        "--no-access-log",
    ).wait_ready()
    with httpx.Client(base_url=srv.url, timeout=10) as client:
        for data in corpus:  # onto a worker's channel
            assert client.post("/", content=data).status_code == 200
    for data in corpus:  # as control-socket lines, several per connection
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(ctl)
            s.sendall(data.replace(b"\n", b" ") + b"\n" + rng.randbytes(30).replace(b"\n", b"") + b"\n")
            s.shutdown(socket.SHUT_WR)
            answers = s.makefile("rb").read().splitlines()
            assert answers and all("ok" in json.loads(a) for a in answers)
    for data in corpus:  # as metrics requests
        with socket.create_connection(("127.0.0.1", mport), timeout=10) as s:
            s.sendall(data[:4000] + b"\r\n\r\n")
            head = s.makefile("rb").readline()
            assert head.startswith(b"HTTP/1.1 "), head
    assert srv.proc.poll() is None
    assert status(ctl)["states"]["ready"] == 2
    assert httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).status_code == 200
    wait_until(lambda: srv.get().status_code == 200, 10)
    log = srv.log()
    assert "Traceback" not in log and "unexpected error" not in log
    assert "dropped a message" in log  # the garbage was seen, and dropped
    assert len(set(os.listdir(f"/proc/{srv.pid}/fd"))) < 64  # nothing piled up
