"""Memory accounting over one stage's instruction list (order only, no timing).

Two measures, both counted in micro-batches of this stage:

* **in flight**: micro-batches forwarded and not yet finished backward. Each one pins at least
  its stage input (the recomputation checkpoint) and its pipeline buffers. A micro-batch is
  finished at ``BACKWARD`` or, in zero-bubble schedules, at ``BACKWARD_WEIGHT`` (weight
  gradients still need the layer inputs, so activations live until then).
* **activations**: how many micro-batches' worth of the stage's saved activations are alive,
  given that a recomputed micro-batch keeps only ``1 - fraction`` of them between its forward
  and its ``RECOMPUTE``, and all of them from the ``RECOMPUTE`` to the end of its backward.
  Stage inputs are ignored here (they are the in-flight count's business); for transformer
  stages they are a small fraction of one layer's activations.

With virtual stages a stage (rank) holds several model chunks; the in-flight count is then of
(chunk, micro-batch) pairs, and a chunk's micro-batch weighs ``chunk_weight`` (``1/v`` for
``v`` equal chunks) so activations stay in units of a whole stage's micro-batch, comparable
with a schedule without chunks. Chunks of one rank may drop different fractions (a
per-chunk ``fraction`` sequence), and :func:`chunk_peak_inflight` counts each chunk alone: the
stage-aware rule for virtual stages (:mod:`merak.runtime.memory.stage_aware`) reads both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

from merak.runtime.pipeline.instructions import Instruction, Op

#: Instructions after which a micro-batch holds no activations on the stage any more.
FREEING_OPS = frozenset({Op.BACKWARD, Op.BACKWARD_WEIGHT})
#: Instructions during which all of a micro-batch's activations are alive.
_MATERIALIZING_OPS = frozenset({Op.RECOMPUTE, Op.BACKWARD, Op.BACKWARD_INPUT})


def peak_inflight(ops: Iterable[Instruction]) -> int:
    """Largest number of (chunk, micro-batch) pairs forwarded but not yet freed, over the list."""
    live: set[tuple[int, int]] = set()
    peak = 0
    for ins in ops:
        if ins.op is Op.FORWARD:
            live.add(ins.key)
            peak = max(peak, len(live))
        elif ins.op in FREEING_OPS:
            live.discard(ins.key)
    return peak


def chunk_peak_inflight(ops: Iterable[Instruction], num_chunks: int = 1) -> tuple[int, ...]:
    """Per chunk of the stage, the largest number of its micro-batches forwarded but not yet
    freed (:func:`peak_inflight` over that chunk's instructions alone)."""
    ops = list(ops)
    return tuple(peak_inflight(ins for ins in ops if ins.chunk == chunk) for chunk in range(num_chunks))


Recomputed = Collection[int] | Collection[tuple[int, int]]
#: One fraction for every chunk of the stage, or one per chunk (indexed by chunk).
Fraction = float | Sequence[float]


def _keys(recomputed: Recomputed) -> set[tuple[int, int]]:
    """Micro-batch indices (chunk 0) or (chunk, micro-batch) pairs → pairs."""
    return {r if isinstance(r, tuple) else (0, r) for r in recomputed}


def peak_activations(
    ops: Iterable[Instruction], fraction: Fraction, recomputed: Recomputed | None = None,
    chunk_weight: float = 1.0,
) -> float:
    """Largest amount of saved activations alive at once (in micro-batch units) when the stage
    drops ``fraction`` of a forward's activations for every micro-batch it recomputes."""
    return max(activation_profile(ops, fraction, recomputed, chunk_weight), default=0.0)


def activation_profile(
    ops: Iterable[Instruction], fraction: Fraction, recomputed: Recomputed | None = None,
    chunk_weight: float = 1.0,
) -> list[float]:
    """Saved activations alive at each instruction of ``ops`` (measured after a forward or a
    recomputation, and during a backward, before it frees its micro-batch).

    ``recomputed`` defaults to the micro-batches with a ``RECOMPUTE`` in ``ops``; passing it
    lets a schedule price a compute-only order before recomputation is inserted (a recomputed
    micro-batch is then taken to be fully materialized from its backward's start).
    ``fraction`` may give each chunk its own share (a sequence indexed by chunk).
    """
    ops = list(ops)
    dropped = _per_chunk(fraction)
    keys = {ins.key for ins in ops if ins.op is Op.RECOMPUTE} if recomputed is None else _keys(recomputed)
    held: dict[tuple[int, int], float] = {}
    total = 0.0
    profile: list[float] = []
    for ins in ops:
        if ins.microbatch is None:
            profile.append(total)
            continue
        key = ins.key
        if ins.op is Op.FORWARD or ins.op in _MATERIALIZING_OPS:
            kept = ins.op is Op.FORWARD and key in keys
            new = chunk_weight * (1.0 - dropped(key[0])) if kept else chunk_weight
            total += new - held.get(key, 0.0)
            held[key] = new
        # Rounded: a running sum drifts by ulps that would make equal peaks compare unequal.
        profile.append(round(total, 12))
        if ins.op in FREEING_OPS:
            total -= held.pop(key, 0.0)
    return profile


def _per_chunk(fraction: Fraction) -> Callable[[int], float]:
    """``fraction`` as a function of the chunk."""
    if isinstance(fraction, (int, float)):
        value = float(fraction)
        return lambda chunk: value
    values = tuple(float(f) for f in fraction)
    return values.__getitem__
