"""The command line, generated from the option declarations in ``_config``.

``cluster-server APP [OPTIONS]``. Errors a user can fix end with one line,
``Error: <what is wrong and how to fix it>``, and a non-zero exit status.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable
from typing import Any, Literal

import click
from click.core import ParameterSource

from cluster_server import _logging
from cluster_server._config import Config, OptionSpec, cli_flag, env_vars, options, unwrap_optional
from cluster_server._errors import ClusterServerError
from cluster_server._run import serve
from cluster_server._version import __version__

GROUP_TITLES = {
    "socket": "Listening",
    "processes": "Processes",
    "app": "Application",
    "http": "HTTP",
    "reload": "Reloading (development)",
    "logging": "Logging",
    "operations": "Operations",
}


def click_type(tp: Any, spec: OptionSpec) -> Any:
    base, _ = unwrap_optional(tp)
    if typing.get_origin(base) is tuple:  # a repeatable option: the type of one value
        return click_type(typing.get_args(base)[0], spec)
    if typing.get_origin(base) is Literal:
        return click.Choice([str(c) for c in typing.get_args(base)])
    if base is int:
        if spec.min is not None or spec.max is not None:
            return click.IntRange(
                None if spec.min is None else int(spec.min), None if spec.max is None else int(spec.max)
            )
        return click.INT
    if base is float:
        if spec.min is not None or spec.max is not None:
            return click.FloatRange(spec.min, spec.max)
        return click.FLOAT
    return click.STRING


def build_option(name: str, tp: Any, default: Any, spec: OptionSpec) -> click.Option:
    flag = cli_flag(name, spec)
    base, _ = unwrap_optional(tp)
    kwargs: dict[str, Any] = {
        "help": spec.help,
        "envvar": env_vars(name, spec),
        "show_envvar": True,
        "default": default,
    }
    if base is bool:
        decls = [f"{flag}/--no-{flag[2:]}" if spec.negatable else flag, name]
        kwargs["is_flag"] = True
        kwargs["show_default"] = True
        return click.Option(decls, **kwargs)
    kwargs["type"] = click_type(tp, spec)
    if spec.metavar:
        kwargs["metavar"] = spec.metavar
    if typing.get_origin(base) is tuple:  # repeatable
        kwargs["multiple"] = True
        kwargs["show_default"] = bool(default)
    else:
        kwargs["show_default"] = default is not None and default != ""
    return click.Option([flag, name], **kwargs)


def config_options() -> list[click.Option]:
    hints = typing.get_type_hints(Config)
    return [build_option(f.name, hints[f.name], f.default, spec) for f, spec in options() if spec.cli]


def _run_command(app: str, **values: Any) -> None:
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        # Options left at their defaults are not passed on: Config applies its own
        # defaults, some of which depend on other options (--graceful-timeout under --reload).
        values = {k: v for k, v in values.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    try:
        config = Config(app=app, **values)
        _logging.configure(config.log_level, config.access_log)
        code = serve(config)
    except ClusterServerError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code)


def build_command(callback: Callable[..., Any] = _run_command) -> click.Command:
    params: list[click.Parameter] = [
        click.Argument(["app"], envvar="CLUSTER_SERVER_APP", metavar="APP"),
        *config_options(),
    ]
    cmd = click.Command(
        "cluster-server",
        callback=callback,
        params=params,
        help=(
            "Serve APP ('module:attribute', an ASGI or WSGI app) with a primary process and forked uvicorn workers."
            "\n\nControl a running server with `cluster-server ctl` (see `cluster-server ctl --help`)."
        ),
        context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]},
    )
    click.version_option(__version__, "--version", prog_name="cluster-server")(cmd)
    return cmd


cli = build_command()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["ctl"]:  # `cluster-server ctl ...`: APP is never a bare "ctl" (it needs a ':')
        from cluster_server.cli.ctl import main as ctl_main

        ctl_main(args[1:])
        return
    cli.main(args=args, prog_name="cluster-server")
