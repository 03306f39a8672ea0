"""One error hierarchy. Each message names the thing and the fix.

Like h11's Local/RemoteProtocolError, the type says whose fault it was:
``ConfigError`` and ``AppLoadError`` are the user's to fix, ``BindError`` is the
machine's state, ``WorkerBootError`` is the app failing at start-up.
"""

from __future__ import annotations


class ClusterServerError(Exception):
    """Base class of every error cluster-server raises on purpose."""

    #: exit status the CLI uses for this error
    exit_code = 1


class ConfigError(ClusterServerError):
    """An option has a value that cannot work (the user's to fix)."""

    exit_code = 2


class AppStringError(ConfigError):
    """APP is not a 'module:attribute' import string; exit status 3, as uvicorn's."""

    exit_code = 3


class BindError(ClusterServerError):
    """A listening socket could not be created (port taken, no permission...); exit status 3, as uvicorn's."""

    exit_code = 3


class AppLoadError(ClusterServerError):
    """The application could not be imported or built (missing module, syntax error...)."""

    exit_code = 3


class WorkerBootError(ClusterServerError):
    """A worker failed to become ready (lifespan startup failed, timed out...)."""

    exit_code = 3


class IllegalTransition(ClusterServerError):
    """A worker state change that the state table forbids (a bug in cluster-server)."""


class ChannelError(ClusterServerError):
    """A message on a worker channel could not be decoded (logged and dropped)."""


class RequestError(ClusterServerError):
    """A request got an error for an answer: the other side's handler raised, or it has none."""


class DisconnectedError(ClusterServerError):
    """The channel between primary and worker is closed: the worker exited or disconnected,
    or the primary is gone. Nothing more can be sent on it."""


class ClusterRoleError(ClusterServerError):
    """A primary-only function was called in a worker, or a worker-only one in the primary."""


class ControlError(ClusterServerError):
    """``cluster-server ctl`` could not talk to a server, or the server refused the command."""
