"""How cluster-server takes each of uvicorn's command-line flags.

Every flag of uvicorn 0.54 is accepted (most under uvicorn's own spelling; the
options that cluster-server names differently accept uvicorn's name too, see
``OptionSpec.uvicorn`` in ``_config.py``). ``NOTES`` says where the meaning or
the default differs; ``REFUSED`` would hold a flag that cannot be honoured,
with the one line the CLI prints for it. A test reads uvicorn's own click
command and fails on a flag that is neither accepted nor refused, and
docs/migrating-from-uvicorn.md's table is generated from the same data
(``python -m cluster_server.cli.docs``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import click

#: uvicorn flag -> how cluster-server's differs (a flag not listed means the same, with the same default)
NOTES: dict[str, str] = {
    "--uds": "a stale socket file left by a dead server is replaced; one in use is an error",
    "--fd": "any listening socket (uvicorn assumes a Unix one); systemd socket activation passes fd 3",
    "--reload": "combines with `--workers`; old workers serve until new ones are ready; see [Reload](reload.md)",
    "--reload-dir": "same; several may be given",
    "--reload-include": "`*.py` always counts",
    "--reload-exclude": "`.git`, `__pycache__`, virtualenvs and editor swap files are always ignored",
    "--reload-delay": "a debounce here (quiet time before reloading, default 0.01 s), a polling interval in uvicorn",
    "--workers": "default 1, or `WEB_CONCURRENCY`; combines with `--reload`",
    "--loop": "same names; a custom `module:factory` import string is not accepted",
    "--http": "same names; a custom protocol class is not accepted; under `zttp`, `--timeout-request-header` "
    "and `--max-request-head-size` do not apply",
    "--http2": "needs `--http zttp` and the `zttp` package, as in uvicorn; see [Deployment](deployment.md#http2)",
    "--lifespan": "same; runs in every worker, after the fork",
    "--interface": "same; `auto` also recognises WSGI apps, run in a thread pool: see [WSGI apps](wsgi.md)",
    "--env-file": "python-dotenv, as uvicorn (the environment wins); loaded in each worker, so a rolling "
    "restart reads it again",
    "--log-config": "applied over cluster-server's defaults; uvicorn's formatter classes are replaced by "
    "cluster-server's, which take the same arguments and fields",
    "--log-level": "same; default `info`",
    "--access-log": "uvicorn's line, with time and worker; `--access-log-format timed` adds size and duration",
    "--use-colors": "colours the level (and an access line's status)",
    "--forwarded-allow-ips": "same, default `$FORWARDED_ALLOW_IPS` or `127.0.0.1,::1`",
    "--limit-concurrency": "per worker, as in uvicorn",
    "--limit-max-requests": "the replacement is started and ready *before* the worker retires; see "
    "[Rolling restarts](restarts.md)",
    "--limit-max-requests-jitter": "same",
    "--timeout-keep-alive": "same default, 5 s; behind a load balancer make it longer than the balancer's idle "
    "timeout: see [Deployment](deployment.md#behind-a-load-balancer)",
    "--timeout-graceful-shutdown": "bounded by default (30 s, 3 s under `--reload`), then SIGKILL; uvicorn "
    "waits forever unless it is set",
    "--timeout-worker-healthcheck": "a worker whose event loop sent no heartbeat for this long is replaced, "
    "after its stack is dumped (default 30 s; uvicorn 5 s)",
    "--ssl-keyfile": "checked by the primary before any worker starts; see [TLS](tls.md)",
    "--ssl-certfile": "checked by the primary before any worker starts; see [TLS](tls.md)",
    "--version": "prints cluster-server's version, and uvicorn's and Python's",
    "--app-dir": "same; the default is the current directory in both",
}

#: uvicorn flag -> the one line printed when it is given (cluster-server's equivalent, and why)
REFUSED: dict[str, str] = {}


def uvicorn_command() -> click.Command:
    """uvicorn's own click command (imports uvicorn: for the docs and the tests, never the primary)."""
    from uvicorn.main import main

    return main


def flags_of(param: click.Parameter) -> list[str]:
    """Every flag of a click parameter (``--access-log`` and ``--no-access-log``)."""
    return [*param.opts, *getattr(param, "secondary_opts", [])] if param.param_type_name == "option" else []
