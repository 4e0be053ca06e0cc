"""Schedule generators, one module per family. See ``merak.runtime.schedule.build``."""
