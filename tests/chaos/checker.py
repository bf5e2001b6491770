"""What every acknowledged write and request must satisfy, checked from the workloads' logs
against what the current primary holds.

Records of the writer (workloads.py) are lines "SEQ NODE" appended to chaos/writer.log;
the primary's copy of that file is the history. Requests of demo.client are rows of
records.db whose body is {"client": NAME, "seq": K}.

Lost: an acknowledged record that is neither in the primary's history nor in a quarantine
folder (`<parent of the folder>/.fusemirror-quarantine/`); an acknowledged request whose id
is not in the primary's database with the same body, nor in a quarantined copy.

Order: the history is an append-only log, so when a record was acknowledged before another
was sent, it must come first in the history (whatever nodes acknowledged them).

Dual writers (two nodes accepting writes at the same time), from the writer's log alone
plus the history. Each node's acknowledgement windows are the maximal runs of its
acknowledged attempts (an attempt failing, the node ceasing to be a target of the writer
because its controller no longer claims PRIM or ALONE, or no attempt for GAP seconds, ends
a run),
from the first one's `sent` to the last one's `acked`: the node was accepting writes all
along. Two windows of different nodes that intersect in time are an overlap. The only
overlap allowed is a late acknowledgement: the older window's records acknowledged after
the newer window's first record was sent must already be in the history *before* that first
record, i.e. both copies had applied them before the other node accepted anything (an agent
frozen or descheduled after the write was applied on both sides answers late; nothing
diverged). Every other overlap is a dual-writer window, from the newer window's first
`sent` to the last unexcused acknowledgement. There is no time tolerance: an overlap is
either explained by the history or it is counted, however short.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field

from .workloads import SHORT_WRITE

GAP = 1.0                         # seconds without an attempt that end a window
QUARANTINE = ".fusemirror-quarantine"


# --- reading ----------------------------------------------------------------------------

def read_jsonl(path: str) -> list[dict]:
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue              # a line cut short by a kill
                if isinstance(e, dict) and ("seq" in e or "idle" in e):
                    out.append(e)
    except FileNotFoundError:
        pass
    return out


def parse_history(text: str) -> tuple[list[int], list[str]]:
    """(seqs in file order, malformed lines) of a writer.log."""
    seqs, bad = [], []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            seqs.append(int(parts[0]))
        elif line.strip():
            bad.append(line)
    return seqs, bad


def _unexplained(bad: list[str], entries: list[dict]) -> int:
    """Malformed lines that are not what a short write (a full disk: the writer reports it,
    never acknowledged) left of its record."""
    short = {f"{e['seq']} {e['node']}" for e in entries if e.get("error") == SHORT_WRITE}
    return sum(1 for line in bad if not any(r.startswith(line) for r in short))


def quarantine_dirs(folders: list[str]) -> list[str]:
    return [os.path.join(os.path.dirname(os.path.realpath(f)), QUARANTINE) for f in folders]


def quarantined_records(folders: list[str]) -> tuple[set[int], dict[int, bytes]]:
    """Writer seqs and database rows kept in the quarantine folders of these nodes."""
    seqs: set[int] = set()
    rows: dict[int, bytes] = {}
    for top in quarantine_dirs(folders):
        for root, _, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                if name.startswith("writer.log"):
                    with open(path, errors="replace") as f:
                        seqs.update(parse_history(f.read())[0])
                elif name.startswith("records.db") and "-journal" not in name:
                    try:
                        rows.update(read_rows(path))
                    except sqlite3.Error:
                        pass
    return seqs, rows


def read_rows(path: str) -> dict[int, bytes]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {i: bytes(b or b"") for i, b in con.execute("SELECT id, body FROM records")}
    finally:
        con.close()


def integrity(path: str) -> list[str]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in con.execute("PRAGMA integrity_check")]
    finally:
        con.close()


# --- the writer -------------------------------------------------------------------------

@dataclass
class Window:
    node: str
    records: list[dict] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.records[0]["sent"]

    @property
    def end(self) -> float:
        return max(r["acked"] for r in self.records)


def windows(entries: list[dict], gap: float = GAP) -> list[Window]:
    """Every node's acknowledgement windows (see the module's docstring)."""
    out = []
    by_node: dict[str, list[dict]] = {}
    for e in entries:
        by_node.setdefault(e["node"], []).append(e)
    for node, attempts in by_node.items():
        attempts.sort(key=lambda e: e["sent"])
        current: Window | None = None
        last = None
        for e in attempts:
            if "acked" not in e:
                current = None
                continue
            if current is None or e["sent"] - last > gap:
                current = Window(node)
                out.append(current)
            current.records.append(e)
            last = e["acked"]
    out.sort(key=lambda w: w.start)
    return out


def dual_writers(entries: list[dict], history: list[int]) -> tuple[list[dict], list[dict]]:
    """(dual-writer windows, excused late acknowledgements)."""
    pos = {}
    for i, s in enumerate(history):
        pos.setdefault(s, i)
    ws = windows(entries)
    dual, excused = [], []
    for i, old in enumerate(ws):
        for new in ws[i + 1:]:
            if new.node == old.node or new.start >= old.end:
                continue
            first = new.records[0]
            late = [r for r in old.records if r["acked"] > first["sent"]]
            limit = pos.get(first["seq"])
            bad = [r for r in late
                   if limit is None or pos.get(r["seq"]) is None or pos[r["seq"]] > limit]
            if bad:
                dual.append({"nodes": [old.node, new.node], "start": first["sent"],
                             "end": max(r["acked"] for r in bad),
                             "seqs": [r["seq"] for r in bad][:20], "count": len(bad)})
            else:
                excused.extend({"node": old.node, "seq": r["seq"],
                                "late_s": r["acked"] - first["sent"],
                                "other": new.node} for r in late)
    return merge(dual), excused


def merge(spans: list[dict]) -> list[dict]:
    out: list[dict] = []
    for s in sorted(spans, key=lambda s: s["start"]):
        if out and s["start"] <= out[-1]["end"]:
            o = out[-1]
            o["end"] = max(o["end"], s["end"])
            o["count"] += s["count"]
            o["seqs"] = (o["seqs"] + s["seqs"])[:20]
            o["nodes"] = sorted(set(o["nodes"]) | set(s["nodes"]))
        else:
            out.append(dict(s))
    return out


def order_violations(entries: list[dict], history: list[int]) -> list[tuple[int, int]]:
    """Pairs (x, y): x acknowledged before y was sent, yet y comes first in the history."""
    acked = {e["seq"]: e for e in entries if "acked" in e}
    pos = {}
    for i, s in enumerate(history):
        pos.setdefault(s, i)
    present = sorted((pos[s], s) for s in acked if s in pos)
    out = []
    best: tuple[float, int] | None = None       # smallest ack among later positions
    for _, s in reversed(present):
        e = acked[s]
        if best is not None and best[0] < e["sent"]:
            out.append((best[1], s))
        if best is None or e["acked"] < best[0]:
            best = (e["acked"], s)
    return out


@dataclass
class WriterCheck:
    acked: int
    by_node: dict
    lost: list[int]
    quarantined: list[int]
    dual: list[dict]
    excused: list[dict]
    order: list[tuple[int, int]]
    malformed: int

    def to_json(self) -> dict:
        return {"acked": self.acked, "by_node": self.by_node, "lost": self.lost[:50],
                "lost_count": len(self.lost), "quarantined": self.quarantined[:50],
                "quarantined_count": len(self.quarantined), "dual_writer_windows": self.dual,
                "late_acknowledgements": len(self.excused),
                "longest_late_s": max((e["late_s"] for e in self.excused), default=0.0),
                "order_violations": self.order[:20], "malformed_lines": self.malformed}


def check_writer(entries: list[dict], history_text: str, quarantine: set[int]) -> WriterCheck:
    history, bad = parse_history(history_text)
    present = set(history)
    acked = [e for e in entries if "acked" in e]
    missing = sorted(e["seq"] for e in acked if e["seq"] not in present)
    lost = [s for s in missing if s not in quarantine]
    kept = [s for s in missing if s in quarantine]
    by_node: dict[str, int] = {}
    for e in acked:
        by_node[e["node"]] = by_node.get(e["node"], 0) + 1
    dual, excused = dual_writers(entries, history)
    return WriterCheck(len(acked), by_node, lost, kept, dual, excused,
                       order_violations(entries, history), _unexplained(bad, entries))


# --- the client through the VIP ---------------------------------------------------------

@dataclass
class ClientCheck:
    acked: int
    lost: list[dict]
    quarantined: list[dict]

    def to_json(self) -> dict:
        return {"acked": self.acked, "lost_count": len(self.lost), "lost": self.lost[:50],
                "quarantined_count": len(self.quarantined), "quarantined": self.quarantined[:50]}


def _matches(body: bytes | None, entry: dict) -> bool:
    if body is None:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return doc == {"client": entry["client"], "seq": entry["seq"]}


def check_client(entries: list[dict], rows: dict[int, bytes],
                 quarantine: dict[int, bytes]) -> ClientCheck:
    """entries: acknowledged requests, each with its client's name added as "client"."""
    lost, kept = [], []
    for e in entries:
        if _matches(rows.get(e["id"]), e):
            continue
        brief = {"client": e["client"], "seq": e["seq"], "id": e["id"], "mono": e["mono"]}
        (kept if _matches(quarantine.get(e["id"]), e) else lost).append(brief)
    return ClientCheck(len(entries), lost, kept)
