"""The Python twin of the example in Node's cluster docs.

    python examples/node_cluster.py                                    # fork (default)
    CLUSTER_SERVER_START_METHOD=spawn python examples/node_cluster.py  # a fresh interpreter per worker

The primary forks one worker per CPU (``WORKERS`` overrides it) and logs each
exit; every worker serves HTTP on port 8000 (``PORT``) through the socket the
primary bound once, answering "Handled by <pid>". Ctrl+C stops everything.
"""

import os
import signal
from http.server import BaseHTTPRequestHandler

from cluster_server import cluster

NUM_WORKERS = int(os.environ.get("WORKERS", os.cpu_count() or 1))
PORT = int(os.environ.get("PORT", "8000"))


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"Handled by {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet, like Node's example


if cluster.is_primary:
    print(f"Primary {os.getpid()} is running", flush=True)

    for _ in range(NUM_WORKERS):
        cluster.fork()

    @cluster.on("exit")
    def on_exit(worker: cluster.Worker, code: int | None, sig: signal.Signals | None) -> None:
        print(f"worker {worker.pid} died ({sig.name if sig else code})", flush=True)

    cluster.run()
else:
    # Workers share the TCP connection: the primary bound it once.
    with cluster.HTTPServer(("127.0.0.1", PORT), Hello) as server:
        print(f"Worker {os.getpid()} started", flush=True)
        server.serve_forever()
