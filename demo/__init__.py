"""The fusemirror demo (`sh scripts/demo.sh`, or `python -m demo` as root), and the sample
application and client it uses (demo.app, demo.client).

A whole two-node cluster on this machine (fusemirror.lab.cluster): "alpha" and "beta" in
network namespaces, each running `fusemirror daemon` over its own replicated folder
/srv/app under a scratch directory in /var/tmp, the sample application (an HTTP service
storing records in SQLite in that folder) on the primary behind the virtual IP, and a
client in a third namespace. The demo

1. starts both daemons: alpha becomes PRIM with the VIP, beta SECOND (`fusemirror state`);
2. unpacks a real source tree into alpha's folder, checks with `fusemirror verify` that
   both copies are identical, and that beta's copy is read-only (EROFS);
3. runs the client through the VIP, kills -9 every fusemirror process of alpha, and shows
   beta taking over (ALONE, the VIP on beta) while the client carries on;
4. counts the acknowledged records lost (0), the time without service measured by the
   client, and runs `PRAGMA integrity_check` on the survivor's database;
5. restarts alpha's daemon: it follows beta as SECOND, beta resynchronises alpha's copy
   online (only what changed while alpha was away), alpha becomes a Ready SECOND again and
   `fusemirror verify` finds both copies identical.

Everything is stopped, unmounted and deleted at the end, also on failure or Ctrl-C. Exit
status 0 only when every check passed, 1 otherwise (the failed check is named), 2 when
not run as root.
"""
