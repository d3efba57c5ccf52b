"""Protection: token buckets, the bounded wait queue, the retry budget and the decode latency window.

Everything takes an injectable clock (seconds, monotonic) so it can be tested without sleeping.

- `TokenBucket`: `rate` units per second, `burst` capacity; rate 0 means unlimited. A request larger
  than the burst is admitted when the bucket is full and drives the balance negative (otherwise a long
  prompt could never pass a small burst); later requests wait until the debt is repaid.
- `WaitQueue`: where requests wait for a slot. Each waiter brings a `try_acquire()` closure that either
  reserves what it needs and returns it, or returns None. `notify()` (called whenever a slot frees, an
  endpoint changes or a timer fires) hands slots to waiters: priority waiters first, then in arrival
  order. A strict queue stops at the first waiter that cannot proceed (FIFO, no overtaking: used for the
  prefill pool, whose waiters all compete for the same things); a non-strict queue lets later waiters
  take slots an earlier one cannot use (used for the decode pool, where a held prefill may only use the
  decode replicas of its own ring). A `try_acquire()` may return `PASS` instead of None: "nothing I may
  use is free, but what is free may serve others" (a retried request that must avoid a replica); a
  strict queue then goes on to the next waiter instead of stopping. A waiter that waits longer than its
  timeout gets `QueueTimeout`; a waiter that leaves (timeout, cancellation) lets the ones behind it look
  again. `fail_all(make_exc)` ends every waiter with an error (shutdown).
- `RetryBudget`: retries are allowed while they stay within `ratio` of recent requests, plus a small
  reserve that refills over time so a quiet scheduler can still retry.
- `LatencyWindow`: recent decode TPOT samples; its p95 drives decode backpressure.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

Clock = Callable[[], float]
T = TypeVar("T")
_EPS = 1e-9  # float slack so that exactly-refilled buckets admit


class TokenBucket:
    def __init__(self, rate: float, burst: float = 0.0, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.rate = 0.0
        self.burst = 0.0
        self._tokens = 0.0
        self._stamp = clock()
        self.configure(rate, burst)

    def configure(self, rate: float, burst: float = 0.0) -> None:
        """Change rate/burst in place (config reload); the current balance is kept, capped at the new burst."""
        self._refill()
        first = self.rate == 0.0
        self.rate = float(rate)
        self.burst = float(burst) if burst > 0 else max(self.rate, 1.0)
        self._tokens = self.burst if first else min(self._tokens, self.burst)

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self) -> None:
        now = self.clock()
        if self.rate > 0:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def available(self) -> float:
        if self.unlimited:
            return math.inf
        self._refill()
        return self._tokens

    def can_take(self, amount: float) -> bool:
        if self.unlimited:
            return True
        self._refill()
        return self._tokens + _EPS >= min(amount, self.burst)

    def try_take(self, amount: float) -> bool:
        if self.unlimited:
            return True
        self._refill()
        if self._tokens + _EPS >= min(amount, self.burst):
            self._tokens -= amount
            return True
        return False

    def give_back(self, amount: float) -> None:
        """Return what a `try_take` took for work that then did not happen (capped at the burst)."""
        if self.unlimited:
            return
        self._refill()
        self._tokens = min(self.burst, self._tokens + amount)

    def time_until(self, amount: float) -> float:
        """Seconds until `try_take(amount)` would succeed (0 if it would now)."""
        if self.unlimited:
            return 0.0
        self._refill()
        need = min(amount, self.burst) - self._tokens
        return max(0.0, need / self.rate)


def _fail_waiters(queue: deque[_Waiter], make_exc: Callable[[], BaseException]) -> int:
    """Empty `queue`, ending each waiter not yet served with an exception from `make_exc()`; how many."""
    n = 0
    while queue:
        waiter = queue.popleft()
        if not waiter.future.done():
            waiter.future.set_exception(make_exc())
            n += 1
    return n


class QueueTimeout(Exception):
    """A waiter was not served within its timeout."""


class _Pass:
    __slots__ = ()

    def __repr__(self) -> str:
        return "PASS"


PASS: Any = _Pass()  # see the module doc: not served, but not blocking the waiters behind


class _Waiter:
    __slots__ = ("future", "try_acquire", "priority", "since", "timer")

    def __init__(self, future: asyncio.Future[Any], try_acquire: Callable[[], Any], priority: bool,
                 since: float) -> None:
        self.future = future
        self.try_acquire = try_acquire
        self.priority = priority
        self.since = since  # loop time it started waiting
        self.timer: asyncio.TimerHandle | None = None  # its QueueTimeout, when it has a limit


class WaitQueue(Generic[T]):
    def __init__(self, name: str, strict: bool) -> None:
        self.name = name
        self.strict = strict
        self._normal: deque[_Waiter] = deque()
        self._priority: deque[_Waiter] = deque()
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = math.inf
        self._closed: Callable[[], BaseException] | None = None  # set by `shut`: every acquire raises this

    def __len__(self) -> int:
        return len(self._normal) + len(self._priority)

    @property
    def waiting(self) -> int:
        """Ordinary waiters (excludes priority waiters, i.e. held prefills)."""
        return len(self._normal)

    @property
    def priority_waiting(self) -> int:
        return len(self._priority)

    async def acquire(
        self,
        try_acquire: Callable[[], T | None],
        release: Callable[[T], None],
        timeout: float | None,
        priority: bool = False,
    ) -> T:
        """Reserve a slot now or wait for one; raises QueueTimeout after `timeout` seconds (None: no limit of
        its own, the caller bounds the wait), and what `shut` was given once the queue is shut."""
        self.check_open()
        ahead = self._priority if priority else (self._priority or self._normal)
        queued_behind = self.strict and bool(ahead)
        if not queued_behind:
            self.serve_waiting_first(priority)
            value = try_acquire()
            if value is not None and value is not PASS:
                return value
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), try_acquire, priority, loop.time())
        (self._priority if priority else self._normal).append(waiter)
        if timeout is not None:
            waiter.timer = loop.call_later(timeout, self._expire, waiter)
        if queued_behind:
            self.notify()  # the waiters ahead may all be passing on what is free
        granted = False
        try:
            value = await waiter.future
            granted = True
            return value
        except asyncio.CancelledError:
            fut = waiter.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                release(fut.result())  # got a slot just as the caller went away: give it back
            raise
        finally:
            if waiter.timer is not None:
                waiter.timer.cancel()
            self._discard(waiter)
            if not granted and self.strict:
                self.notify()  # it may have been blocking the head of the queue

    def _discard(self, waiter: _Waiter) -> None:
        queue = self._priority if waiter.priority else self._normal
        try:
            queue.remove(waiter)
        except ValueError:
            pass

    def shorten_waits(self, timeout: float) -> int:
        """A lower limit for the waits under way (a reload lowered it): each waiter with a limit now ends at
        most `timeout` after it started waiting (at once if that is past). Returns how many were brought
        forward; a higher limit leaves the waits under way as they are."""
        loop = asyncio.get_running_loop()
        moved = 0
        for waiter in list(self._normal) + list(self._priority):
            timer = waiter.timer
            if timer is None or waiter.future.done():
                continue
            end = waiter.since + timeout
            if end < timer.when():
                timer.cancel()
                waiter.timer = loop.call_at(end, self._expire, waiter)
                moved += 1
        return moved

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._discard(waiter)
            waiter.future.set_exception(QueueTimeout(self.name))

    def serve_waiting_first(self, priority: bool = False) -> None:
        """Before a newcomer takes what is free: capacity can come free with no release to notify of it (the
        decode throttle lifting as slow samples age out, a token bucket refilling), and those ahead of the
        newcomer get it first, as on a release (a non-strict queue would otherwise let the newcomer overtake
        them until the next recheck): the priority waiters, and for an ordinary newcomer the ordinary ones."""
        if priority:
            self._serve(self._priority)
        elif self._priority or self._normal:
            self.notify()

    def notify(self) -> None:
        """Hand freed capacity to waiters (see the module doc for the order)."""
        if not self._serve(self._priority):
            self._serve(self._normal)

    def _serve(self, queue: deque[_Waiter]) -> bool:
        """Hand what is free to `queue`'s waiters in order; True when a strict queue stopped at one."""
        i = 0
        while i < len(queue):
            waiter = queue[i]
            if waiter.future.done():
                del queue[i]
                continue
            try:
                value = waiter.try_acquire()
            except Exception as exc:  # the waiter can never be served: fail it, not the notifier
                del queue[i]
                waiter.future.set_exception(exc)
                continue
            if value is None or value is PASS:
                if self.strict and value is None:
                    return True
                i += 1
                continue
            del queue[i]
            waiter.future.set_result(value)
        return False

    def shut(self, make_exc: Callable[[], BaseException]) -> int:
        """End every waiter with an exception from `make_exc()`, and every later `acquire` at once (the
        service is shutting down); returns how many were waiting."""
        self._closed = make_exc
        return self.fail_all(make_exc)

    def check_open(self) -> None:
        """Raise what `shut` was given, if the queue is shut."""
        if self._closed is not None:
            raise self._closed()

    def fail_normal(self, make_exc: Callable[[], BaseException]) -> int:
        """End every ordinary waiter (not the priority ones) with an exception from `make_exc()`."""
        return _fail_waiters(self._normal, make_exc)

    def fail_all(self, make_exc: Callable[[], BaseException]) -> int:
        """End every waiter with an exception from `make_exc()`; returns how many there were."""
        return _fail_waiters(self._priority, make_exc) + _fail_waiters(self._normal, make_exc)

    def wake_after(self, delay: float) -> None:
        """Run `notify()` again after `delay` seconds (e.g. when a token bucket refills)."""
        loop = asyncio.get_running_loop()
        at = loop.time() + max(delay, 0.001)
        if self._wake is not None and self._wake_at <= at:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = at
        self._wake = loop.call_at(at, self._on_wake)

    def _on_wake(self) -> None:
        self._wake = None
        self._wake_at = math.inf
        self.notify()

    def close(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None


class RetryBudget:
    """Allow retries up to `ratio` x recent requests, plus `reserve` retries refilled at `reserve_per_s`.
    Recent: each request's deposit decays with time constant `window_s`, so a burst of failures after a
    long calm finds only the recent traffic's share, not everything saved up since (capped at `cap`)."""

    def __init__(
        self,
        ratio: float,
        clock: Clock = time.monotonic,
        reserve: float = 3.0,
        reserve_per_s: float = 0.5,
        cap: float = 100.0,
        window_s: float = 10.0,
    ) -> None:
        self.ratio = ratio
        self.clock = clock
        self.reserve = reserve
        self.reserve_per_s = reserve_per_s
        self.cap = cap
        self.window_s = window_s
        self._deposits = 0.0  # from requests
        self._reserve = reserve  # time-refilled floor
        self._stamp = clock()

    def record_request(self) -> None:
        self._refill()
        self._deposits = min(self.cap, self._deposits + self.ratio)

    def _refill(self) -> None:
        now = self.clock()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._reserve = min(self.reserve, self._reserve + elapsed * self.reserve_per_s)
            self._deposits *= math.exp(-elapsed / self.window_s)
        self._stamp = now

    def try_spend(self) -> bool:
        self._refill()
        if self._deposits >= 1.0:
            self._deposits -= 1.0
            return True
        if self._reserve >= 1.0:
            self._reserve -= 1.0
            return True
        return False


class LatencyWindow:
    """Recent latency samples (seconds) within `window_s`, at most `max_samples`; p95 cached for `cache_s`."""

    def __init__(
        self, window_s: float = 30.0, max_samples: int = 512, clock: Clock = time.monotonic, cache_s: float = 0.25
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        self.cache_s = cache_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._cached: tuple[float, float] | None = None  # (computed_at, value)

    def record(self, value: float) -> None:
        self._samples.append((self.clock(), value))
        # A new sample shows in p95() within `cache_s` (p95 is read twice per request and sorts up to
        # `max_samples` values; recomputing it after every streamed request was the scheduler's biggest
        # CPU cost). Only the first sample after an empty window invalidates at once.
        if self._cached is not None and math.isnan(self._cached[1]):
            self._cached = None

    def p95(self) -> float | None:
        now = self.clock()
        if self._cached is not None and now - self._cached[0] < self.cache_s:
            return self._cached[1] if not math.isnan(self._cached[1]) else None
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        if not self._samples:
            self._cached = (now, math.nan)
            return None
        values = sorted(v for _, v in self._samples)
        value = values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]
        self._cached = (now, value)
        return value


def retry_after_seconds(queue_depth: int, completions_per_s: float, lo: int = 1, hi: int = 30) -> int:
    """Retry-After hint for a 429: time to drain the queue at the recent completion rate, clamped."""
    if completions_per_s <= 0:
        return min(hi, max(lo, 1 + queue_depth // 10))
    seconds = queue_depth / completions_per_s
    if not seconds < hi:  # also inf: a rate decayed to a denormal after hours without a completion
        return hi
    return int(max(lo, math.ceil(seconds)))
