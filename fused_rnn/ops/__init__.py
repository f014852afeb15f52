"""Triton kernels and their launchers: one file per cell, shared pieces in ``launch``."""
