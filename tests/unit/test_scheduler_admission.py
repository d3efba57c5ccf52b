"""Admission: token buckets, the wait queue, the retry budget and the latency window (fake clocks)."""

from __future__ import annotations

import asyncio

import pytest

from baton.scheduler.admission import (
    LatencyWindow,
    QueueTimeout,
    RetryBudget,
    TokenBucket,
    WaitQueue,
    retry_after_seconds,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unlimited_bucket_always_admits():
    b = TokenBucket(0)
    assert b.unlimited and b.try_take(10**9) and b.time_until(10**9) == 0


def test_bucket_refills_at_rate_up_to_burst():
    clock = Clock()
    b = TokenBucket(rate=100, burst=50, clock=clock)
    assert b.try_take(50)
    assert not b.try_take(1)
    assert b.time_until(10) == pytest.approx(0.1)
    clock.now += 0.1
    assert b.try_take(10)
    clock.now += 100
    assert b.available() == 50  # capped at burst


def test_request_larger_than_burst_passes_when_full_and_leaves_debt():
    clock = Clock()
    b = TokenBucket(rate=1000, burst=100, clock=clock)
    assert b.try_take(5000)  # larger than the burst: admitted on a full bucket
    assert b.available() == -4900
    assert not b.try_take(1)
    assert b.time_until(1) == pytest.approx(4.901)


def test_burst_defaults_to_one_second_of_rate_and_reconfigure_keeps_balance():
    clock = Clock()
    b = TokenBucket(rate=10, clock=clock)
    assert b.burst == 10
    b.try_take(8)
    b.configure(rate=20, burst=5)
    assert b.available() == 2


def run(coro):
    return asyncio.run(coro)


def test_strict_queue_is_fifo_and_hands_slots_in_order():
    async def main():
        q: WaitQueue[int] = WaitQueue("p", strict=True)
        slots = [0]
        order = []

        def take():
            if slots[0] > 0:
                slots[0] -= 1
                return 1
            return None

        async def waiter(name):
            await q.acquire(take, lambda v: None, timeout=5)
            order.append(name)

        tasks = [asyncio.create_task(waiter(n)) for n in "abc"]
        await asyncio.sleep(0)
        assert len(q) == 3
        slots[0] = 2
        q.notify()
        await asyncio.sleep(0)
        assert order == ["a", "b"]
        # a newcomer does not overtake the waiting "c" even if a slot frees first
        slots[0] = 1
        late = asyncio.create_task(waiter("late"))
        await asyncio.sleep(0)
        q.notify()
        await asyncio.sleep(0)
        assert order == ["a", "b", "c"]
        slots[0] = 1
        q.notify()
        await asyncio.gather(*tasks, late)
        assert order == ["a", "b", "c", "late"]

    run(main())


def test_non_strict_queue_lets_others_use_slots_and_priority_goes_first():
    async def main():
        q: WaitQueue[str] = WaitQueue("d", strict=False)
        free = {"x": 0, "y": 0}
        got = []

        def want(name):
            def take():
                if free[name] > 0:
                    free[name] -= 1
                    return name
                return None
            return take

        async def waiter(tag, name, priority=False):
            got.append((tag, await q.acquire(want(name), lambda v: None, 5, priority=priority)))

        t1 = asyncio.create_task(waiter("first-needs-x", "x"))
        t2 = asyncio.create_task(waiter("second-needs-y", "y"))
        await asyncio.sleep(0)
        free["y"] = 1
        q.notify()
        await asyncio.sleep(0)
        assert got == [("second-needs-y", "y")]  # not blocked behind the waiter that needs x
        t3 = asyncio.create_task(waiter("held", "x", priority=True))
        await asyncio.sleep(0)
        free["x"] = 1
        q.notify()
        await asyncio.sleep(0)
        assert got[-1] == ("held", "x")  # the priority waiter gets x first
        free["x"] = 1
        q.notify()
        await asyncio.gather(t1, t2, t3)

    run(main())


def test_what_frees_with_no_notify_goes_to_those_waiting_ahead_of_a_newcomer():
    """Capacity that comes free with no release (so no notify): an ordinary newcomer takes it only after the
    waiters, a priority newcomer (a held prefill) after the priority waiters but before the ordinary ones."""
    async def main():
        q: WaitQueue[str] = WaitQueue("d", strict=False)
        free = {"x": 0}
        got = []

        def take():
            if free["x"] > 0:
                free["x"] -= 1
                return "x"
            return None

        async def waiter(tag, priority=False):
            await q.acquire(take, lambda v: None, 5, priority=priority)
            got.append(tag)

        tasks = [asyncio.create_task(waiter("waiting"))]
        await asyncio.sleep(0)
        free["x"] = 1  # silently
        tasks.append(asyncio.create_task(waiter("newcomer")))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert got == ["waiting"]
        free["x"] = 1  # silently: the ordinary newcomer now waiting is passed over by a held prefill
        tasks.append(asyncio.create_task(waiter("held", priority=True)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert got == ["waiting", "held"]
        free["x"] = 1
        q.notify()
        await asyncio.gather(*tasks)
        assert got == ["waiting", "held", "newcomer"]

    run(main())


def test_queue_timeout_and_cancellation_release():
    async def main():
        q: WaitQueue[int] = WaitQueue("p", strict=True)
        with pytest.raises(QueueTimeout):
            await q.acquire(lambda: None, lambda v: None, timeout=0.01)
        assert len(q) == 0
        released = []
        task = asyncio.create_task(q.acquire(lambda: 7, released.append, timeout=5))
        await asyncio.sleep(0)  # acquired immediately
        assert await task == 7
        # a waiter served and cancelled in the same turn gives the slot back
        slot = [None]
        task = asyncio.create_task(q.acquire(lambda: slot[0], released.append, timeout=5))
        await asyncio.sleep(0)
        slot[0] = 9
        q.notify()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert released == [9]
        assert len(q) == 0

    run(main())


def test_wake_after_renotifies():
    async def main():
        q: WaitQueue[int] = WaitQueue("p", strict=True)
        ready = [False]
        task = asyncio.create_task(q.acquire(lambda: 1 if ready[0] else None, lambda v: None, 5))
        await asyncio.sleep(0)
        ready[0] = True
        q.wake_after(0.01)
        assert await asyncio.wait_for(task, 1) == 1

    run(main())


def test_retry_budget_ratio_and_reserve():
    clock = Clock()
    budget = RetryBudget(0.1, clock, reserve=2, reserve_per_s=1)
    assert budget.try_spend() and budget.try_spend()  # the reserve
    assert not budget.try_spend()
    for _ in range(20):
        budget.record_request()  # 20 x 0.1 = 2 retries
    assert budget.try_spend() and budget.try_spend()
    assert not budget.try_spend()
    clock.now += 1
    assert budget.try_spend()  # reserve refilled one
    assert not budget.try_spend()


def test_latency_window_p95_and_expiry():
    clock = Clock()
    w = LatencyWindow(window_s=10, clock=clock, cache_s=0)
    assert w.p95() is None
    for v in range(1, 101):
        w.record(v / 1000)
    assert w.p95() == pytest.approx(0.095)
    clock.now += 11
    assert w.p95() is None


def test_retry_after_is_clamped():
    assert retry_after_seconds(0, 0) == 1
    assert retry_after_seconds(100, 10) == 10
    assert retry_after_seconds(10_000, 1) == 30
    # a completion rate decayed to a denormal (two hours without a completion): depth / rate is inf
    assert retry_after_seconds(256, 1e-310) == 30
    assert retry_after_seconds(1, 5e-324) == 30


def test_a_waiter_that_can_never_be_served_fails_without_breaking_notify():
    import asyncio

    from baton.scheduler.admission import WaitQueue

    class Gone(Exception):
        pass

    async def scenario():
        queue = WaitQueue("decode", strict=False)
        state = {"mode": "wait"}

        def doomed():
            if state["mode"] == "gone":
                raise Gone()
            return None

        waiter = asyncio.ensure_future(queue.acquire(doomed, lambda _: None, 5.0, priority=True))
        other = asyncio.ensure_future(queue.acquire(lambda: state.get("slot"), lambda _: None, 5.0))
        await asyncio.sleep(0)
        state.update(mode="gone", slot="ok")
        queue.notify()  # must not raise
        assert await other == "ok"
        try:
            await waiter
        except Gone:
            return True
        return False

    assert asyncio.run(scenario())


def test_a_strict_queue_goes_past_a_waiter_that_passes_and_looks_again_when_the_head_leaves():
    from baton.scheduler.admission import PASS

    async def scenario():
        q: WaitQueue[str] = WaitQueue("prefill", strict=True)
        free = {"slot": True}

        def take_any():
            if free["slot"]:
                free["slot"] = False
                return "slot"
            return None

        head = asyncio.create_task(q.acquire(lambda: PASS, lambda v: None, 5))  # must avoid what is free
        await asyncio.sleep(0)
        assert await asyncio.wait_for(q.acquire(take_any, lambda v: None, 5), 1) == "slot"  # not blocked by it
        blocker = asyncio.create_task(q.acquire(lambda: None, lambda v: None, 0.05))  # blocks the queue
        await asyncio.sleep(0)
        behind = asyncio.create_task(q.acquire(take_any, lambda v: None, 5))
        await asyncio.sleep(0)
        free["slot"] = True
        q.notify()
        assert not behind.done()  # strict: the blocker is first
        with pytest.raises(QueueTimeout):
            await blocker
        assert await asyncio.wait_for(behind, 1) == "slot"  # the blocker's leaving let it look again
        head.cancel()
        await asyncio.gather(head, return_exceptions=True)
        assert len(q) == 0

    asyncio.run(scenario())


def test_fail_all_ends_every_waiter_with_its_own_error():
    async def scenario():
        q: WaitQueue[str] = WaitQueue("decode", strict=False)
        waiters = [asyncio.create_task(q.acquire(lambda: None, lambda v: None, 5, priority=p)) for p in (True, False)]
        await asyncio.sleep(0)
        assert q.fail_all(lambda: RuntimeError("shutting down")) == 2
        errors = await asyncio.gather(*waiters, return_exceptions=True)
        assert [str(e) for e in errors] == ["shutting down"] * 2 and errors[0] is not errors[1]
        assert len(q) == 0

    asyncio.run(scenario())


def test_a_bucket_takes_back_what_was_taken_for_work_that_did_not_happen():
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=100, clock=lambda: now[0])
    assert bucket.try_take(80) and bucket.available() == pytest.approx(20)
    bucket.give_back(80)
    assert bucket.available() == pytest.approx(100)
    bucket.give_back(50)  # never above the burst
    assert bucket.available() == pytest.approx(100)


def test_the_retry_budget_counts_recent_requests_not_every_request_since_start():
    """`budgetRatio` x recent requests: what hours of calm traffic deposited has decayed by the time a
    burst of failures arrives; only the reserve, and the recent traffic's share, are left."""
    clock = Clock()
    budget = RetryBudget(0.2, clock, reserve=3, reserve_per_s=0.5, window_s=10)
    for _ in range(1000):
        budget.record_request()  # 1,000 x 0.2 = 200 retries, capped at 100
        clock.now += 0.1
    clock.now += 120  # two quiet minutes
    spent = 0
    while budget.try_spend():
        spent += 1
    assert spent == 3  # the reserve only
    for _ in range(50):
        budget.record_request()  # a recent burst of 50 requests: 10 retries
    spent = 0
    while budget.try_spend():
        spent += 1
    assert spent == 10
