"""Layout-invariant batches: global step k reads the same samples whatever (dp, tp, pp).

The global batch of a step is ``G = micro_batch × num_microbatches × dp`` consecutive indices
of one seeded permutation per epoch. Replica ``r`` takes the ``r``-th contiguous slice and
splits it into micro-batches. Since the sample set of a step depends only on the seed, the
epoch and ``G``, changing the layout while keeping ``G`` reproduces the single-process loss
curve, and resuming needs no sampler state: the data position *is* the global step.

Every stage of a replica builds the same micro-batches; the executor's ``LOAD`` keeps only the
keys the stage reads, so labels are used only on the last stage and inputs on the first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

Collate = Callable[[list[Any]], dict[str, Any]]


@dataclass
class StepBatches:
    """Random access to the micro-batches of any global step for one DP replica."""

    dataset: Sequence[Any]
    collate: Collate
    micro_batch_size: int
    num_microbatches: int
    dp_size: int
    dp_rank: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(self.dataset)} samples but one step needs "
                f"{self.global_batch_size} (micro-batch {self.micro_batch_size} × "
                f"{self.num_microbatches} micro-batches × dp {self.dp_size}); use a larger dataset "
                f"or smaller per_device_train_batch_size / gradient_accumulation_steps"
            )
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size  # the incomplete last batch is dropped

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(len(self.dataset), generator=g)
            else:
                self._order = torch.arange(len(self.dataset))
            self._order_epoch = epoch
        return self._order

    def sample_indices(self, step: int) -> list[int]:
        """Indices this replica reads at global ``step`` (all its micro-batches, in order)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order_of(epoch)
        per_replica = self.micro_batch_size * self.num_microbatches
        start = within * self.global_batch_size + self.dp_rank * per_replica
        return order[start:start + per_replica].tolist()

    def microbatches(self, step: int) -> list[dict[str, Any]]:
        idx = self.sample_indices(step)
        b = self.micro_batch_size
        return [self.collate([self.dataset[i] for i in idx[j:j + b]]) for j in range(0, len(idx), b)]


def eval_microbatches(dataset: Sequence[Any], collate: Collate, micro_batch_size: int,
                      dp_size: int, dp_rank: int) -> list[dict[str, Any]]:
    """This replica's share of an evaluation set, in order, as micro-batches (tail kept)."""
    idx = list(range(dp_rank, len(dataset), dp_size))
    return [collate([dataset[i] for i in idx[j:j + micro_batch_size]])
            for j in range(0, len(idx), micro_batch_size)]


class TrainLoader:
    """What HF's training loop sees as its train dataloader (``len``, ``dataset``, iteration):
    one DP replica's micro-batches of an epoch. Merak's loop reads steps by index
    (:meth:`step`), so the data position of a resumed run is its global step."""

    def __init__(self, batches: StepBatches) -> None:
        self.batches = batches
        self.dataset = batches.dataset
        self.batch_size = batches.micro_batch_size

    def __len__(self) -> int:
        return self.batches.steps_per_epoch * self.batches.num_microbatches

    def step(self, index: int) -> list[dict[str, Any]]:
        return self.batches.microbatches(index)

    def step_of(self, epoch: int, index: int) -> list[dict[str, Any]]:
        """Step ``index`` of ``epoch``: global step ``epoch × steps_per_epoch + index``."""
        return self.batches.microbatches(epoch * self.batches.steps_per_epoch + index)

    def __iter__(self) -> Any:
        for step in range(self.batches.steps_per_epoch):
            yield from self.batches.microbatches(step)


class EvalLoader:
    """One DP replica's share of an evaluation set: global micro-batch ``i`` (consecutive samples,
    tail kept) goes to replica ``i % dp``. ``indices`` are the global micro-batch numbers, so
    gathered predictions are put back in dataset order."""

    def __init__(self, dataset: Sequence[Any], collate: Collate, micro_batch_size: int,
                 dp_size: int, dp_rank: int) -> None:
        self.dataset, self.batch_size = dataset, micro_batch_size
        self._collate = collate
        total = -(-len(dataset) // micro_batch_size)
        self.indices = list(range(dp_rank, total, dp_size))
        self.num_microbatches = total

    def __len__(self) -> int:
        return len(self.indices)

    def microbatch(self, index: int) -> dict[str, Any]:
        b = self.batch_size
        return self._collate([self.dataset[i] for i in range(index * b, min((index + 1) * b, len(self.dataset)))])

    def __iter__(self) -> Any:
        for index in self.indices:
            yield self.microbatch(index)


class StreamLoader:
    """An ``IterableDataset`` (a stream, no ``len``) behind HF's loop, which then sizes training
    by ``max_steps``: every rank reads the same stream, global step ``k`` of an epoch is its next
    ``G = micro-batch × micro-batches × dp`` samples and replica ``r`` takes the ``r``-th slice,
    so a step reads the same samples in every layout, as :class:`StepBatches` does. Steps are
    read in order; asking for an earlier step (a new epoch) restarts the stream, and a resumed run
    skips the samples of the steps already done. :meth:`step` returns ``None`` when fewer than
    ``G`` samples remain: the epoch ends there (an incomplete global batch is dropped)."""

    def __init__(self, dataset: Any, collate: Collate, micro_batch_size: int, num_microbatches: int,
                 dp_size: int, dp_rank: int) -> None:
        self.dataset, self.batch_size, self._collate = dataset, micro_batch_size, collate
        self.num_microbatches, self.dp_size, self.dp_rank = num_microbatches, dp_size, dp_rank
        self._iterator: Any = None
        self._next = 0  # the step the iterator is positioned at, within the current pass

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_microbatches * self.dp_size

    def step(self, index: int) -> list[dict[str, Any]] | None:
        """Micro-batches of step ``index`` of the current pass over the stream."""
        if self._iterator is None or index < self._next:
            self._iterator, self._next = iter(self.dataset), 0
        while self._next <= index:
            samples = list(itertools.islice(self._iterator, self.global_batch_size))
            self._next += 1
            if len(samples) < self.global_batch_size:
                self._iterator, self._next = None, 0
                return None
        per_replica = self.batch_size * self.num_microbatches
        mine = samples[self.dp_rank * per_replica:(self.dp_rank + 1) * per_replica]
        b = self.batch_size
        return [self._collate(mine[j:j + b]) for j in range(0, per_replica, b)]

    def step_of(self, epoch: int, index: int) -> list[dict[str, Any]] | None:
        return self.step(index)

    def __iter__(self) -> Any:
        index = 0
        while (batches := self.step(index)) is not None:
            yield from batches
            index += 1
