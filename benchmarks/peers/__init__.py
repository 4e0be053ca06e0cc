"""Runners of the pipeline-throughput benchmark; importing this package registers all of them.

The registry API lives in :mod:`benchmarks.peers.registry`; each other module registers the
runners of one framework. Framework imports (DeepSpeed, Merak's runtime) happen inside the
runner functions, so listing runners never needs those frameworks installed.
"""

# Import order is registration order, which is the order of the table: baseline, peers, Merak,
# references.
from benchmarks.peers import single_process  # noqa: F401  isort: skip
from benchmarks.peers import deepspeed_pipe, torch_pipelining  # noqa: F401  isort: skip
from benchmarks.peers import merak_runners  # noqa: F401  isort: skip
from benchmarks.peers import references  # noqa: F401  isort: skip
from benchmarks.peers.registry import BenchContext, RankResult, Runner, register_runner, runners

__all__ = ["BenchContext", "RankResult", "Runner", "register_runner", "runners"]
