"""The distributed layer: the process grid and point-to-point communication.

* :mod:`.grid` - ranks -> (dp, tp, pp) coordinates and the process groups of each dimension;
* :mod:`.p2p` - pipeline sends and receives with timeouts that name rank, peer and what.
"""
