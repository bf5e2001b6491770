"""The in-flight window bounds operations and bytes (pure logic, trio only)."""

import trio

from fusemirror.mirror import _Window


async def test_window_bounds_bytes_and_lets_one_big_frame_through():
    w = _Window(ops=10, size=100)
    await w.acquire(60)
    got = []

    async def second():
        await w.acquire(60)            # 60 + 60 > 100: must wait for the first
        got.append("second")

    async with trio.open_nursery() as n:
        n.start_soon(second)
        await trio.sleep(0.05)
        assert got == []
        w.release(60)
        await trio.sleep(0.05)
        assert got == ["second"]
    w.release(60)
    await w.acquire(1000)              # larger than the window, but alone: it goes
    assert (w.ops, w.bytes) == (1, 1000)


async def test_window_bounds_operations():
    w = _Window(ops=2, size=10**9)
    await w.acquire(1)
    await w.acquire(1)
    with trio.move_on_after(0.05) as scope:
        await w.acquire(1)
    assert scope.cancelled_caught
    w.release(1)
    with trio.fail_after(1):
        await w.acquire(1)
