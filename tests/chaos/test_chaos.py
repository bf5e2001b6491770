"""The chaos harness in CI: its pure parts (the checker's definitions, the schedule), then a
short seeded run of the real thing (about 3 minutes) whose report must hold the invariants.

    FUSEMIRROR_CHAOS_SEED=N FUSEMIRROR_CHAOS_MINUTES=M   replay another schedule
"""

import os

import pytest

from chaos import checker, schedule
from chaos.harness import Options, Run

SEED = int(os.environ.get("FUSEMIRROR_CHAOS_SEED", "7"))
MINUTES = float(os.environ.get("FUSEMIRROR_CHAOS_MINUTES", "2"))


def ack(seq, node, sent, acked):
    return {"seq": seq, "node": node, "sent": sent, "acked": acked}


def err(seq, node, sent, at, e="EROFS"):
    return {"seq": seq, "node": node, "sent": sent, "error": e, "at": at}


def history(*seqs):
    return "".join(f"{s} x\n" for s in seqs)


# --- the checker (pure) ------------------------------------------------------------------

def test_a_clean_hand_over_has_no_dual_writer_window():
    log = [ack(1, "alpha", 0.0, 0.1), ack(2, "alpha", 0.2, 0.3), err(3, "alpha", 0.4, 0.5),
           ack(4, "beta", 2.0, 2.1), ack(5, "beta", 2.2, 2.3)]
    w = checker.check_writer(log, history(1, 2, 4, 5), set())
    assert (w.acked, w.lost, w.dual, w.excused, w.order) == (4, [], [], [], [])
    assert w.by_node == {"alpha": 2, "beta": 2}


def test_a_hand_over_and_back_within_a_second_is_no_dual_writer_window():
    """Seen in a 30-minute run: beta stopped being a target, alpha acknowledged for 0.35 s,
    beta again 0.6 s after its last acknowledgement. Without the writer's idle mark,
    beta's two stretches read as one window around alpha's: a dual writer that never was."""
    log = [ack(1, "beta", 0.0, 0.01), ack(2, "beta", 0.4, 0.43),
           {"node": "beta", "sent": 0.5, "idle": True},
           ack(3, "alpha", 0.54, 0.55), ack(4, "alpha", 0.82, 0.89),
           ack(5, "beta", 1.04, 1.05), ack(6, "beta", 1.07, 1.08)]
    w = checker.check_writer(log, history(1, 2, 3, 4, 5, 6), set())
    assert (w.lost, w.dual, w.order) == ([], [], [])
    # the same without the mark: flagged, as the checker must when it cannot tell
    w = checker.check_writer([e for e in log if "idle" not in e],
                             history(1, 2, 3, 4, 5, 6), set())
    assert len(w.dual) == 1 and w.dual[0]["nodes"] == ["beta", "alpha"]


def test_a_late_acknowledgement_already_in_the_new_history_is_excused():
    # alpha froze with record 3 applied on both copies; beta took over; alpha answered late
    log = [ack(1, "alpha", 0.0, 0.1), ack(2, "alpha", 0.2, 0.3), ack(3, "alpha", 0.4, 6.0),
           ack(4, "beta", 2.0, 2.1), ack(5, "beta", 2.2, 2.3)]
    w = checker.check_writer(log, history(1, 2, 3, 4, 5), set())
    assert w.dual == [] and [e["seq"] for e in w.excused] == [3]
    assert w.excused[0]["late_s"] == pytest.approx(4.0)


def test_two_nodes_accepting_writes_at_once_is_a_dual_writer_window():
    # beta promoted while alpha went on: alpha's 5 and 7 are on no history beta has
    log = [ack(1, "alpha", 0.0, 0.1), ack(2, "alpha", 0.2, 0.3), ack(4, "beta", 1.0, 1.1),
           ack(5, "alpha", 1.2, 1.3), ack(6, "beta", 1.4, 1.5), ack(7, "alpha", 1.6, 1.7)]
    w = checker.check_writer(log, history(1, 2, 4, 6), {5, 7})
    assert len(w.dual) == 1
    d = w.dual[0]
    assert d["nodes"] == ["alpha", "beta"] and d["count"] == 2
    assert (d["start"], d["end"]) == (1.0, 1.7)
    assert w.lost == [] and w.quarantined == [5, 7]


def test_a_late_acknowledgement_missing_from_the_new_history_is_not_excused():
    log = [ack(1, "alpha", 0.0, 0.1), ack(3, "alpha", 0.4, 6.0), ack(4, "beta", 2.0, 2.1)]
    w = checker.check_writer(log, history(1, 4), set())
    assert w.lost == [3] and len(w.dual) == 1


def test_lost_records_and_order_violations():
    log = [ack(1, "alpha", 0.0, 0.1), ack(2, "alpha", 0.2, 0.3), ack(3, "alpha", 0.4, 0.5)]
    w = checker.check_writer(log, history(2, 1), set())
    assert w.lost == [3]
    assert w.order == [(1, 2)]                   # 1 was acknowledged before 2 was sent
    assert checker.check_writer(log, "1 x\ngarbage\n2 x\n3 x\n", set()).malformed == 1


def test_what_a_short_write_left_is_not_a_malformed_line_nor_an_acknowledgement():
    # chaos seed 11: a full disk took "454 al" of record 454; 455 followed on its own line
    log = [ack(453, "alpha", 0.0, 0.1),
           {"seq": 454, "node": "alpha", "sent": 0.2, "error": "short-write", "at": 0.21},
           ack(455, "alpha", 0.3, 0.4)]
    w = checker.check_writer(log, "\n453 alpha\n\n454 al\n455 alpha\n", set())
    assert w.malformed == 0 and w.lost == [] and w.acked == 2
    assert checker.check_writer(log, "453 alpha\n\n45\n455 alpha\n", set()).malformed == 0
    assert checker.check_writer(log, "453 alpha\n\n46\n455 alpha\n", set()).malformed == 1


def test_windows_end_at_a_failure_or_a_silence():
    log = [ack(1, "alpha", 0.0, 0.1), ack(2, "alpha", 0.2, 0.3), err(3, "alpha", 0.4, 0.5),
           ack(4, "alpha", 0.6, 0.7), ack(5, "alpha", 5.0, 5.1)]
    assert [[r["seq"] for r in w.records] for w in checker.windows(log)] == [[1, 2], [4], [5]]


def test_client_requests_must_be_on_the_primary_with_their_body():
    entries = [{"client": "c1", "seq": 1, "id": 10, "mono": 1.0},
               {"client": "c1", "seq": 2, "id": 11, "mono": 2.0},
               {"client": "c1", "seq": 3, "id": 12, "mono": 3.0}]
    rows = {10: b'{"client": "c1", "seq": 1}', 11: b'{"client": "c2", "seq": 9}'}
    q = {12: b'{"client": "c1", "seq": 3}'}
    c = checker.check_client(entries, rows, q)
    assert [e["id"] for e in c.lost] == [11]        # the id was reused by another body
    assert [e["id"] for e in c.quarantined] == [12]


# --- the schedule (pure) -----------------------------------------------------------------

def test_the_same_seed_draws_the_same_schedule():
    a = schedule.describe(schedule.draw(42, 50))
    assert a == schedule.describe(schedule.draw(42, 50))
    assert a != schedule.describe(schedule.draw(43, 50))


def test_overlapping_faults_never_touch_the_same_thing_nor_both_nodes_down():
    faults = schedule.draw(1, 2000)
    pairs = [f for f in faults if f.second]
    assert 0.1 < len(pairs) / len(faults) < 0.3
    seen = {f.cls for f in faults}
    assert seen == set(schedule.CLASSES)
    for f in pairs:
        s = f.second
        assert not f.resources() & s.resources(), f.describe()
        assert s.cls not in schedule.NO_OVERLAP and 0 < s.offset < f.hold
        assert len({r for r in f.resources() | s.resources() if r.startswith("down@")}) < 2


def test_unknown_classes_are_refused():
    with pytest.raises(ValueError):
        schedule.draw(1, 3, ("kill9-daemon", "meteor"))


# --- a real run --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run():
    if os.geteuid() != 0:
        pytest.skip("namespaces and FUSE mounts need root")
    result = Run(Options(minutes=MINUTES, seed=SEED)).execute()
    print(result["text"])
    return result


@pytest.mark.slow
def test_a_short_seeded_chaos_run_loses_nothing_and_never_has_two_writers(short_run):
    """The first promises: no acknowledged write lost, never two nodes accepting writes."""
    why = short_run["text"]
    assert short_run["faults_run"] >= 3, why
    assert short_run["lost"]["total"] == 0, why
    assert short_run["dual_writer_windows"] == [], why
    assert short_run["order_violations"] == [], why


@pytest.mark.slow
def test_a_short_seeded_chaos_run_keeps_every_promise(short_run):
    """Every check: verify clean once reintegrated, integrity_check, stable after each heal."""
    why = short_run["text"]
    assert short_run["checks"]["failed"] == 0, why
    assert short_run["passed"], why


# --- the harness's findings, replayed ------------------------------------------------------

# (seed, faults): the first faults of a seed are the same whatever the run's length, so a
# finding replays by its seed and the number of faults that led to it (the cluster's timing
# may differ from the run that found it).
REPLAYS = [
    # kill -9 of the primary node, and of the survivor's agent while it took over: its
    # checker restarted the application on the dead mount, start_prim failed, and that
    # failure kept both nodes WAIT until the admin's `prim`
    pytest.param(1, 1, id="seed1-kill9-node+kill9-agent"),
    # one-way loss around a swap of roles with the disk full, first on the new primary
    # (short writes through write-only descriptors: the peer kept the whole writes), then
    # on the restarted secondary (a failure answered after RESYNC_DONE: the peer was
    # marked up to date without the write)
    pytest.param(11, 3, id="seed11-disk-full-primary-then-secondary"),
]


@pytest.mark.slow
@pytest.mark.parametrize("seed,faults", REPLAYS)
def test_a_finding_of_the_harness_replayed(seed, faults):
    if os.geteuid() != 0:
        pytest.skip("namespaces and FUSE mounts need root")
    result = Run(Options(minutes=5, seed=seed, max_faults=faults)).execute()
    print(result["text"])
    assert result["faults_run"] == faults, result["text"]
    assert result["passed"], result["text"]
