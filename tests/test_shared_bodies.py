"""The queue manager reads a message's bytes once for all of its jobs in memory."""

from __future__ import annotations

import asyncio

from mta.queue.manager import _SharedBodies


async def test_one_read_serves_every_job_of_a_message():
    reads: list[str] = []

    async def load(message_id: str) -> bytes:
        reads.append(message_id)
        await asyncio.sleep(0.01)
        return b"body of " + message_id.encode()

    bodies = _SharedBodies(load)
    for _ in range(3):  # one message to three domains: three jobs
        bodies.hold("M1")
    got = await asyncio.gather(*(bodies.get("M1") for _ in range(3)))
    assert got == [b"body of M1"] * 3 and reads == ["M1"]
    for _ in range(3):
        bodies.release("M1")
    # Once no job holds it, nothing is kept: a later job reads again.
    bodies.hold("M1")
    assert await bodies.get("M1") == b"body of M1" and reads == ["M1", "M1"]
    bodies.release("M1")
    assert bodies._reads == {} and not bodies._users
