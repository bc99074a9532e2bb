"""Synthetic worlds with known ground truth for training and scoring tiny video models."""
