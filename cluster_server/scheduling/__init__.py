"""Connection scheduling: the protocol (protocol.py), the primary's side (primary.py), the worker's side (worker.py)."""
