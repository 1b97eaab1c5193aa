"""Bidirectional streams whose items run concurrently, answered in completion order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def concurrent_responses(
    requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Resp]], max_inflight: int
) -> AsyncIterator[Resp]:
    """Run ``handle`` on each request as it arrives, at most ``max_inflight`` at once.

    Responses are yielded as they complete, so a slow item never holds back later ones;
    clients match them by the correlation id they sent. A failure reading the request
    stream surfaces after the responses already produced.
    """
    done: asyncio.Queue[Resp | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max_inflight)

    async def run(request: Req) -> None:
        try:
            await done.put(await handle(request))
        finally:
            slots.release()

    async def read() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                async for request in requests:
                    await slots.acquire()
                    group.create_task(run(request))
        finally:
            await done.put(None)

    reader = asyncio.create_task(read())
    try:
        while (response := await done.get()) is not None:
            yield response
        await reader
    finally:
        reader.cancel()
