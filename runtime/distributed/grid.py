"""The 3D process grid: which global rank holds which (pipeline, data, tensor) coordinate.

Rank order is **tp fastest, then dp, then pp**:  ``rank = (pp * dp_size + dp) * tp_size + tp``.
Tensor-parallel peers exchange activations every layer, so they get consecutive ranks and stay
inside one node (launchers place consecutive ranks on the same host); pipeline neighbours talk
least often, so they may sit on different nodes.

The layout arithmetic (:class:`GridLayout`) is pure and testable without processes; the
:class:`Grid` adds the ``torch.distributed`` process groups built from it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Iterator

import torch.distributed as dist

from merak.runtime.distributed import groups


class GridError(ValueError):
    """Invalid parallel degrees; the message names the numbers and how to fix them."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of data, tensor and pipeline parallelism."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def validate(self, world_size: int) -> None:
        """Raise :class:`GridError` unless the degrees are positive and fill ``world_size``."""
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GridError(f"{name}={value!r}: parallel degrees must be positive integers")
        if self.world_size != world_size:
            hint = f"degrees whose product is {world_size}"
            if world_size % (self.tp * self.pp) == 0:
                hint += f" (for example dp={world_size // (self.tp * self.pp)} with tp={self.tp}, pp={self.pp})"
            raise GridError(
                f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.world_size}, but the job has "
                f"world_size={world_size} processes. Launch {self.world_size} processes, or choose "
                f"{hint}."
            )

    def __str__(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp}"


@dataclass(frozen=True)
class Coord:
    """A rank's position in the grid. ``pp`` is also its pipeline stage id."""

    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class GridLayout:
    """Pure rank arithmetic for a :class:`ParallelDims` (no processes needed)."""

    dims: ParallelDims

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        d = self.dims
        if not (0 <= pp < d.pp and 0 <= dp < d.dp and 0 <= tp < d.tp):
            raise IndexError(f"coordinate (pp={pp}, dp={dp}, tp={tp}) outside grid {d}")
        return (pp * d.dp + dp) * d.tp + tp

    def coord_of(self, rank: int) -> Coord:
        d = self.dims
        if not 0 <= rank < d.world_size:
            raise IndexError(f"rank {rank} outside grid of {d.world_size} ranks")
        tp = rank % d.tp
        dp = (rank // d.tp) % d.dp
        pp = rank // (d.tp * d.dp)
        return Coord(pp=pp, dp=dp, tp=tp)

    # Each *_groups() yields every group of that kind, in an order identical on all ranks
    # (torch.distributed.new_group must be called collectively in the same order).
    def _groups(self, varying: str) -> Iterator[list[int]]:
        """Groups whose members differ only in the ``varying`` coordinate."""
        sizes = {"pp": self.dims.pp, "dp": self.dims.dp, "tp": self.dims.tp}
        outer, inner = (axis for axis in ("pp", "dp", "tp") if axis != varying)
        for a in range(sizes[outer]):
            for b in range(sizes[inner]):
                yield [self.rank_of(**{outer: a, inner: b, varying: v}) for v in range(sizes[varying])]

    def tp_groups(self) -> Iterator[list[int]]:
        return self._groups("tp")

    def dp_groups(self) -> Iterator[list[int]]:
        return self._groups("dp")

    def pp_groups(self) -> Iterator[list[int]]:
        return self._groups("pp")

    def tied_groups(self) -> Iterator[list[int]]:
        """First and last stage of each pipeline: they share tied weights (embedding/LM head)."""
        for ranks in self.pp_groups():
            yield sorted({ranks[0], ranks[-1]})

    def group_containing(self, kind: str, rank: int) -> list[int]:
        """Ranks of the ``kind`` group holding ``rank``; ``[]`` for a middle stage's tie group."""
        for ranks in getattr(self, f"{kind}_groups")():
            if rank in ranks:
                return ranks
        return []


@dataclass
class Grid:
    """This rank's view of the 3D grid, with its process groups.

    ``tp_group``/``dp_group``/``pp_group``/``tied_group`` are ``None`` in a single-process run
    (world size 1) where no collective is needed.
    """

    dims: ParallelDims
    rank: int
    layout: GridLayout = field(init=False)
    coord: Coord = field(init=False)
    tp_ranks: list[int] = field(init=False)
    dp_ranks: list[int] = field(init=False)
    pp_ranks: list[int] = field(init=False)
    tied_ranks: list[int] = field(init=False)
    tp_group: dist.ProcessGroup | None = field(init=False, default=None, repr=False)
    dp_group: dist.ProcessGroup | None = field(init=False, default=None, repr=False)
    pp_group: dist.ProcessGroup | None = field(init=False, default=None, repr=False)
    tied_group: dist.ProcessGroup | None = field(init=False, default=None, repr=False)
    #: A gloo group over the world for small host-side control messages (p2p headers) in a job
    #: whose default group is on an accelerator; ``None`` when the default group is host-side.
    host_group: dist.ProcessGroup | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.layout = GridLayout(self.dims)
        self.coord = self.layout.coord_of(self.rank)
        for kind in ("tp", "dp", "pp", "tied"):
            setattr(self, f"{kind}_ranks", self.layout.group_containing(kind, self.rank))

    @classmethod
    def build(
        cls, dims: ParallelDims, timeout: datetime.timedelta | None = None
    ) -> "Grid":
        """Create the grid and its process groups. Collective: every rank must call it."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        dims.validate(world)
        rank = dist.get_rank() if dist.is_initialized() else 0
        grid = cls(dims, rank)
        if world > 1:
            for kind in ("tp", "dp", "pp", "tied"):
                for ranks in getattr(grid.layout, f"{kind}_groups")():
                    group = dist.new_group(ranks, timeout=timeout)
                    if rank in ranks:
                        setattr(grid, f"{kind}_group", group)
            grid.host_group = groups.new_host_group(timeout)
        return grid

    # ---- convenience views -------------------------------------------------------------
    @property
    def stage_id(self) -> int:
        return self.coord.pp

    @property
    def num_stages(self) -> int:
        return self.dims.pp

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.dims.pp - 1

    @property
    def prev_rank(self) -> int | None:
        """Global rank of the previous pipeline stage (same dp, tp), or None on stage 0."""
        c = self.coord
        return None if self.is_first_stage else self.layout.rank_of(c.pp - 1, c.dp, c.tp)

    @property
    def next_rank(self) -> int | None:
        """Global rank of the next pipeline stage (same dp, tp), or None on the last stage."""
        c = self.coord
        return None if self.is_last_stage else self.layout.rank_of(c.pp + 1, c.dp, c.tp)

    def describe(self) -> str:
        c = self.coord
        return (
            f"rank {self.rank}: stage(pp)={c.pp}/{self.dims.pp} dp={c.dp}/{self.dims.dp} "
            f"tp={c.tp}/{self.dims.tp} prev={self.prev_rank} next={self.next_rank} "
            f"tp_ranks={self.tp_ranks} dp_ranks={self.dp_ranks} pp_ranks={self.pp_ranks}"
        )
