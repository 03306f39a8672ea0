"""The command line, generated from the option declarations in ``_config``.

``cluster-server APP [OPTIONS]``. Errors a user can fix end with one line,
``Error: <what is wrong and how to fix it>``, and a non-zero exit status.
"""

from __future__ import annotations

import platform
import re
import sys
import typing
from collections.abc import Callable
from typing import Any, Literal

import click
from click.core import ParameterSource

from cluster_server import _logging
from cluster_server._config import Config, OptionSpec, cli_flags, env_vars, options, unwrap_optional
from cluster_server._errors import ClusterServerError
from cluster_server._run import serve
from cluster_server._version import __version__
from cluster_server.cli import uvicorn_compat

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


def metavar_of(spec: OptionSpec, tp: Any) -> str | None:
    """The value's name in --help and docs/cli.md: the declared one, else one from the type
    (SECONDS for a float whose help speaks of seconds)."""
    if spec.metavar:
        return spec.metavar
    base, _ = unwrap_optional(tp)
    if typing.get_origin(base) is tuple:
        base = typing.get_args(base)[0]
    if base is float:
        return "SECONDS" if re.search(r"\bseconds\b", spec.help, re.IGNORECASE) else "FLOAT"
    return {int: "INTEGER", str: "TEXT", bool: "BOOLEAN"}.get(base)


def build_option(name: str, tp: Any, default: Any, spec: OptionSpec) -> click.Option:
    flags = cli_flags(name, spec)
    base, _ = unwrap_optional(tp)
    kwargs: dict[str, Any] = {
        "help": spec.help,
        "envvar": env_vars(name, spec),
        "show_envvar": True,
        "default": default,
    }
    if base is bool and spec.takes_value:  # `--ws-per-message-deflate false`, as uvicorn spells it
        return click.Option([*flags, name], type=click.BOOL, show_default=True, **kwargs)
    if base is bool:
        decls = [f"{f}/--no-{f[2:]}" for f in flags] if spec.negatable else flags
        kwargs["is_flag"] = True
        kwargs["show_default"] = default is not None
        return click.Option([*decls, name], **kwargs)
    kwargs["type"] = click_type(tp, spec)
    if typing.get_origin(base) is not Literal:
        kwargs["metavar"] = metavar_of(spec, tp)
    if typing.get_origin(base) is tuple:  # repeatable
        kwargs["multiple"] = True
        kwargs["show_default"] = bool(default)
    else:
        kwargs["show_default"] = default is not None and default != ""
    return click.Option([*flags, name], **kwargs)


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
        _logging.configure_for(config)
        code = serve(config)
    except ClusterServerError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code)


class GroupedCommand(click.Command):
    """A command whose --help lists its options under the groups of ``GROUP_TITLES``."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        group_of = {f.name: spec.group for f, spec in options()}
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option):
                continue  # APP is in the usage line and the description
            record = param.get_help_record(ctx)
            if record is not None:
                title = GROUP_TITLES.get(group_of.get(param.name or "", ""), "Other")
                sections.setdefault(title, []).append(record)
        for title in [*GROUP_TITLES.values(), "Other"]:
            if title in sections:
                with formatter.section(f"{title} options"):
                    formatter.write_dl(sections[title])


def version_line() -> str:
    """cluster-server's version, and those of the uvicorn and Python it runs (read without importing uvicorn)."""
    # Imported here, for --version only: a server's primary should not carry importlib.metadata
    # into workers (with --user, a worker that cannot read the standard library sees other imports fail).
    import importlib.metadata

    try:
        uvicorn_version = importlib.metadata.version("uvicorn")
    except importlib.metadata.PackageNotFoundError:
        uvicorn_version = "(not installed)"
    return (
        f"cluster-server {__version__} with uvicorn {uvicorn_version}, "
        f"{platform.python_implementation()} {platform.python_version()} on {platform.system()}"
    )


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit()


def refusing_option(flag: str, why: str) -> click.Option:
    """A uvicorn flag cluster-server cannot honour: given, it ends the command with ``why``."""

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None and not ctx.resilient_parsing:
            raise click.UsageError(why, ctx)

    return click.Option([flag], hidden=True, expose_value=False, callback=refuse, default=None)


def build_command(callback: Callable[..., Any] = _run_command, refused: dict[str, str] | None = None) -> click.Command:
    refused = uvicorn_compat.REFUSED if refused is None else refused
    params: list[click.Parameter] = [
        click.Argument(["app"], envvar=["CLUSTER_SERVER_APP", "UVICORN_APP"], metavar="APP"),
        *config_options(),
        click.Option(
            ["--version"],
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_print_version,
            help="Print the versions of cluster-server, uvicorn and Python, and exit.",
        ),
        *(refusing_option(flag, why) for flag, why in refused.items()),
    ]
    cmd = GroupedCommand(
        "cluster-server",
        callback=callback,
        params=params,
        help=(
            "Serve APP ('module:attribute', an ASGI or WSGI app) with a primary process and forked uvicorn workers."
            "\n\nControl a running server with `cluster-server ctl` (see `cluster-server ctl --help`)."
        ),
        context_settings={"max_content_width": 100, "help_option_names": ["-h", "--help"]},
    )
    return cmd


cli = build_command()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["ctl"]:  # `cluster-server ctl ...`: APP is never a bare "ctl" (it needs a ':')
        from cluster_server.cli.ctl import main as ctl_main

        ctl_main(args[1:])
        return
    cli.main(args=args, prog_name="cluster-server")
