"""Merak's 3D runtime, one sub-package per concern: ``distributed`` (grid, p2p), ``pipeline``
(schedules, validator, simulator, executor), ``tensor_parallel`` and ``memory``."""
