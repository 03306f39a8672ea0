"""examples/deploy/: the manifests parse, and what they say agrees with the flags they pass.

Every command line in them goes through the real CLI (click parses it, Config
validates it), so a renamed or mistyped flag fails here, not in production.
Docker and Kubernetes do not run here; the systemd unit pair is run for real
under ``systemd-socket-activate`` (same LISTEN_FDS protocol as systemd) when
that tool is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from cluster_server._config import Config
from cluster_server._errors import AppLoadError, ConfigError
from cluster_server.cli.main import cli
from cluster_server.ops.metrics import parse_bind
from tests.conftest import ROOT, Server, free_port, wait_until

DEPLOY = ROOT / "examples" / "deploy"


def parse_flags(args: list[str], env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Config:
    """What cluster-server would run with, given these arguments and environment."""
    for name in list(os.environ):
        if name.startswith("CLUSTER_SERVER_") or name == "WEB_CONCURRENCY":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ctx = cli.make_context("cluster-server", list(args))
    params = dict(ctx.params)
    return Config(app=params.pop("app"), **params)


# -- Dockerfile ---------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[tuple[str, str]] = []
    current = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = current.partition(" ")
            lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def instruction(lines: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for word, rest in lines if word == name]


def docker_env(lines: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in instruction(lines, "ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def image_config(monkeypatch: pytest.MonkeyPatch) -> tuple[Config, dict[str, str], list[tuple[str, str]]]:
    lines = dockerfile()
    env = docker_env(lines)
    (entrypoint,) = instruction(lines, "ENTRYPOINT")
    (cmd,) = instruction(lines, "CMD")
    assert json.loads(entrypoint) == ["cluster-server"], "exec form, so cluster-server is PID 1 and gets SIGTERM"
    return parse_flags(json.loads(cmd), {"WEB_CONCURRENCY": env["WEB_CONCURRENCY"]}, monkeypatch), env, lines


def _search(pattern: str, text: str, group: int = 0) -> str:
    match = re.search(pattern, text)
    assert match is not None, f"{pattern!r} not found"
    return match.group(group)


def test_dockerfile_agrees_with_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    config, env, lines = image_config(monkeypatch)
    (base,) = instruction(lines, "FROM")
    assert re.fullmatch(r"python:3\.1[1-9]-slim", base), base
    assert config.workers == int(env["WEB_CONCURRENCY"]) == 2  # the env var is what sets the workers
    assert config.host == "0.0.0.0", "in a container the server must listen beyond loopback"
    assert instruction(lines, "EXPOSE") == [str(config.port)]
    assert config.health_path is not None and config.shutdown_delay > 0

    # The HEALTHCHECK fetches the health path on the server's port.
    (check,) = instruction(lines, "HEALTHCHECK")
    url = urlsplit(_search(r"http://[^'\" ]+", check))
    assert (url.port, url.path) == (config.port, config.health_path)

    # Not root; the uid is the one the Kubernetes manifest checks for.
    (user,) = instruction(lines, "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert "--uid 10001" in instruction(lines, "RUN")[0]
    assert instruction(lines, "STOPSIGNAL") == ["SIGTERM"]

    # `docker stop` must wait out the delay and the drain (its default is 10 s).
    stop_timeout = int(_search(r"--stop-timeout (\d+)", (DEPLOY / "Dockerfile").read_text(), 1))
    assert stop_timeout > config.shutdown_delay + config.graceful_timeout


def test_dockerfile_copies_what_exists_and_the_app_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    config, _, lines = image_config(monkeypatch)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for rest in instruction(lines, "COPY"):
        *sources, _dest = rest.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert f"!{src.rstrip('/')}" in {p.rstrip("/") for p in ignore}, f"{src} is excluded from the build context"
    from cluster_server.worker.main import import_app

    assert callable(import_app(str(config.app), str(ROOT)))


# -- Kubernetes -----------------------------------------------------------------------


def kube() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_kubernetes_manifest_agrees_with_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = kube()
    assert set(docs) == {"Deployment", "Service"}
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]

    # WEB_CONCURRENCY comes from the CPU limit; parse the args as the image would run them.
    (web,) = [e for e in container["env"] if e["name"] == "WEB_CONCURRENCY"]
    assert web["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
    cpus = str(container["resources"]["limits"]["cpu"])
    config = parse_flags(container["args"], {"WEB_CONCURRENCY": cpus}, monkeypatch)
    assert config.workers == int(cpus)
    assert config.host == "0.0.0.0"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.port, "containerPort == --port"
    # Prometheus scrapes the primary's --metrics-bind port, named by the annotations
    # and by observability/podmonitor.yaml; not node_exporter's 9100.
    assert config.metrics_bind is not None
    host, metrics_port = parse_bind(config.metrics_bind)
    assert host == "0.0.0.0" and ports["metrics"] == metrics_port != 9100
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port and annotations["prometheus.io/path"] == "/metrics"
    monitor = yaml.safe_load((DEPLOY / "observability" / "podmonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]

    def port_of(ref: str | int) -> int:
        return ports[ref] if isinstance(ref, str) else ref

    probes = {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert probe["httpGet"]["path"] == config.health_path, f"{kind} path == --health-path"
        assert port_of(probe["httpGet"]["port"]) == config.port, f"{kind} port == --port"

    # The shutdown delay is only useful if the readiness probe notices the 503 within it.
    ready = probes["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] < config.shutdown_delay
    # The startup probe waits at least as long as a worker may take to boot.
    start = probes["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= config.ready_timeout
    # The kubelet's SIGKILL comes after the delay and the drain, not during them.
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.shutdown_delay + config.graceful_timeout

    # The image's user, never root; a new pod ready before an old one goes.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # The same app and health path as the image's own CMD.
    image, _, _ = image_config(monkeypatch)
    assert (config.app, config.port, config.health_path) == (image.app, image.port, image.health_path)

    # Labels line up: Deployment selector, pod labels, Service selector, target port.
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (svc_port,) = service["spec"]["ports"]
    assert port_of(svc_port["targetPort"]) == config.port


# -- systemd --------------------------------------------------------------------------


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file: section -> [(key, value)] (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in (DEPLOY / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{name}: {line!r} is not KEY=VALUE"
        current.append((key.strip(), value.strip()))
    return sections


def one(section: list[tuple[str, str]], key: str) -> str:
    (value,) = [v for k, v in section if k == key]
    return value


def service_config(monkeypatch: pytest.MonkeyPatch) -> tuple[Config, list[str], dict[str, str]]:
    service = unit("cluster-server.service")["Service"]
    argv = shlex.split(one(service, "ExecStart"))
    assert Path(argv[0]).name == "cluster-server"
    env = dict(item.split("=", 1) for k, v in service if k == "Environment" for item in shlex.split(v))
    return parse_flags(argv[1:], env, monkeypatch), argv[1:], env


def test_systemd_units_agree_with_their_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    config, _, env = service_config(monkeypatch)
    socket_unit = unit("cluster-server.socket")
    service_unit = unit("cluster-server.service")
    service = service_unit["Service"]

    # One listening socket, passed as the first fd (3): --fd 3.
    listen = [v for k, v in socket_unit["Socket"] if k == "ListenStream"]
    assert len(listen) == 1 and config.fd == 3
    assert int(listen[0].rsplit(":", 1)[1]) > 0
    assert int(one(socket_unit["Socket"], "Backlog")) == config.backlog
    assert "cluster-server.socket" in one(service_unit["Unit"], "Requires")
    assert config.workers == int(env["WEB_CONCURRENCY"])

    # Stopping: SIGTERM to the primary alone, SIGKILL only after the delay and the drain.
    assert one(service, "KillMode") == "mixed"
    assert one(service, "KillSignal") == "SIGTERM"
    assert int(one(service, "TimeoutStopSec")) > config.shutdown_delay + config.graceful_timeout
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"  # rolling restart
    no_restart = {int(code) for code in one(service, "RestartPreventExitStatus").split()}
    assert no_restart == {ConfigError.exit_code, AppLoadError.exit_code}


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
def test_systemd_unit_serves_on_the_activated_socket(
    start_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The unit's own arguments, on the socket unit's protocol (LISTEN_FDS, fd 3);
    # only the address changes, to a free loopback port.
    _, args, env = service_config(monkeypatch)
    monkeypatch.undo()
    port = free_port()
    wrapper = ["systemd-socket-activate", "--listen", f"127.0.0.1:{port}"]
    server = start_server(*args, env={**env, "WEB_CONCURRENCY": "2"}, cwd=ROOT, wrapper=wrapper)
    server.port = port
    # systemd-socket-activate execs cluster-server at the first connection; that
    # connection waits in the backlog until a worker is ready, then gets its answer.
    assert httpx.get(server.url + "/pid", timeout=30).status_code == 200
    server.wait_ready()
    wait_until(lambda: server.get("/healthz").text == "ok\n", 5, what="the health path to say ok")
    assert "serving fd 3" in server.log()
    # Two SIGTERMs: the second skips the unit's 5 s shutdown delay and drains at once.
    server.signal(signal.SIGTERM)
    server.wait_log("serving on for")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
