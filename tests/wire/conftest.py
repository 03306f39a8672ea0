"""Fixtures of the wire tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster_server.wire.channel import Channel, pair


@pytest.fixture
def ends() -> Iterator[tuple[Channel, Channel]]:
    """Both ends of a real channel (a SEQPACKET socket pair), closed at the end."""
    a, b = pair()
    ca, cb = Channel(a), Channel(b)
    yield ca, cb
    ca.close()
    cb.close()
