"""Merak's 3D runtime: process grid, point-to-point layer, pipeline schedules and executor."""
