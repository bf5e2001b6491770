"""The fault-injection harness of issue 7 (`tests/chaos/run`, docs/testing.md).

schedule   the fault classes and the seeded schedule (pure)
workloads  the writer and the tree mutator, run as their own processes
faults     applying and healing each fault class on a fusemirror.lab.cluster.Cluster
proxy      the TCP proxy that corrupts replication frames on request (its own process)
checker    what every acknowledged write and request must satisfy (pure but for reading)
harness    the driver: builds the cluster, runs workloads and faults, checks, reports
report     the text table and the JSON document
"""
