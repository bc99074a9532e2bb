"""Evaluation: shapes-bench (analytic dimensions), VBench wrapper, latency, VBench-style aggregation."""
