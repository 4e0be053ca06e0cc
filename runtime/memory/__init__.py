"""Device memory: what a stage keeps, what it may drop, and how it is estimated.

* :mod:`.estimator` - bytes per device and stage (``python -m merak.runtime.memory``);
* :mod:`.activation_profile` - autograd's saved tensors per node, measured on meta;
* :mod:`.planner` - a memory budget -> which layers each stage recomputes or offloads;
* :mod:`.policy` - per-layer actions (keep / recompute / selective / offload) of a stage;
* :mod:`.recompute_plan` - which micro-batches get a ``RECOMPUTE`` instruction (for schedules);
* :mod:`.stage_aware` - Merak's stage-aware rule per chunk for virtual-stage schedules;
* :mod:`.layer_graph` / :mod:`.layer_checkpoint` / :mod:`.stage_activations` - regrouping a
  stage graph per layer, checkpointing with an eager trigger, per micro-batch application;
* :mod:`.zero` (ZeRO-1), :mod:`.precision` (bf16/fp16, loss scaling), :mod:`.host_allocator`
  (keeping freed host memory on CPU).
"""
