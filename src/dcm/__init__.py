"""dcm: distil a text-to-video diffusion teacher into a 4-step Dual-Expert Consistency Model."""

__version__ = "0.1.0"
