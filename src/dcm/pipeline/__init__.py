"""Orchestration: the stage table, one module per DAG stage, the DVC/Snakemake views and the launcher.

Everything here wires params to library calls and writes outputs; nothing below imports it.
"""
