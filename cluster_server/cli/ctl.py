"""``cluster-server ctl``: talk to a running server through its control socket.

    cluster-server ctl status            # a table like `pm2 ls`; --json for machines
    cluster-server ctl reload            # rolling restart (--wait: until it ended; exit 1 if it failed)
    cluster-server ctl scale 4           # up or down (down drains; --wait too)
    cluster-server ctl restart 2         # replace worker 2 (replacement first; --wait too)
    cluster-server ctl stop              # graceful stop
    cluster-server ctl upgrade           # re-execute the primary (like SIGUSR2)
    cluster-server ctl ls                # control sockets of running servers

Without ``--control-socket``, ctl uses the only running server's socket in the
default directory (see ``_control.runtime_dir``).
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from cluster_server._errors import ClusterServerError
from cluster_server.cli import waiting as _waiting
from cluster_server.ops import control as _control


def _fail(exc: ClusterServerError) -> NoReturn:
    click.echo(f"Error: {exc}", err=True)
    sys.exit(1)


def _call(ctx: click.Context, req: dict[str, Any]) -> Any:
    try:
        path = _control.resolve(ctx.obj["control_socket"])
        return _control.request(path, req, timeout=ctx.obj["timeout"])
    except ClusterServerError as exc:
        _fail(exc)


@click.group(
    "ctl",
    context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]},
)
@click.option(
    "--control-socket",
    metavar="PATH",
    envvar="CLUSTER_SERVER_CONTROL_SOCKET",
    show_envvar=True,
    help="The server's control socket (default: the only one running, see `ctl ls`).",
)
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True, help="Seconds to wait.")
@click.pass_context
def ctl(ctx: click.Context, control_socket: str | None, timeout: float) -> None:
    """Control a running cluster-server through its control socket."""
    ctx.obj = {"control_socket": control_socket, "timeout": timeout}


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the workers: id, pid, state, generation, uptime, requests, connections, RSS, restarts, heartbeat."""
    result = _call(ctx, {"cmd": "status"})
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        click.echo(format_status(result))


def _wait_options(fn: Any) -> Any:
    fn = click.option(
        "--wait-timeout",
        type=click.FloatRange(0.1),
        default=600.0,
        show_default=True,
        metavar="SECONDS",
        help="With --wait: give up (exit 1) after this long.",
    )(fn)
    return click.option(
        "--wait", is_flag=True, help="Return when it has ended: exit 0 if it succeeded, 1 with the reason if not."
    )(fn)


def _wait(ctx: click.Context, check: Any, timeout: float) -> None:
    """Follow the status until ``check`` says the change ended; exit 1 with the reason if it failed."""
    ended = _waiting.wait(lambda: _call(ctx, {"cmd": "status"}), check, timeout)
    if not ended.ok:
        click.echo(f"Error: {ended.message}", err=True)
        sys.exit(1)
    click.echo(ended.message)


@ctl.command()
@_wait_options
@click.pass_context
def reload(ctx: click.Context, wait: bool, wait_timeout: float) -> None:
    """Rolling restart: each worker is replaced, the replacement ready before the old one drains."""
    r = _call(ctx, {"cmd": "reload"})
    if r["started"]:
        click.echo(f"rolling restart to generation {r['generation']} started")
    else:
        click.echo("a rolling restart is in progress; another one is queued after it")
    if wait:
        _wait(ctx, lambda st: _waiting.roll_ended(st, r["since_generation"]), wait_timeout)


@ctl.command()
@click.argument("workers", type=click.IntRange(1, 1024))
@_wait_options
@click.pass_context
def scale(ctx: click.Context, workers: int, wait: bool, wait_timeout: float) -> None:
    """Change the number of workers to WORKERS (removed workers drain)."""
    r = _call(ctx, {"cmd": "scale", "workers": workers})
    click.echo(f"scaled from {r['before']} to {r['workers']} workers")
    if wait:
        _wait(ctx, lambda st: _waiting.scale_ended(st, r["workers"], r["before"]), wait_timeout)


@ctl.command()
@click.argument("worker_id", metavar="ID", type=int)
@_wait_options
@click.pass_context
def restart(ctx: click.Context, worker_id: int, wait: bool, wait_timeout: float) -> None:
    """Replace worker ID (the replacement is ready before the old one drains)."""
    r = _call(ctx, {"cmd": "restart", "id": worker_id})
    click.echo(f"restarting worker {r['id']} (generation {r['generation']})")
    if wait:
        _wait(ctx, lambda st: _waiting.roll_ended(st, r["since_generation"], r["id"]), wait_timeout)


@ctl.command()
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop the server gracefully (workers finish their requests)."""
    _call(ctx, {"cmd": "stop"})
    click.echo("stopping")


@ctl.command()
@click.pass_context
def upgrade(ctx: click.Context) -> None:
    """Re-execute the primary with its sockets (as SIGUSR2 does); the old one leaves once the new is ready."""
    r = _call(ctx, {"cmd": "upgrade"})
    click.echo(r["upgrade"])


@ctl.command("ls")
def list_servers() -> None:
    """List the control sockets of running servers in the default directory."""
    directory = _control.runtime_dir()
    found = _control.find_servers(directory)
    if not found:
        click.echo(f"no cluster-server is running (no live control socket in {directory})", err=True)
        sys.exit(1)
    for path in found:
        click.echo(path)


# -- the table -------------------------------------------------------------------

COLUMNS = ("id", "pid", "state", "gen", "uptime", "requests", "conns", "rss", "restarts", "heartbeat")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def format_status(st: dict[str, Any]) -> str:
    """The status as a table, like ``pm2 ls``."""
    head = (
        f"cluster-server {st['version']} · primary {st['pid']} · {', '.join(st['listeners'])} · "
        f"{st['app']} · generation {st['generation']} · up {format_duration(st['uptime_seconds'])}"
    )
    counts = ", ".join(f"{n} {s}" for s, n in st["states"].items() if n)
    lines = [head, f"{st['workers_configured']} workers ({counts or 'none'})"]
    if st.get("roll"):
        r = st["roll"]
        lines.append(
            f"rolling restart to generation {r['generation']} ({r['reason']}): {r['done']} done, {r['pending']} to go"
        )
    if st.get("stopping"):
        lines.append("stopping")
    table = [list(COLUMNS)]
    for row in st["workers"]:
        state = row["state"]
        if state == "backoff" and row.get("restart_in_seconds") is not None:
            state = f"backoff {row['restart_in_seconds']:.1f}s"
        table.append(
            [
                str(row["id"]),
                str(row["pid"] or "-"),
                state,
                str(row["generation"]),
                format_duration(row["uptime_seconds"]),
                str(row["requests"]),
                str(row["connections"]),
                format_bytes(row["rss_bytes"]),
                str(row["restarts"]),
                format_duration(row["heartbeat_age_seconds"]),
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    numeric = {0, 1, 3, 5, 6, 7, 8, 9}
    lines.append("")
    for r in table:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    ctl.main(args=argv, prog_name="cluster-server ctl")
