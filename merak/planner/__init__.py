"""Cluster planning: predict a layout's step time and memory on GPUs you do not have.

* :mod:`.cluster` - the hardware model (devices, links, presets, calibration on this machine);
* :mod:`.cost` - per-node compute and tensor-parallel communication costs on that hardware;
* :mod:`.memory` - per-stage device memory from the runtime estimator's saved-tensor profile;
* :mod:`.simulator` - a traced model + strategy -> predicted step (real partitioner, schedules
  and discrete-event simulator);
* :mod:`.search` - the best strategy for a system (branch and bound);
* :mod:`.cli` - ``python -m merak.planner``, the ranking printed for a user.

It lives outside ``merak.runtime`` because nothing here runs a model: it only reads the
partitioner's graph and the runtime's pure functions (schedules, simulator, memory estimator).
"""
