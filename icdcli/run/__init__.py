"""Batch editing without the command line: items and specs, planning, the runner, claims and records."""
