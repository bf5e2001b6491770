"""The fusemirror demo (`sh scripts/demo.sh`, or `python -m demo` as root).

Two nodes on one machine, "alpha" and "beta", each with its own prefix under a scratch
directory in /var/tmp. The folder srv/app of each node is mounted over itself by a
fusemirror mount agent: beta's as the replica (listening on 127.0.0.1), alpha's as the
primary. A real workload runs on the primary, the replica's copy is inspected through its
read-only mount, `fusemirror verify` compares the two, then the roles are swapped and the
new primary is written to and verified. Everything is unmounted and removed at the end.
"""
