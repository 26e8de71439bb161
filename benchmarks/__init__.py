"""Benchmark scripts (not timed tests). Results land in the run directory (runs/local/ by default, see experiments.core.runs) as long CSV with provenance."""
