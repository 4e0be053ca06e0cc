"""Pipeline parallelism: schedules as data, and the executor that runs them.

* :mod:`.instructions` - the instruction record (``0F1``, ``1B0`` ...) every pass works on;
* :mod:`.schedules` - one generator per schedule family; :mod:`.schedule` - the registry,
  ``build``/``build_all`` and ``python -m merak.runtime.pipeline.schedule``;
* :mod:`.comm_pass` - send/receive instructions derived from the compute order;
* :mod:`.validate` / :mod:`.simulate` / :mod:`.timeline` - proofs, timings and pictures of a
  schedule, without tensors;
* :mod:`.executor` - runs one stage's instruction list; :mod:`.grad_reduce` (data-parallel and
  tied gradients), :mod:`.weight_grad_store` (deferred weight gradients for zero-bubble) and
  :mod:`.calibration` (stage times measured inside dry pipeline steps) serve it.
"""
