"""The 3D grid: layout arithmetic, real process groups on 1/2/4/8 ranks, and error messages."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from merak.launch.env import first_slurm_host, read_launch_env
from merak.runtime.distributed.grid import Grid, GridError, GridLayout, ParallelDims


def factorizations(world: int) -> list[ParallelDims]:
    return [
        ParallelDims(dp=dp, tp=tp, pp=world // (dp * tp))
        for dp, tp in itertools.product(range(1, world + 1), repeat=2)
        if world % (dp * tp) == 0
    ]


def expected_coords(dims: ParallelDims) -> dict[int, tuple[int, int, int]]:
    """Independent statement of the rank order: tp fastest, then dp, then pp."""
    order = itertools.product(range(dims.pp), range(dims.dp), range(dims.tp))
    return {rank: coord for rank, coord in enumerate(order)}


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_layout_every_factorization(world):
    for dims in factorizations(world):
        layout = GridLayout(dims)
        coords = expected_coords(dims)
        for rank, (pp, dp, tp) in coords.items():
            c = layout.coord_of(rank)
            assert (c.pp, c.dp, c.tp) == (pp, dp, tp)
            assert layout.rank_of(pp, dp, tp) == rank
        for kind, varying in (("tp", 2), ("dp", 1), ("pp", 0)):
            groups = list(getattr(layout, f"{kind}_groups")())
            assert sorted(r for g in groups for r in g) == list(range(world)), kind
            for g in groups:  # members differ only in the coordinate of that kind
                fixed = {tuple(v for i, v in enumerate(coords[r]) if i != varying) for r in g}
                assert len(fixed) == 1, (kind, g)


def _check_all_layouts(world: int) -> list[str]:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    seen = []
    for dims in factorizations(world):
        grid = Grid.build(dims)
        pp, dp, tp = expected_coords(dims)[rank]
        assert (grid.coord.pp, grid.coord.dp, grid.coord.tp) == (pp, dp, tp)
        # Each group really connects the ranks the layout says: all_gather proves membership.
        in_tie = pp in (0, dims.pp - 1)
        assert grid.tied_ranks == (sorted({grid.pp_ranks[0], grid.pp_ranks[-1]}) if in_tie else [])
        assert (grid.tied_group is None) == (not in_tie or world == 1)
        for kind in ("tp", "dp", "pp", "tied") if in_tie else ("tp", "dp", "pp"):
            group, ranks = getattr(grid, f"{kind}_group"), getattr(grid, f"{kind}_ranks")
            out = [torch.zeros(1) for _ in ranks]
            dist.all_gather(out, torch.tensor([float(rank)]), group=group)
            assert [int(t.item()) for t in out] == ranks, (dims, kind, out, ranks)
        prev = None if pp == 0 else GridLayout(dims).rank_of(pp - 1, dp, tp)
        nxt = None if pp == dims.pp - 1 else GridLayout(dims).rank_of(pp + 1, dp, tp)
        assert (grid.prev_rank, grid.next_rank) == (prev, nxt)
        seen.append(str(dims))
    return seen


@pytest.mark.parametrize("world", [2, 4, 8])
def test_process_groups_every_factorization(dist_run, world):
    results = dist_run(_check_all_layouts, world, world, timeout=240)
    assert all(r == [str(d) for d in factorizations(world)] for r in results)


def test_single_process_init():
    import merak

    try:
        grid = merak.init()
        assert grid.dims == ParallelDims(1, 1, 1) and grid.is_first_stage and grid.is_last_stage
        assert merak.get_grid() is grid and merak.init(dp=1, tp=1, pp=1) is grid
        with pytest.raises(GridError, match="already called with dp=1 tp=1 pp=1"):
            merak.init(dp=1, tp=1, pp=2)
    finally:
        merak.shutdown()


def _init_with(dp: int, tp: int, pp: int) -> str:
    import merak

    grid = merak.init(dp=dp, tp=tp, pp=pp)
    return grid.describe()


def test_init_under_launcher_env(dist_run):
    out = dist_run(_init_with, 4, 2, 1, 2)
    assert out[3].startswith("rank 3: stage(pp)=1/2 dp=1/2 tp=0/1")


@pytest.mark.parametrize(
    "degrees, world, pattern",
    [
        ((3, 1, 1), 2, r"dp\*tp\*pp = 3\*1\*1 = 3, but the job has world_size=2.*dp=2"),
        ((0, 1, 2), 2, r"dp=0: parallel degrees must be positive"),
        ((1, -2, 1), 1, r"tp=-2: parallel degrees must be positive"),
    ],
)
def test_bad_degrees_fail_before_any_collective(degrees, world, pattern):
    with pytest.raises(GridError, match=pattern):
        ParallelDims(*degrees).validate(world)


def test_bad_world_size_under_launcher(dist_run):
    from dist_harness import RankFailed

    with pytest.raises(RankFailed, match=r"GridError: dp\*tp\*pp = 2\*2\*2 = 8, but the job has world_size=2"):
        dist_run(_init_with, 2, 2, 2, 2, timeout=60)


def test_launcher_env_parsing():
    torchrun = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr,
            torchrun.master_port) == (3, 8, 1, "n1", 1234)
    slurm = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                             "SLURM_JOB_NODELIST": "gpu[003-005,009]"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.launcher) == \
        (5, 16, 1, "gpu003", "slurm")
    assert read_launch_env({}).world_size == 1
    assert first_slurm_host("a17,b2") == "a17"
