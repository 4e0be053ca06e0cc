"""Schedule generators, one module per family. See ``merak.runtime.pipeline.schedule.build``."""
