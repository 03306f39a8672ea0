"""TLS: check the certificate options once, in the primary, before any fork.

Each worker builds its own ``ssl.SSLContext`` (uvicorn's ``Config.load``), after
the fork. A key that does not match its certificate, a wrong password or a
cipher string OpenSSL rejects would otherwise crash every worker in a loop;
building the context here first turns that into one ``Error: ...`` at start-up.
It takes the steps of uvicorn 0.54's ``create_ssl_context`` (``uvicorn/config.py``)
itself: importing uvicorn would load it, and asyncio, into the primary.

Under ``--scheduling shared`` the workers' listening sockets do the TLS
handshake; when the primary hands accepted connections to workers, each worker
wraps them with the same context (``loop.connect_accepted_socket(..., ssl=)``).
The primary itself never reads or writes TLS.
"""

from __future__ import annotations

import ssl

from cluster_server._config import Config
from cluster_server._errors import ConfigError


def check_tls(config: Config) -> ssl.SSLContext | None:
    """Build the context the workers will build; raise ConfigError if it cannot be."""
    if config.ssl_certfile is None:
        return None
    password = config.ssl_keyfile_password
    try:
        ctx = ssl.SSLContext(config.ssl_version)
        ctx.load_cert_chain(config.ssl_certfile, config.ssl_keyfile, (lambda: password) if password else None)
        ctx.verify_mode = ssl.VerifyMode(config.ssl_cert_reqs)
        if config.ssl_ca_certs:
            ctx.load_verify_locations(config.ssl_ca_certs)
        if config.ssl_ciphers:
            ctx.set_ciphers(config.ssl_ciphers)
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
    except ValueError:  # SSLContext(N) with a number that is no ssl.PROTOCOL_*
        raise ConfigError(f"--ssl-version {config.ssl_version} is not one of Python's ssl.PROTOCOL_* numbers") from None
    return ctx
