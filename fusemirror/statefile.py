"""Persistent per-mount state: is the peer's copy (or our own) known to be good?

One JSON file per mounted folder under the state directory, replaced atomically
(write, fsync, rename, fsync the directory); next to it, the journal of what changed
while the peer was out of date (journal.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

DEFAULT_DIR = "/var/lib/fusemirror"


def escape(path: str) -> str:
    """A file name for a mount point: /srv/app -> srv-app (systemd-escape style)."""
    out = []
    for ch in path.strip("/") or "-":
        if ch == "/":
            out.append("-")
        elif ch.isalnum() or ch in "_.":
            out.append(ch)
        else:
            out.append("\\x%02x" % ord(ch) if ord(ch) < 256 else "_")
    return "".join(out)


class StateFile:
    def __init__(self, state_dir: str, mountpoint: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        base = os.path.join(state_dir, escape(mountpoint))
        self.path = base + ".state"
        self.journal_path = base + ".journal"
        self.data = self._load()
        # Updates come from the event loop and from worker threads (a lost link is
        # recorded off the loop): one at a time, or two would share the temporary file.
        self._lock = threading.RLock()

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            # A damaged state file must not make a stale copy look good.
            log.error("state file %s unreadable (%s): treating every copy as out of date",
                      self.path, e)
            return {"peer_outdated": True, "uptodate": False, "reason": "state file damaged"}

    def get(self, key, default=None):
        return self.data.get(key, default)

    def update(self, **values) -> None:
        """Durably merge values into the state; memory changes only once the disk has."""
        with self._lock:
            self._update(values)

    def _update(self, values: dict) -> None:
        data = {**self.data, **values}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.data = data
        dfd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def mark_peer_outdated(self, reason: str) -> None:
        with self._lock:
            if not self.data.get("peer_outdated"):
                self._update(dict(peer_outdated=True, peer_outdated_since=time.time(),
                                  reason=reason))

    def mark_changed_alone(self) -> None:
        """This copy acknowledged a change the peer did not apply (the controller's
        `diverged`): recorded before the change is acknowledged."""
        with self._lock:
            if not self.data.get("changed_alone"):
                self._update(dict(changed_alone=True, changed_alone_since=time.time()))

    def mark_self(self, uptodate: bool, reason: str = "") -> None:
        with self._lock:
            if self.data.get("uptodate") != uptodate:
                self._update(dict(uptodate=uptodate, uptodate_reason=reason,
                                  uptodate_changed=time.time()))

    def mark_resynced(self) -> None:
        """Replica: a resynchronisation made this copy equal to the primary's (what it did
        as a primary before is no longer of any account)."""
        with self._lock:
            self._update(dict(uptodate=True, uptodate_reason="resynchronised",
                              uptodate_changed=time.time(), resynced_at=time.time(),
                              changed_alone=False, acting_primary=False, peer_outdated=False,
                              needs_full=False, quarantine_dir="", peer_synced=True,
                              last_quarantine=self.data.get("quarantine_dir", "")))

    def mark_peer_uptodate(self) -> None:
        """Primary: the peer's copy equals ours again; what changed alone is forgotten."""
        with self._lock:
            self._update(dict(peer_outdated=False, changed_alone=False, reason="",
                              peer_resynced_at=time.time(), peer_synced=True))

    def mark_acting(self, acting: bool) -> None:
        """Primary: changes may be in flight to an up-to-date peer without being journaled
        (a crash then leaves both copies uncertain about them: the next resynchronisation
        must be a full one)."""
        with self._lock:
            if bool(self.data.get("acting_primary")) != acting:
                self._update(dict(acting_primary=acting))

    def close(self) -> None:
        pass
