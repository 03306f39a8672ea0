"""What operators use, run by the primary: status, control socket, metrics, systemd, upgrade, pid file, privileges."""
