"""Benchmark scripts (not timed tests). Results land in results/ as long CSV with provenance."""
