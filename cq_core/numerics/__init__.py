"""Numerics shared by formats and optimizers: exact division, block scales, error metrics. Imports nothing from cq."""
