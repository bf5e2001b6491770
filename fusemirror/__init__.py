"""fusemirror: synchronous two-node replication of application folders through FUSE."""

__version__ = "0.1.0"
