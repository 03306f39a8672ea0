"""cluster-server: Node.js's cluster module for Python web apps.

One primary binds the listening socket once and forks workers; each worker runs
uvicorn's HTTP protocol loop on it. The primary supervises: it replaces crashed
or hung workers and rolls new code in without dropping a request.
"""

from cluster_server._config import Config
from cluster_server._errors import (
    AppLoadError,
    BindError,
    ChannelError,
    ClusterServerError,
    ConfigError,
    ControlError,
    IllegalTransition,
    WorkerBootError,
)
from cluster_server._run import run, serve
from cluster_server._version import __version__

__all__ = [
    "AppLoadError",
    "BindError",
    "ChannelError",
    "ClusterServerError",
    "Config",
    "ConfigError",
    "ControlError",
    "IllegalTransition",
    "WorkerBootError",
    "__version__",
    "run",
    "serve",
]
