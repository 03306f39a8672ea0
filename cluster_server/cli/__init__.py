"""The command line: ``cluster-server`` (main.py), ``cluster-server ctl`` (ctl.py), the CLI reference (docs.py)."""
