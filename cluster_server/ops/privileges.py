"""``--user`` / ``--group`` / ``--umask``: the primary keeps its privileges, workers drop them.

The primary binds the sockets (port 80 needs root or CAP_NET_BIND_SERVICE)
and keeps running as the user that started it, so it can bind again, signal
any worker and read every worker's /proc entry. Each worker, right after
fork and before it loads the app, sets its supplementary groups, its group and
its user (in that order: after setuid it could no longer change groups), then
checks that it cannot get root back.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from cluster_server._config import Config
from cluster_server._errors import ConfigError


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]
    user: str


def parse_umask(value: str | None) -> int | None:
    """``"022"`` / ``"0o022"`` -> 0o022."""
    if value is None or value == "":
        return None
    text = value.strip().lower().removeprefix("0o")
    try:
        mask = int(text, 8)
    except ValueError:
        raise ConfigError(f"--umask {value!r} is not an octal number (e.g. 022)") from None
    if not 0 <= mask <= 0o777:
        raise ConfigError(f"--umask {value!r} is out of range (000 to 777)")
    return mask


def resolve(user: str | None, group: str | None) -> Credentials | None:
    """The credentials workers switch to, or None to keep the primary's. Raises ConfigError."""
    if user is None and group is None:
        return None
    if user is not None:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            if not user.isdigit():
                raise ConfigError(f"--user {user}: no such user; check the name or give a uid") from None
            uid, gid, name = int(user), os.getgid(), user
        else:
            uid, gid, name = pw.pw_uid, pw.pw_gid, pw.pw_name
    else:
        uid, gid = os.geteuid(), os.getegid()
        name = _user_name(uid)
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"--group {group}: no such group; check the name or give a gid") from None
    try:
        groups = tuple(os.getgrouplist(name, gid)) if user is not None else (gid,)
    except (OSError, TypeError):
        groups = (gid,)
    if gid not in groups:
        groups = (gid, *groups)
    return Credentials(uid=uid, gid=gid, groups=groups, user=name)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check(config: Config) -> None:
    """Validate the options in the primary, before anything starts."""
    parse_umask(config.umask)
    creds = resolve(config.user, config.group)
    if creds is not None and os.geteuid() != 0 and (creds.uid, creds.gid) != (os.geteuid(), os.getegid()):
        raise ConfigError(
            f"--user/--group need root: this process runs as uid {os.geteuid()}; "
            "start cluster-server as root (it binds, then workers drop to --user) or drop the options"
        )


def apply_umask(config: Config) -> None:
    mask = parse_umask(config.umask)
    if mask is not None:
        os.umask(mask)


def drop(config: Config) -> None:
    """In a new worker: become ``--user``/``--group``. Raises ConfigError if that fails."""
    creds = resolve(config.user, config.group)
    if creds is None:
        return
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (creds.uid,) * 2 + (creds.gid,) * 2:
        return
    try:
        os.setgroups(list(creds.groups))
        os.setgid(creds.gid)
        os.setuid(creds.uid)
    except OSError as exc:
        who = f"user {creds.user} (uid {creds.uid}, gid {creds.gid})"
        raise ConfigError(f"worker cannot switch to {who}: {exc}") from None
    if creds.uid != 0:
        try:
            os.setuid(0)
        except OSError:
            pass
        else:
            raise ConfigError(f"worker could get root back after switching to {creds.user}; refusing to run")
