"""Reliability suites: crashes, Redis restarts, provider faults and bad input against real processes."""
