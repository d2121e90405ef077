"""Write-behind persistence: full KV blocks are queued and written to the store in the background.

The decode loop must never wait on storage, so ``submit`` never blocks: it returns a future that
resolves when the block is durable, or ``None`` when the bounded queue is full (the block is then
not persisted and counted as dropped: a later turn will miss it and recompute, never read wrong
KV). ``flush`` drains the queue (clean shutdown).
"""

from __future__ import annotations

import asyncio
import logging

from dualpath.storage.store import AsyncStore

log = logging.getLogger(__name__)


class Persister:
    def __init__(self, store: AsyncStore, max_queued: int = 1024, writers: int = 4):
        self.store = store
        self._queue: asyncio.Queue = asyncio.Queue(max_queued)
        self._tasks = [asyncio.create_task(self._writer()) for _ in range(writers)]
        self.written = self.dropped = self.failed = 0

    def submit(self, key: bytes, layers: list) -> asyncio.Future | None:
        if self.store.contains(key):  # already durable (e.g. persisted by an earlier turn)
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(True)
            return fut
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((key, layers, fut))
        except asyncio.QueueFull:
            self.dropped += 1
            return None
        return fut

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def _writer(self) -> None:
        while True:
            key, layers, fut = await self._queue.get()
            try:
                await self.store.write(key, layers)
                self.written += 1
                if not fut.done():
                    fut.set_result(True)
            except Exception as e:  # a full disk must not take the engine down
                self.failed += 1
                log.warning("persisting block %s failed: %s", key.hex()[:12], e)
                if not fut.done():
                    fut.set_result(False)
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        await self._queue.join()

    async def close(self) -> None:
        await self.flush()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
