"""The benchmark harness: `python -m bench` runs every scenario and prints the table (docs/performance.md)."""
