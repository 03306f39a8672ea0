"""Connection scheduling: who accepts a connection, and which worker serves it.

``--scheduling`` picks one of (see docs/scheduling.md for the trade-offs and numbers):

- ``shared`` (the default): every worker accepts on the listening socket it
  inherited; the kernel decides who wins each connection, among the workers
  whose event loop is free to call ``accept``. The primary does nothing per
  connection. With ``defer_accept`` a connection is only acceptable once its
  request has arrived, so it goes to a worker that is free then.
- ``round-robin``: only the primary accepts. It hands each connection's fd to
  the next READY worker over that worker's channel (``SCM_RIGHTS``).
- ``least-busy``: like round-robin, but the READY worker with the fewest busy
  connections (a request in progress, or none received yet; idle keep-alive
  connections and WebSockets do not count) gets the next one. A worker whose
  event loop does not answer goes last; once one was seen blocked, connections
  queue in the primary rather than in busy workers (``BUSY_MAX``).
- ``reuseport``: each worker binds its own ``SO_REUSEPORT`` socket; the kernel
  hashes connections over them.

The hand-off protocol (JSON over the worker channel, fds alongside; the type names
are ``CONN`` and ``ACK`` in ``wire/messages.py``)::

    primary -> worker  {"t": "conn", "b": BATCH,  with 1..253 connection fds
                        "q": 1}                     least-busy is queueing (BUSY_MAX applies)
    worker -> primary  {"t": "ack",
                        "b": [BATCH, ...],          taken, every fd of the batch
                        "r": [BATCH, ...],          refused: the worker is draining
                        "f": [[BATCH, I, ...], ...] refused fds I of BATCH (all if none
                                                    listed): the worker is at its fd limit
                        "k": TAKEN, "o": OPEN,      fds taken in total, connections open now
                                                    (least-busy: busy ones, see BUSY_MAX)
                        "c": CONNS}                 least-busy: connections open now, idle or not

Like Node's cluster, the primary keeps its own copy of every fd it hands out
until the worker acknowledges it, and gives it to another worker when that one
refuses it, is reaped, or could not be sent to. A worker never gets more than
``WINDOW`` unacknowledged connections; when no worker can take one, the primary
holds up to ``HOLD_MAX`` connections and then stops accepting, which leaves
new connections in the kernel's backlog (backpressure).
"""

from __future__ import annotations

import errno
import socket

#: policies where the primary accepts and hands connections over
HANDOFF = ("round-robin", "least-busy")

#: most connections a worker may have been handed and not yet acknowledged
WINDOW = 128
#: most connections the primary holds when no worker can take them (then it stops accepting)
HOLD_MAX = 1024
#: most accept() calls per wake-up, so acks, signals and timers are not starved
ACCEPT_MAX = 512
#: a worker at its fd limit gets no connections for this long, doubling up to RETRY_CAP
RETRY_FIRST = 0.05
RETRY_CAP = 1.0
#: the primary at its own fd limit stops accepting for this long
ACCEPT_PAUSE = 0.1
#: least-busy: a worker holding connections it has not acknowledged for this long, with no
#: ack in between, is not running its event loop (a blocking request, CPU starvation): it
#: gets new connections only when every worker is in that state
STALL = 0.01
#: least-busy, once a worker's event loop was seen blocked (it held connections and sent
#: no ack for BLOCKED: longer than STALL, so a busy machine's scheduling delays do not
#: count), for QUEUE_FOR seconds: a worker with BUSY_MAX busy connections (a request in
#: progress, or none received yet) gets no more. Connections wait in the
#: primary instead, first come first served by whichever worker frees up first, rather
#: than inside one worker, where the next blocking request would stall them all. Off
#: while no loop blocks: then it would only cost a report per connection at full load.
BUSY_MAX = 2
BLOCKED = 0.03
QUEUE_FOR = 10.0
#: least-busy: an ack BLOCKED late counts as a blocked loop only for the part of the delay the
#: worker did not spend waiting for a CPU (``/proc/PID/schedstat``): on a loaded machine CPU
#: scheduling alone delays acks that long. That is read when a worker starts holding
#: connections or acknowledges them, at most once per WAITED_EVERY per worker.
WAITED_EVERY = 0.01
#: when no worker has been under BUSY_MAX for this long (long-lived requests: streams,
#: long polls), the next connection goes to the least busy worker anyway
HOLD_WAIT = 0.02
#: least-busy: a worker sends at most one pure load report (connections no longer busy,
#: nothing to acknowledge) per this many seconds; acks carry the load too, and a drop
#: below BUSY_MAX while the primary is queueing is reported at once. Acks are never
#: delayed: until the primary gets one it holds a reference to the connection, so a
#: connection the worker already closed would not be closed (no FIN) before the ack arrives.
REPORT_INTERVAL = 0.02
#: fds the primary keeps free beyond its connections and workers' channels (its clients, templates...)
FD_RESERVE = 64
#: errors that mean "out of fds or memory": stop accepting for a while
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors about one connection only: skip it and accept the next
_GONE_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"

#: seconds a TCP connection may stay silent before it is accepted anyway (TCP_DEFER_ACCEPT)
DEFER_ACCEPT = 1


def defer_accept(sock: socket.socket) -> bool:
    """Have the kernel hand ``sock``'s connections to ``accept()`` once their first bytes
    (the request) arrived, not at the end of the handshake (Linux ``TCP_DEFER_ACCEPT``,
    nginx's ``listen ... deferred``). True when set.

    A connection is then placed when it has work: under ``shared`` the worker whose loop
    is free when the request arrives takes it, so a client that connects early and
    sends later (a browser's preconnect, a load generator's reconnect) no longer sits
    in a worker that blocks meanwhile; under the hand-off policies the primary routes
    it by the load at that moment. One that stays silent is accepted after about
    ``DEFER_ACCEPT`` seconds anyway, when the kernel resends its SYN-ACK. HTTP clients
    speak first, TLS ones too; nothing else is served here.
    """
    if not hasattr(socket, "TCP_DEFER_ACCEPT") or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
    except OSError:
        return False
    return True
