"""Messages over 64 KiB (up to 256 MiB): in a memfd, in their place among the others (``wire/channel.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_cluster_api import run_program

LARGE = """
MIB = 1024 * 1024
if cluster.is_primary:
    if sys.argv[1:] == ["advanced"]:
        cluster.setup_primary(serialization="advanced", args=["advanced"])
    async def main():
        w = cluster.fork()
        echoed = asyncio.Queue()
        w.on("message", echoed.put_nowait)
        assert await asyncio.wait_for(echoed.get(), 20) == "ready"  # its callback is in place
        big = make(64)
        t0 = time.monotonic()
        for data in [0, big, 1, "x" * 70_000, 2]:
            w.send(data)
        back = [await asyncio.wait_for(echoed.get(), 60) for _ in range(5)]
        out("order", [b if isinstance(b, int) else len(b) for b in back], back[1] == big)
        answer = await w.request({"size": 64 if sys.argv[1:] == ["advanced"] else 1}, timeout=60)
        out("answer", len(answer), answer == make(64 if sys.argv[1:] == ["advanced"] else 1), time.monotonic() - t0)
        w.disconnect()

    def make(mib):
        if sys.argv[1:] == ["advanced"]:
            return bytes(range(256)) * (mib * MIB // 256 // 8)  # 8 MiB of bytes: 11 MiB of base64
        return "x" * (mib * MIB)
    cluster.run(main)
else:
    def make(mib):
        if sys.argv[1:] == ["advanced"]:
            return bytes(range(256)) * (mib * MIB // 256 // 8)
        return "x" * (mib * MIB)
    cluster.on_message(cluster.send)  # echo everything, in order
    cluster.on_request(lambda q: make(q["size"]))
    cluster.send("ready")
    cluster.wait_disconnect(60)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["json", "advanced"])
def test_large_messages_both_ways_in_order(tmp_path: Path, mode: str) -> None:
    done = run_program(tmp_path, LARGE, mode, timeout=90)
    assert done.rc == 0, done
    size = 8 * 1024 * 1024 if mode == "advanced" else 64 * 1024 * 1024
    assert done.one("order") == ["order", [0, size, 1, 70_000, 2], True]
    answer = done.one("answer")  # (1 MiB in JSON: the 64 MiB went both ways above)
    assert answer[1:3] == [size if mode == "advanced" else 1024 * 1024, True]
