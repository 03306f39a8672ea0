"""Template processes (--preload, --reload): the template itself, its launcher in the primary, the reload watcher."""
