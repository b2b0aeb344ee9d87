"""Jittered exponential backoff, the one retry rhythm of usagepipe's loops.

The MQTT client's reconnect, the bridge's Kafka sends and the consumer's store,
registry and dead-letter retries all wait the same way after a retriable failure:
0.1 s, doubling up to 5 s, each wait drawn from 50-150 % of the nominal delay so that
many clients failing together (a fleet losing its broker) do not retry in step.

    backoff = Backoff()
    while True:
        try:
            return await attempt()
        except BrokerUnavailable as exc:
            log.warning("... (%s); retrying in %.1fs", exc, backoff.delay_s)
            await backoff.wait()

`uniform` and `sleep` are injectable so that tests see the exact waits.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

_T = TypeVar("_T")


class Backoff:
    """One retry loop's waits: `wait()` sleeps the current delay, jittered, and grows it.

    `delay_s` is the nominal delay of the next wait (what a log line should show);
    each wait sleeps `delay_s * uniform(1 - jitter, 1 + jitter)`, then `delay_s`
    becomes `min(delay_s * multiplier, max_s)`.
    """

    def __init__(
        self,
        *,
        initial_s: float = 0.1,
        max_s: float = 5.0,
        multiplier: float = 2.0,
        jitter: float = 0.5,
        uniform: Callable[[float, float], float] = random.uniform,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, not {jitter}")
        self.delay_s = initial_s
        self._max_s = max_s
        self._multiplier = multiplier
        self._jitter = jitter
        self._uniform = uniform
        self._sleep = sleep

    async def wait(self) -> None:
        """Sleep the current delay with jitter, then lengthen the next one."""
        await self._sleep(self.delay_s * self._uniform(1 - self._jitter, 1 + self._jitter))
        self.delay_s = min(self.delay_s * self._multiplier, self._max_s)

    async def wait_unless(self, event: asyncio.Event) -> bool:
        """`wait()`, cut short if `event` is set meanwhile; whether it was."""
        waiting = asyncio.ensure_future(self.wait())
        setting = asyncio.ensure_future(event.wait())
        await asyncio.wait([waiting, setting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        setting.cancel()
        return event.is_set()


async def wait_to_start(
    start: Callable[[], Awaitable[_T]],
    *,
    who: str,
    log: logging.Logger,
    retry_on: tuple[type[BaseException], ...],
    wait_s: int,
    started: Callable[[], bool] = lambda: False,
    stopping: asyncio.Event | None = None,
    on_retry: Callable[[], object] = lambda: None,
) -> _T | None:
    """`start()`, tried again with backoff while it raises one of `retry_on` (a server not
    up yet), each try logged on `log` as `who` and counted by `on_retry`, for `wait_s`
    seconds (0: for ever); then the error is raised. An error once `started()` is true is
    raised at once: the service's own loops retry from then on. None when `stopping` was
    set during a wait."""
    backoff = Backoff()
    give_up = time.monotonic() + wait_s if wait_s else None
    while True:
        try:
            return await start()
        except retry_on as exc:
            if started() or (stopping is not None and stopping.is_set()):
                raise
            if give_up is not None and time.monotonic() + backoff.delay_s > give_up:
                log.warning("%s gave up waiting for its servers after %ds", who, wait_s)
                raise
            on_retry()
            log.warning("%s cannot start yet (%s); retrying in %.1fs", who, exc, backoff.delay_s)
            if stopping is None:
                await backoff.wait()
            elif await backoff.wait_unless(stopping):
                return None
