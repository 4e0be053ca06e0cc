"""The distributed layer: the process grid and every communication of the package.

* :mod:`.grid` - ranks -> (dp, tp, pp) coordinates and the process groups of each dimension;
* :mod:`.p2p` - pipeline sends and receives with timeouts that name rank, peer and what.
* :mod:`.collectives` - tensor collectives (all-reduce, scalar reductions, broadcast, barrier,
  all-gather, gather, all-to-all, reduce-scatter) with timeouts, on the group's device;
* :mod:`.objects` - picklable values gathered or broadcast with timeouts;
* :mod:`.groups` - a group's size, rank, device (NCCL -> CUDA, gloo -> CPU) and name.

No other module of the package calls torch.distributed collectives or p2p
(``tests/test_distributed_layer.py``).
"""
