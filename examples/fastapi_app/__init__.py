"""A small FastAPI app to run under cluster-server (see README.md)."""
