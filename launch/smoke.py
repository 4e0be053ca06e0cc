"""Smoke job: join the launcher's job, build the 3D grid, prove every group communicates.

Each rank prints its coordinates; then one all-reduce per group kind and one activation /
gradient hop along each pipeline check the wiring. Run it with any launcher::

    merak-run --nproc 8 --module merak.launch.smoke --dp 2 --tp 2 --pp 2
    torchrun --nproc-per-node 8 -m merak.launch.smoke --dp 2 --tp 2 --pp 2
"""

from __future__ import annotations

import argparse

import torch

import merak
from merak.runtime.distributed import collectives
from merak.runtime.distributed.p2p import P2P


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args, _launcher_extras = parser.parse_known_args(argv)  # deepspeed appends --local_rank
    grid = merak.init(dp=args.dp, tp=args.tp, pp=args.pp)
    c = grid.coord
    print(f"[merak] rank {grid.rank}/{grid.dims.world_size}: pp={c.pp} dp={c.dp} tp={c.tp} "
          f"prev={grid.prev_rank} next={grid.next_rank}", flush=True)

    # Every group sums its members' ranks; compare with the layout's own answer.
    for kind in ("tp", "dp", "pp"):
        group = getattr(grid, f"{kind}_group")
        (got,) = collectives.reduce_values([float(grid.rank)], f"the smoke all-reduce of the {kind} group", group=group)
        expected = float(sum(getattr(grid, f"{kind}_ranks")))
        assert got == expected, f"{kind} group sum {got} != {expected}"

    # An activation travels down the pipeline and a gradient back up.
    p2p = P2P.for_grid(grid, merak.get_device())
    act = torch.zeros(1, device=merak.get_device()) if grid.is_first_stage else p2p.recv(grid.prev_rank, "smoke activation")
    act = act + 1
    if not grid.is_last_stage:
        p2p.send(act, grid.next_rank, "smoke activation")
        grad = p2p.recv(grid.next_rank, "smoke gradient")
    else:
        grad = act
    if not grid.is_first_stage:
        p2p.send(grad, grid.prev_rank, "smoke gradient")
    p2p.wait_sends()
    assert grad.item() == grid.num_stages, (grad.item(), grid.num_stages)
    collectives.barrier("the smoke job's final barrier")
    if grid.rank == 0:
        print(f"[merak] OK: {grid.dims} grid on {grid.dims.world_size} ranks; groups and "
              f"pipeline p2p verified", flush=True)
    merak.shutdown()


if __name__ == "__main__":
    main()
