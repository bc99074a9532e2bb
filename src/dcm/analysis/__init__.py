"""Analyses of training: per-timestep loss dynamics (κ proposal) and parameter change between checkpoints."""
