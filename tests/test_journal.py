"""The change journal (fusemirror.journal): marks are durable when mark_* returns, repeated
marks cost nothing, concurrent new marks share one fdatasync, and a damaged journal never
makes the next reintegration miss a change (a torn tail is cut, a bad header means all)."""

import contextlib
import errno
import functools
import os
import subprocess
import sys
import threading

import pytest
import trio

from fusemirror import journal as J

MiB = 1 << 20


async def test_marks_survive_a_reopen(tmp_path):
    path = str(tmp_path / "j")
    j = J.Journal(path)
    await j.mark_data(7, 0, 10)
    await j.mark_data(7, 3 * MiB - 1, 2)          # spans chunks 2 and 3
    await j.mark_node(9)
    j.close()
    dirty = J.read(path)
    assert dirty.chunks == {7: {0, 2, 3}} and dirty.nodes == {9} and not dirty.everything
    again = J.Journal(path)
    assert again.dirty == dirty
    await again.mark_data(8, 5 * MiB, 1)
    again.close()
    assert J.read(path).chunks == {7: {0, 2, 3}, 8: {5}}


async def test_a_known_mark_writes_nothing(tmp_path):
    j = J.Journal(str(tmp_path / "j"))
    await j.mark_data(1, 0, MiB)
    size, syncs = os.path.getsize(j.path), j.syncs
    for off in range(0, MiB, 4096):
        await j.mark_data(1, off, 4096)
    await j.mark_node(2)
    await j.mark_node(2)
    assert j.syncs == syncs + 1 and os.path.getsize(j.path) == size + J.RECORD


async def test_concurrent_new_marks_share_fdatasyncs(tmp_path):
    j = J.Journal(str(tmp_path / "j"))
    async with trio.open_nursery() as nursery:
        for ino in range(200):
            nursery.start_soon(j.mark_data, ino, 0, 1)
    assert j.syncs < 50
    j.close()
    assert set(J.read(j.path).chunks) == set(range(200))


async def test_many_nodes_marked_at_once_take_one_fdatasync(tmp_path):
    j = J.Journal(str(tmp_path / "j"))
    await j.mark_node(3)
    syncs = j.syncs
    await j.mark_nodes([3, 5, 6, 7, 5])
    assert j.syncs == syncs + 1
    await j.mark_nodes([6, 7])                    # all known: nothing written
    assert j.syncs == syncs + 1
    j.close()
    assert J.read(j.path).nodes == {3, 5, 6, 7}


def test_a_mark_is_on_disk_when_the_call_returns(tmp_path):
    """kill -9 right after the mark returned: the record is there."""
    path = str(tmp_path / "j")
    code = ("import os, sys, trio\n"
            "from fusemirror import journal as J\n"
            "async def main():\n"
            "    j = J.Journal(sys.argv[1])\n"
            "    await j.mark_data(42, 3 * 1048576, 1)\n"
            "    os.kill(os.getpid(), 9)\n"
            "trio.run(main)\n")
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", code, path], cwd=top,
                       env=dict(os.environ, PYTHONPATH=top), timeout=60)
    assert p.returncode == -9
    assert J.read(path).chunks == {42: {3}}


async def test_a_torn_tail_is_cut_and_what_precedes_it_kept(tmp_path):
    path = str(tmp_path / "j")
    j = J.Journal(path)
    await j.mark_data(1, 0, 1)
    await j.mark_data(2, 0, 1)
    j.close()
    with open(path, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff\xff")       # the last record damaged
        f.seek(0, os.SEEK_END)
        f.write(b"half")                        # and a partial one after it
    assert J.read(path).chunks == {1: {0}}
    j = J.Journal(path)
    await j.mark_node(3)
    j.close()
    dirty = J.read(path)
    assert dirty.chunks == {1: {0}} and dirty.nodes == {3}


async def test_a_damaged_record_before_good_ones_means_everything(tmp_path):
    path = str(tmp_path / "j")
    j = J.Journal(path)
    for ino in (1, 2, 3):
        await j.mark_data(ino, 0, 1)
    j.close()
    with open(path, "r+b") as f:
        f.seek(J.RECORD * 2 + 10)               # the second record, not the last one
        f.write(b"\x00\x01\x02")
    assert J.read(path).everything


async def test_a_damaged_header_or_another_chunk_size_means_everything(tmp_path):
    path = str(tmp_path / "j")
    j = J.Journal(path)
    await j.mark_data(1, 0, 1)
    j.close()
    assert J.read(path, chunk_size=2 * MiB).everything
    with open(path, "r+b") as f:
        f.write(b"XXXX")
    assert J.read(path).everything
    j = J.Journal(path)                         # reopened: it keeps saying everything
    assert j.dirty.everything
    await j.mark_data(5, 0, 1)
    j.close()
    assert J.read(path).everything


async def test_clear_forgets_durably(tmp_path):
    path = str(tmp_path / "j")
    j = J.Journal(path)
    await j.mark_everything()
    assert J.read(path).everything
    j.clear()
    assert not J.read(path)
    await j.mark_node(4)
    j.close()
    assert J.read(path).nodes == {4}
    assert not J.read(str(tmp_path / "none"))


def _held_write(j):
    """Make j's next journal write wait in its thread until the returned event is set."""
    real, entered, go = j._write, threading.Event(), threading.Event()

    def write(data):
        entered.set()
        go.wait(30)
        real(data)
    j._write = write
    return entered, go


async def test_a_mark_queued_by_another_change_returns_only_once_it_is_durable(tmp_path):
    """Two writes to the same chunk at once: the second finds the chunk marked, but its
    record is still being written; it must wait for it, or a crash right after the second
    write's answer loses the record of a change the application saw succeed."""
    j = J.Journal(str(tmp_path / "j"))
    entered, go = _held_write(j)
    returned = []

    async def mark(who):
        await j.mark_data(1, 0, 4096)
        returned.append(who)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mark, "first")
        await trio.to_thread.run_sync(entered.wait, 30)
        nursery.start_soon(mark, "second")
        await trio.sleep(0.2)
        assert returned == []                   # the record is not on disk yet
        go.set()
    assert sorted(returned) == ["first", "second"] and j.syncs == 1


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs holding a journal whose file ends on a page boundary (so the next
    record needs a new page), and a file that can fill what is left of the disk."""
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


async def _mark_or_fail(j, errors, ino):
    """Mark a chunk of ino; keep the errno if it fails (it must not take 10 s)."""
    try:
        with trio.fail_after(10):
            await j.mark_data(ino, 0, 1)
    except OSError as e:
        errors.append(e.errno)


def _fill(path):
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


async def test_a_journal_write_failing_on_a_full_disk_fails_every_change_waiting_on_it(full_disk):
    """Disk full under the journal: each change whose record could not be written fails
    with ENOSPC (none hangs), nothing stays marked in memory, nothing damaged is left on
    disk, and once there is room again the journal says everything (a change applied all
    the same, its peer given up meanwhile, would have no record)."""
    path = str(full_disk / "j")
    j = J.Journal(path)
    for ino in range(4096 // J.RECORD - 1):          # the header and 127 records: one page
        await j.mark_node(ino)
    assert os.path.getsize(path) == 4096
    _fill(full_disk / "filler")
    errors = []
    mark = functools.partial(_mark_or_fail, j, errors)
    async with trio.open_nursery() as nursery:
        for ino in (1000, 1000, 1001):          # two changes to one chunk, one to another
            nursery.start_soon(mark, ino)
    assert errors == [errno.ENOSPC] * 3
    assert not j.dirty.chunks
    assert os.path.getsize(path) == 4096       # no partial record left behind
    os.unlink(full_disk / "filler")
    await j.mark_data(1000, 0, 1)
    j.close()
    dirty = J.read(path)
    assert dirty.everything and dirty.chunks == {1000: {0}} and dirty.nodes == set(range(127))


async def test_changes_that_share_a_failed_flush_all_fail(full_disk):
    """Two new marks queued while another flush runs go out in one batch; that batch
    fails: both changes fail (before, the second spun forever on the event loop)."""
    path = str(full_disk / "j")
    j = J.Journal(path)
    for ino in range(4096 // J.RECORD - 2):         # one record short of a page
        await j.mark_node(ino)
    entered, go = _held_write(j)
    errors = []
    mark = functools.partial(_mark_or_fail, j, errors)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(j.mark_node, 500)        # fills the page: it fits
        await trio.to_thread.run_sync(entered.wait, 30)
        _fill(full_disk / "filler")
        nursery.start_soon(mark, 1000)
        nursery.start_soon(mark, 1001)
        await trio.sleep(0.2)
        go.set()
    assert errors == [errno.ENOSPC] * 2
    assert 500 in J.read(path).nodes and not j.dirty.chunks
