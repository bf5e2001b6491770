"""Test, demo and benchmark tooling: nodes in network namespaces on one machine."""
