"""Quarantine: what a resynchronisation would overwrite or remove on a copy that has
acknowledged changes of its own (split brain) is kept, not discarded.

While such a copy is being made equal to the chosen survivor's, every node a change would
remove is moved (a rename when it can be: the same filesystem) and every file a change
would modify is copied first, once, into a dated folder outside the replicated tree,
under the same relative path: `<parent of the folder>/.fusemirror-quarantine/<folder
name>/<UTC date and time>/`. The admin looks there for the writes of the node that was
not kept, and merges what matters by hand.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time

from . import sysops

log = logging.getLogger(__name__)


def new_folder(mountpoint: str) -> str:
    parent, name = os.path.split(mountpoint.rstrip("/"))
    return os.path.join(parent or "/", ".fusemirror-quarantine", name or "root",
                        time.strftime("%Y%m%d-%H%M%S", time.gmtime()))


class Quarantine:
    def __init__(self, root_fd: int, folder: str):
        self.root_fd, self.folder = root_fd, folder
        self.kept = 0
        self._copied: set[tuple[int, int]] = set()

    def _destination(self, path: bytes) -> str:
        """Where path goes; a second version of the same path gets a ~N suffix."""
        dest = os.path.join(self.folder, os.fsdecode(os.path.normpath(path)))
        os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
        n, candidate = 0, dest
        while os.path.lexists(candidate):
            n += 1
            candidate = f"{dest}~{n}"
        return candidate

    def move(self, dfd: int, name: bytes, path: bytes) -> bool:
        """Move the node `name` of directory dfd (at path in the tree) out of the tree.
        False: there is nothing there."""
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        dest = self._destination(path)
        try:
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                # Its other names stay in the tree: moving this one would leave the kept
                # version sharing their inode (changed with them, and a hard-link group
                # reaching outside the tree; chaos finding): a copy is kept instead.
                raise OSError(18, "keep a copy")
            os.rename(name, dest, src_dir_fd=dfd)
        except OSError as e:
            if e.errno != 18:                   # EXDEV: another filesystem, copy then remove
                raise
            src = sysops.proc_path(dfd) + "/" + os.fsdecode(name)
            if stat.S_ISDIR(st.st_mode):
                shutil.copytree(src, dest, symlinks=True)
                shutil.rmtree(name, dir_fd=dfd)
            else:
                shutil.copy2(src, dest, follow_symlinks=False)
                os.unlink(name, dir_fd=dfd)
        self.kept += 1
        log.info("quarantine: %s moved to %s", os.fsdecode(path), dest)
        return True

    def copy(self, path: bytes) -> None:
        """Copy the file at path (once per file) before it is modified."""
        try:
            fd = sysops.open_beneath(self.root_fd, path, os.O_PATH | os.O_NOFOLLOW)
        except OSError:
            return                              # nothing there (yet): nothing to keep
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISREG(st.st_mode) or key in self._copied:
                return
            dest = self._destination(path)
            shutil.copy2(sysops.proc_path(fd), dest)
            self._copied.add(key)
            self.kept += 1
            log.info("quarantine: %s copied to %s before it changes", os.fsdecode(path), dest)
        finally:
            os.close(fd)
