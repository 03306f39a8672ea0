"""TLS: check the certificate options once, in the primary, before any fork.

Each worker builds its own ``ssl.SSLContext`` (uvicorn's ``Config.load``), after
the fork. A key that does not match its certificate, a wrong password or a
cipher string OpenSSL rejects would otherwise crash every worker in a loop;
building the context here first turns that into one ``Error: ...`` at start-up.

Under ``--scheduling shared`` the workers' listening sockets do the TLS
handshake; when the primary hands accepted connections to workers, each worker
wraps them with the same context (``loop.connect_accepted_socket(..., ssl=)``).
The primary itself never reads or writes TLS.
"""

from __future__ import annotations

import ssl

from uvicorn.config import create_ssl_context

from cluster_server._config import Config
from cluster_server._errors import ConfigError


def check_tls(config: Config) -> ssl.SSLContext | None:
    """Build the context the workers will build; raise ConfigError if it cannot be."""
    if config.ssl_certfile is None:
        return None
    try:
        return create_ssl_context(
            certfile=config.ssl_certfile,
            keyfile=config.ssl_keyfile,
            password=config.ssl_keyfile_password,
            ssl_version=config.ssl_version,
            cert_reqs=config.ssl_cert_reqs,
            ca_certs=config.ssl_ca_certs,
            ciphers=config.ssl_ciphers,
        )
    except ssl.SSLError as exc:
        what = getattr(exc, "reason", None) or (exc.args[-1] if exc.args else exc)
        if "cipher" in str(exc).lower():
            raise ConfigError(f"--ssl-ciphers {config.ssl_ciphers!r}: OpenSSL accepts none of them ({what})") from None
        raise ConfigError(
            f"cannot load the TLS key/certificate ({what}); check that --ssl-keyfile matches --ssl-certfile, "
            "that both are PEM, and the --ssl-keyfile-password"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read a TLS file: {exc.strerror or exc} ({exc.filename or '?'})") from None
