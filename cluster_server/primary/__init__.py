"""The primary process: its loop and worker table, slots and rolls, sockets, recycling. See docs/architecture.md."""
