"""Apply a :class:`~merak.runtime.tensor_parallel.plan.TPPlan` to one pipeline stage.

``apply_tensor_parallel(stage, grid, plan)`` changes the stage in place and returns it (the
torchtitan shape: a parallelism is a function of a module and a mesh):

1. **Layers.** Each module the plan names is replaced *in the stage* by a sharded copy; the
   user's model is not modified (a stage built from a real-weight model shares its modules, and
   the original model is still needed for export). Column layers stay ``nn.Linear`` / ``Conv1D``
   with fewer output features (so zero-bubble's weight-gradient deferral still applies to them);
   row layers become :class:`RowParallelLinear` (either layout); embeddings become
   :class:`VocabParallelEmbedding`; mixture-of-experts banks become the sharded banks of
   :mod:`.experts`. Parameters keep their names; a parameter shared by several
   modules (GPT-2's ``wte`` / ``lm_head``) is sharded once and stays shared.
2. **Graph.** Constants recorded by the plan are rewritten (``split(768)`` -> ``split(384)``),
   ``copy`` / ``scatter`` ops are inserted where replicated values enter sharded regions, and the
   LM head's ``cross_entropy`` becomes the vocab-parallel one. Random ops whose output is
   sharded (dropout on this rank's attention heads) are wrapped in :class:`.random.ShardedRandom`
   so they draw from the TP rank's own stream; replicated ones keep the default stream, seeded
   alike on every TP rank.
3. **Bookkeeping** on the stage: ``tp_plan``, ``tp_group``, ``tp_param_specs`` (parameter name ->
   :class:`ShardSpec`, for the gradient norm and for export), ``tp_sharded_outputs`` and
   ``tp_rng`` (the :class:`.random.TPRNGTracker`).
4. With ``sub_microbatches > 1`` the stage's forward becomes the interleaved runner of
   :mod:`.tp_interleave`.
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from merak.partitioner.proxy_graph import mutated_input
from merak.partitioner.stage import StageChunks
from merak.runtime.distributed.grid import Grid
from merak.runtime.tensor_parallel.experts import shard_expert_bank
from merak.runtime.tensor_parallel.layers import (
    CopyToTP,
    ReduceFromTP,
    RowParallelLinear,
    ScatterToTP,
    ShardSpec,
    TPGroup,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
    VocabShardLookup,
)
from merak.runtime.tensor_parallel.plan import Edit, LayerPlan, TPError, TPPlan
from merak.runtime.tensor_parallel.random import ShardedRandom, TPRNGTracker, is_random_op
from merak.runtime.tensor_parallel.sites import EmbeddingSite, LinearSite

logger = logging.getLogger(__name__)

__all__ = ["apply_tensor_parallel", "tp_local_shape", "sharded_parameters", "COPY_MODULE", "SCATTER_MODULE",
           "CROSS_ENTROPY_MODULE", "REDUCE_MODULE", "LOOKUP_MODULE"]

COPY_MODULE = "_merak_tp_copy"
SCATTER_MODULE = "_merak_tp_scatter"
CROSS_ENTROPY_MODULE = "_merak_tp_cross_entropy"
REDUCE_MODULE = "_merak_tp_reduce"
RANDOM_MODULE_PREFIX = "_merak_tp_rng_"
LOOKUP_MODULE = "_merak_tp_vocab_lookup"
_TP_ATTRIBUTES = ("tp_plan", "tp_group", "tp_param_specs", "tp_sharded_outputs", "tp_sub_microbatches", "tp_rng")


def tp_local_shape(shape: Any, index: int, tp: int) -> tuple[Any, ...]:
    """``shape`` with entry ``index`` divided by ``tp`` (a full size used where a local one is needed)."""
    values = list(shape)
    values[index] = values[index] // tp
    return tuple(values)


def apply_tensor_parallel(stage: nn.Module, grid: Grid, plan: TPPlan, sub_microbatches: int = 1,
                          timeout_s: float = 300.0, seed: int = 0) -> nn.Module:
    """Shard ``stage`` (a :class:`~merak.partitioner.StageModule`) over ``grid``'s tensor-parallel
    group following ``plan``; returns the same stage object.

    ``plan`` must have been made for ``grid.dims.tp`` ranks from the graph the stage was cut
    from (:func:`merak.runtime.tensor_parallel.plan_tensor_parallel`). ``sub_microbatches`` > 1
    splits every micro-batch along the batch and overlaps one part's all-reduces with another's
    compute (results equal those of 1). ``seed`` (the user's) seeds the TP rank's own stream for
    dropout on sharded activations (``seed + TP_SEED_OFFSET + tp rank``).

    ``stage`` may also be a :class:`~merak.partitioner.StageChunks` (a rank's model chunks
    under virtual stages): every chunk is sharded by the same plan (each carries its own specs)
    over the one TP group and RNG stream, and a parameter two chunks share (the V placement's
    embedding and LM head on rank 0) becomes one shard, so it stays one ``Parameter``. The
    :class:`StageChunks` reads the merged specs from its chunks.
    """
    tp = grid.dims.tp
    if plan.tp != tp:
        raise TPError(f"the plan was made for tp={plan.tp} but the grid has tp={tp}; plan again with tp={tp}")
    if getattr(stage, "tp_plan", None) is not None:
        raise TPError("tensor parallelism was already applied to this stage")
    if sub_microbatches > 1 and plan.batch_coupled:
        raise TPError(f"tp_sub_microbatches={sub_microbatches} computes the loss per slice of a micro-batch, but "
                      f"{plan.batch_coupled}, so the loss would change; set tp_sub_microbatches=1 (or turn the "
                      f"auxiliary loss off in the model's config)")
    tpg = TPGroup(grid.tp_group, grid.coord.tp, tp, timeout_s)
    tracker = TPRNGTracker(seed, tpg.rank)
    chunks = list(stage.chunks) if isinstance(stage, StageChunks) else [stage]
    done: dict[int, nn.Parameter] = {}  # old parameter id -> its shard, shared by the chunks (ties survive)
    originals = [p for chunk in chunks for p in chunk.parameters()]  # kept alive: ids in ``done`` stay unique
    for chunk in chunks:
        _apply_to_stage(chunk, plan, tpg, tracker, done, sub_microbatches)
    del originals
    return stage


def _apply_to_stage(stage: nn.Module, plan: TPPlan, tpg: TPGroup, tracker: TPRNGTracker,
                    done: dict[int, nn.Parameter], sub_microbatches: int) -> None:
    """Shard one stage module (a whole stage, or one model chunk of a rank) and record the
    bookkeeping on it."""
    specs = _shard_modules(stage, plan, tpg, done)
    _rewrite_graph(stage, plan, tpg, tracker)
    stage.tp_plan = plan
    stage.tp_group = tpg
    stage.tp_param_specs = specs
    stage.tp_sharded_outputs = dict(plan.sharded_outputs)
    stage.tp_sub_microbatches = sub_microbatches
    stage.tp_rng = tracker
    if hasattr(stage, "_STAGE_ATTRIBUTES"):  # StageModule.__deepcopy__ carries these over
        stage._STAGE_ATTRIBUTES = tuple(dict.fromkeys((*stage._STAGE_ATTRIBUTES, *_TP_ATTRIBUTES)))
    if sub_microbatches > 1:
        from merak.runtime.tensor_parallel.interleave import install_sub_microbatching

        install_sub_microbatching(stage, sub_microbatches)


def sharded_parameters(stage: nn.Module) -> dict[str, ShardSpec]:
    """Local parameter name -> :class:`ShardSpec` of every TP-sharded parameter of ``stage``
    (empty without tensor parallelism)."""
    return dict(getattr(stage, "tp_param_specs", {}) or {})


# ---- layers -------------------------------------------------------------------------------------------
def _clone(module: nn.Module) -> nn.Module:
    """A shallow copy owning its own parameter/buffer/submodule tables (the user's module is untouched)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


def _new_param(old: nn.Parameter, spec: ShardSpec, tpg: TPGroup, done: dict[int, nn.Parameter]) -> nn.Parameter:
    """The shard of ``old`` (created once per parameter, so ties survive)."""
    if id(old) in done:
        return done[id(old)]
    if old.device.type == "meta":
        raise TPError("cannot shard a parameter that is still on the meta device; build the stage with real weights")
    new = nn.Parameter(spec.local(old.detach(), tpg.rank), requires_grad=old.requires_grad)
    done[id(old)] = new
    return new


def _sharded_layer(module: nn.Module, layer: LayerPlan, tpg: TPGroup,
                   done: dict[int, nn.Parameter]) -> tuple[nn.Module, dict[str, ShardSpec]]:
    tp, conv1d = tpg.size, layer.kind == "Conv1D"
    if layer.style == "column":
        new = _clone(module)
        wspec = ShardSpec(1 if conv1d else 0, tp, layer.blocks)
        bspec = ShardSpec(0, tp, layer.blocks)
        new.weight = _new_param(module.weight, wspec, tpg, done)
        specs = {"weight": wspec}
        if getattr(module, "bias", None) is not None:
            new.bias = _new_param(module.bias, bspec, tpg, done)
            specs["bias"] = bspec
        if conv1d:
            new.nf = new.weight.shape[1]
        else:
            new.out_features = new.weight.shape[0]
        new.tp_spec = specs
        return new, specs
    if layer.style == "row":
        spec = ShardSpec(0 if conv1d else 1, tp)
        weight = _new_param(module.weight, spec, tpg, done)
        return RowParallelLinear(weight, module.bias, tpg, spec, transposed=conv1d), {"weight": spec}
    if layer.style == "vocab":
        spec = ShardSpec(0, tp)
        weight = _new_param(module.weight, spec, tpg, done)
        return VocabParallelEmbedding(module, weight, tpg, spec), {"weight": spec}
    raise TPError(f"unknown style {layer.style!r} for {layer.module}")


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    owner._modules[name] = module


def _shard_modules(stage: nn.Module, plan: TPPlan, tpg: TPGroup, done: dict[int, nn.Parameter]) -> dict[str, ShardSpec]:
    """Replace the stage's planned modules by sharded ones; returns local parameter name ->
    spec. ``done`` (old parameter id -> shard) is shared by all chunks of a rank, so a
    parameter two chunks hold is sharded once and stays one object."""
    targets = list(dict.fromkeys(str(n.target) for n in stage.graph.nodes if n.op == "call_module"))
    replaced: dict[int, nn.Module] = {}
    for target in targets:
        layer = plan.layers.get(target)
        if layer is None or layer.style == "replicate":
            continue
        module = stage.get_submodule(target)
        if id(module) not in replaced:
            replaced[id(module)] = _sharded_layer(module, layer, tpg, done)[0]
        _set_module(stage, target, replaced[id(module)])
    for target in targets:
        if target in plan.experts:
            module = stage.get_submodule(target)
            if id(module) not in replaced:
                replaced[id(module)] = shard_expert_bank(
                    module, plan.experts[target], tpg, lambda p, spec: _new_param(p, spec, tpg, done))
            _set_module(stage, target, replaced[id(module)])
    functional = _shard_functional_sites(stage, plan, tpg, done)
    # Other holders of a sharded parameter (a shared module under another name, a get_attr of a
    # tied bias): point them at the shard too, copying user modules before touching them.
    for path, module in list(stage.named_modules(remove_duplicate=False)):
        if id(module) in {id(m) for m in replaced.values()}:
            continue
        hits = [n for n, p in module._parameters.items() if p is not None and id(p) in done]
        if not hits:
            continue
        owner = module if (type(module) is nn.Module or module is stage) else _clone(module)
        for n in hits:
            owner._parameters[n] = done[id(module._parameters[n])]
        if owner is not module and path:
            _set_module(stage, path, owner)
    specs: dict[str, ShardSpec] = {}
    by_param: dict[int, ShardSpec] = dict(functional)
    for module in replaced.values():
        for name, spec in getattr(module, "tp_spec", {}).items():
            by_param[id(getattr(module, name))] = spec
    for name, p in stage.named_parameters(remove_duplicate=False):
        if id(p) in by_param:
            specs[name] = by_param[id(p)]
    return specs


def _functional_specs(site: LinearSite | EmbeddingSite, layer: LayerPlan, tp: int) -> list[tuple[int, ShardSpec]]:
    """(argument position, spec) of each parameter a functional site shards."""
    if isinstance(site, EmbeddingSite):
        return [(site.weight, ShardSpec(0, tp))]
    if layer.style == "column":
        out = [(site.weight, ShardSpec(1 if site.transposed else 0, tp, layer.blocks))]
        return out + ([(site.bias, ShardSpec(0, tp, layer.blocks))] if site.bias is not None else [])
    return [(site.weight, ShardSpec(0 if site.transposed else 1, tp))]  # row: the bias stays whole


def _shard_functional_sites(stage: nn.Module, plan: TPPlan, tpg: TPGroup,
                            done: dict[int, nn.Parameter]) -> dict[int, ShardSpec]:
    """Shard the parameters that functional sites read through ``get_attr`` (new parameter id -> spec).

    Only the shard is created here; every holder of the old parameter (the get_attr's owner, a
    tied module elsewhere in the stage) is pointed at it by the caller.
    """
    specs: dict[int, ShardSpec] = {}
    for node in stage.graph.nodes:
        site = plan.sites.get(node.name)
        if site is None or _received(node):
            continue
        for position, spec in _functional_specs(site, plan.layers[site.module], tpg.size):
            attr = node.args[position]
            if not (isinstance(attr, fx.Node) and attr.op == "get_attr"):
                raise TPError(f"plan and stage do not match: argument {position} of {node.name} ({site.module}) is "
                              f"not the parameter the plan shards")
            old = stage.get_parameter(str(attr.target))
            new = _new_param(old, spec, tpg, done)
            if specs.get(id(new), spec) != spec:
                raise TPError(f"parameter {attr.target} would be sharded two ways ({specs[id(new)]} and {spec}); "
                              f"map {site.module} to 'replicate' in tp_mapping")
            specs[id(new)] = spec
    return specs


# ---- graph ---------------------------------------------------------------------------------------------
def _get_path(node: fx.Node, path: tuple[Any, ...]) -> Any:
    value: Any = node.args if path[0] == "args" else node.kwargs
    for key in path[1:]:
        value = value[key]
    return value


def _set_path(node: fx.Node, path: tuple[Any, ...], new: Any) -> None:
    def put(container: Any, keys: tuple[Any, ...]) -> Any:
        if not keys:
            return new
        key, rest = keys[0], keys[1:]
        if isinstance(container, dict):
            out = dict(container)
            out[key] = put(container[key], rest)
            return out
        items = list(container)
        items[key] = put(items[key], rest)
        return type(container)(items) if isinstance(container, tuple) else items

    if path[0] == "args":
        node.args = put(node.args, path[1:])
    else:
        node.kwargs = put(node.kwargs, path[1:])


def _apply_edit(graph: fx.Graph, node: fx.Node, edit: Edit, tp: int) -> None:
    current = _get_path(node, edit.path)
    if edit.kind == "set":
        if not isinstance(current, int):
            raise TPError(f"plan edit {edit} does not match the stage graph (found {current!r})")
        _set_path(node, edit.path, edit.value)
        return
    if not isinstance(current, fx.Node):
        raise TPError(f"plan edit {edit} expects a graph value, found {current!r}")
    with graph.inserting_before(node):
        if edit.kind == "div":
            new = graph.call_function(operator.floordiv, (current, tp))
        else:
            new = graph.call_function(tp_local_shape, (current, edit.value, tp))
    _set_path(node, edit.path, new)


def _insert_communication(graph: fx.Graph, plan: TPPlan, values: dict[str, fx.Node], nodes: dict[str, fx.Node]) -> None:
    """Put each planned ``copy`` / ``scatter`` on its edge, right before its consumer.

    Why not right after the value: a value may be filled in place after it is made (RWKV's CPU
    kernel writes ``output[:, t] = ...`` into a ``zeros_like``); a scatter taken there copies the
    zeros. Consumers of one value share one inserted op as long as no in-place write of the value
    lies between them.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    writes: dict[str, list[int]] = {}
    for node in graph.nodes:
        name = mutated_input(node)
        if name is not None:
            writes.setdefault(name, []).append(order[node])
    inserted: dict[tuple[str, str, int | None, int], fx.Node] = {}
    planned = [(nodes[i.consumer], i) for i in plan.inserts if i.consumer in nodes]
    for consumer, ins in sorted(planned, key=lambda pair: order[pair[0]]):
        value = _stage_value(consumer, ins.value, values.get(ins.value))
        written = sum(1 for at in writes.get(value.name, ()) if at < order[consumer])
        key = (ins.kind, value.name, ins.dim, written)
        if key not in inserted:
            with graph.inserting_before(consumer):
                if ins.kind == "copy":
                    inserted[key] = graph.call_module(COPY_MODULE, (value,))
                else:
                    inserted[key] = graph.call_module(SCATTER_MODULE, (value, ins.dim))
        consumer.replace_input_with(value, inserted[key])


def _rewrite_graph(stage: nn.Module, plan: TPPlan, tpg: TPGroup, tracker: TPRNGTracker) -> None:
    graph: fx.Graph = stage.graph
    values = {n.name: n for n in graph.nodes}
    nodes = {name: n for name, n in values.items() if not _received(n)}  # received ops were rewritten upstream
    stage.add_submodule(COPY_MODULE, CopyToTP(tpg))
    stage.add_submodule(SCATTER_MODULE, ScatterToTP(tpg))
    stage.add_submodule(CROSS_ENTROPY_MODULE, VocabParallelCrossEntropy(tpg))
    stage.add_submodule(REDUCE_MODULE, ReduceFromTP(tpg))
    stage.add_submodule(LOOKUP_MODULE, VocabShardLookup(tpg))
    for edit in plan.edits:
        if edit.node in nodes:
            _apply_edit(graph, nodes[edit.node], edit, tpg.size)
    _insert_communication(graph, plan, values, nodes)
    for node in list(graph.nodes):
        site = plan.sites.get(node.name)
        if site is None or _received(node):
            continue
        if isinstance(site, EmbeddingSite):
            _vocab_lookup(graph, node, site)
        elif plan.layers[site.module].style == "row":
            _row_reduce(graph, node, site)
    for name, opts in plan.losses.items():
        node = nodes.get(name)
        if node is not None:
            _replace_cross_entropy(graph, node, opts)
    _fork_sharded_random_ops(stage, nodes, plan, tracker)
    graph.lint()
    stage.recompile()


def _fork_sharded_random_ops(stage: nn.Module, nodes: dict[str, fx.Node], plan: TPPlan,
                             tracker: TPRNGTracker) -> list[str]:
    """Retarget every random op with a sharded output to a :class:`ShardedRandom` of its own
    (a new submodule, so a dropout module also called on replicated values keeps the default
    stream there); returns the node names."""
    forked = []
    for name, node in nodes.items():
        if name not in plan.layouts or node.op not in ("call_module", "call_function"):
            continue
        op = stage.get_submodule(node.target) if node.op == "call_module" else node.target
        if not is_random_op(op, node.args, node.kwargs):
            continue
        target = RANDOM_MODULE_PREFIX + name
        stage.add_submodule(target, ShardedRandom(op, tracker))
        node.op, node.target = "call_module", target
        forked.append(name)
    return forked


def _received(node: fx.Node) -> bool:
    """Whether ``node`` is a value an earlier stage computed and sent (it carries the op's name,
    but the op, its parameters and its planned rewrites live on the sender)."""
    return bool(node.meta.get("merak_received"))


def _stage_value(consumer: fx.Node, name: str, node: fx.Node | None) -> fx.Node:
    """The input of ``consumer`` that carries the planned value ``name``.

    A stage's graph rewrites (:mod:`merak.partitioner.fusion`) keep a node's name when they
    keep its value; a rewrite that substitutes another node for an input records the name it
    stands for in ``meta["merak_stands_for"]`` (the causal-attention rule's ``mask or None``).
    """
    inputs = consumer.all_input_nodes
    if node is not None and node in inputs:
        return node
    standing = [n for n in inputs if n.meta.get("merak_stands_for") == name]
    if len(standing) == 1:
        return standing[0]
    raise TPError(f"the stage uses {consumer.name} but not its input {name} (a graph rewrite replaced it without "
                  f"recording meta['merak_stands_for']): plan and stage do not match")


def _row_reduce(graph: fx.Graph, node: fx.Node, site: LinearSite) -> None:
    """A functional row-parallel op: partial product, all-reduce, then the (replicated) bias.

    ``node`` keeps its name and users and becomes the bias addition (or is replaced by the
    reduce when there is no bias)."""
    x, weight = node.args[site.input_pos], node.args[site.weight]
    with graph.inserting_before(node):
        if site.bias is None:
            partial = graph.node_copy(node)
        else:
            op = F.linear if site.kind == "linear" else torch.matmul
            partial = graph.call_function(op, (x, weight))
        reduced = graph.call_module(REDUCE_MODULE, (partial,))
    for n in (partial, reduced):
        n.meta.update({k: v for k, v in node.meta.items() if k in ("merak_module", "nn_module_stack")})
    if site.bias is None:
        node.replace_all_uses_with(reduced)
        graph.erase_node(node)
        return
    node.target, node.args, node.kwargs = operator.add, (reduced, node.args[site.bias]), {}


def _vocab_lookup(graph: fx.Graph, node: fx.Node, site: EmbeddingSite) -> None:
    """A functional embedding on a vocab-sharded weight: local lookup, then all-reduce."""
    with graph.inserting_before(node):
        local = graph.call_module(LOOKUP_MODULE, (node.args[site.weight], node.args[site.ids]),
                                  {"padding_idx": site.padding_idx})
        reduced = graph.call_module(REDUCE_MODULE, (local,))
    for n in (local, reduced):
        n.meta.update({k: v for k, v in node.meta.items() if k in ("merak_module", "nn_module_stack")})
    node.replace_all_uses_with(reduced)
    graph.erase_node(node)


def _replace_cross_entropy(graph: fx.Graph, node: fx.Node, opts: dict[str, Any]) -> None:
    logits = node.args[0] if node.args else node.kwargs["input"]
    target = node.args[1] if len(node.args) > 1 else node.kwargs["target"]
    with graph.inserting_before(node):
        new = graph.call_module(CROSS_ENTROPY_MODULE, (logits, target),
                                {"ignore_index": opts["ignore_index"], "reduction": opts["reduction"]})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
