"""Command-line entry points of fusemirror."""
