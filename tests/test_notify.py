"""The notifier (platform/notify.py): long-polls and calls wait on a key until it is notified, their timeout
passes, they are cancelled, or the platform closes; none of them leaves a waiter behind."""

from __future__ import annotations

import asyncio

from opbox.platform.notify import Notifier


def test_notify_wakes_every_waiter_of_its_key_only():
    async def main():
        notifier = Notifier()
        woken = [asyncio.ensure_future(notifier.wait("run-1", 30)) for _ in range(3)]
        other = asyncio.ensure_future(notifier.wait("run-2", 0.05))
        await asyncio.sleep(0)
        notifier.notify("run-1")
        assert await asyncio.gather(*woken) == [True, True, True]
        assert await other is False  # its own key was never notified: its timeout ends it
        assert notifier._waiters == {}
    asyncio.run(main())


def test_a_wait_that_times_out_or_is_cancelled_leaves_nothing_behind():
    async def main():
        notifier = Notifier()
        assert await notifier.wait("k", 0.01) is False
        forever = asyncio.ensure_future(notifier.wait("k", None))  # no timeout: until notified
        await asyncio.sleep(0.02)
        assert not forever.done()
        notifier.notify("k")
        assert await forever is True
        cancelled = asyncio.ensure_future(notifier.wait("k", 30))
        kept = asyncio.ensure_future(notifier.wait("k", 30))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert len(notifier._waiters["k"]) == 1  # the other waiter is still there
        notifier.notify("k")
        assert await kept is True and notifier._waiters == {}
        notifier.notify("k")  # nobody waits: nothing happens
    asyncio.run(main())


def test_published_keys_go_out_and_delivered_keys_wake_waiters_here():
    async def main():
        notifier, sent = Notifier(), []
        notifier.publish = sent.append
        waiting = asyncio.ensure_future(notifier.wait("from-elsewhere", 30))
        await asyncio.sleep(0)
        notifier.notify("mine")
        notifier.deliver("from-elsewhere")
        assert await waiting is True and sent == ["mine"]
    asyncio.run(main())


def test_close_wakes_every_waiter_and_later_waits_return_at_once():
    async def main():
        notifier = Notifier()
        waits = [asyncio.ensure_future(notifier.wait(key, 30)) for key in ("a", "b", "b")]
        await asyncio.sleep(0)
        notifier.close()
        assert await asyncio.gather(*waits) == [True, True, True]
        assert await asyncio.wait_for(notifier.wait("a", 30), 1) is False
    asyncio.run(main())
