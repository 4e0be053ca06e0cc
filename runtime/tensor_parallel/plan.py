"""The automatic tensor-parallel plan: column -> row pairs found by propagating shardings.

Why propagation (and not name patterns): Merak traces attention *internals* into the graph, so
head counts end up as constants in ``view``/``split``/``expand`` arguments (GPT-2's
``split(768)``, T5's ``view(b, -1, 12, 64)``, the vocabulary in ``view(-1, 50257)``). Knowing
which linear layers to shard is not enough: every op between a column-parallel layer and its
row-parallel partner must be checked and its constants rewritten. So the planner tries to shard
a linear layer's output features and follows the sharded dimension through the graph, op by op,
using the traced shapes:

* pointwise / broadcasting ops, softmax over another dim, ``transpose``, ``permute``, views
  (a sharded ``hidden`` dim split into ``(heads, head_dim)`` stays sharded on ``heads``), ``split``
  of a fused projection (GPT-2's ``c_attn``: each rank keeps its chunk of q, of k and of v),
  batched ``matmul`` over heads ... keep the value sharded;
* a linear layer reading a value sharded on its input features is the **row-parallel** partner;
  its output is all-reduced and replicated again;
* ``cross_entropy`` over logits sharded on the class dim (an LM head whose outputs are the
  vocabulary) becomes the vocab-parallel cross-entropy; the input embedding of that vocabulary
  becomes vocab-parallel;
* a replicated tensor meeting a sharded one is either produced by another linear layer (then that
  layer joins as a column: q meets k, gate meets up), or it is *scattered* (T5's position bias;
  K/V projections kept replicated when there are fewer K/V heads than ranks), or it broadcasts;
* anything else (a norm over the sharded dim, an opaque module, a graph output) means the
  tentative column was not a TP pair: the layer stays replicated and the reason is recorded.

A user mapping (module-name patterns -> ``column`` / ``row`` / ``replicate`` / ``vocab``)
overrides the search: ``replicate`` excludes a layer, ``column`` forces one (and lets unknown ops
in its region pass as pointwise), ``row`` must be met by a sharded input, ``vocab`` forces a
vocab-parallel embedding.

The plan is made once on the whole model's graph (so a pipeline cut inside a TP region, or T5's
position bias sent between stages, is handled consistently) and applied per stage by node and
module names (:mod:`.tp_apply`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from merak.runtime.tensor_parallel.propagate import (
    Blocked,
    Edit,
    GraphContext,
    Insert,
    NeedsColumns,
    Region,
    Violation,
)

__all__ = ["TPError", "TPPlan", "LayerPlan", "Edit", "Insert", "plan_tensor_parallel", "STYLES"]

STYLES = ("column", "row", "replicate", "vocab")


class TPError(ValueError):
    """The model cannot be tensor-parallelized as asked; the message names sizes, modules and the fix."""


# ---- the plan ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one module (by qualified name) is parallelized.

    ``style``: ``column`` (output features split; ``blocks`` are the full sizes of fused blocks,
    e.g. q|k|v), ``row`` (input features split, output all-reduced, bias replicated),
    ``vocab`` (embedding rows split), ``replicate``. ``group`` numbers the TP region (pair).
    """

    module: str
    style: str
    kind: str
    features: int = 0
    blocks: tuple[int, ...] = ()
    group: int = -1
    note: str = ""
    lm_head: bool = False


@dataclasses.dataclass
class TPPlan:
    """A tensor-parallel plan for one traced model and one ``tp`` degree.

    ``layers``: module name -> :class:`LayerPlan` (TP layers only). ``layouts``: graph node ->
    sharded dim of its value. ``edits`` / ``inserts``: graph rewrites. ``losses``: cross-entropy
    node -> ``{ignore_index, reduction}``. ``sharded_outputs``: model output key -> dim (the
    logits of a vocab-parallel head stay sharded). ``unmatched``: linear module -> why it stays
    replicated. ``batch_values``: nodes whose dim 0 is the batch (for sub-micro-batching).
    ``sites``: graph node -> the site (:mod:`.sites`) of every *functional* linear or embedding the plan shards
    (``F.linear`` / ``aten.linear`` / ``aten.addmm`` ... on a parameter; see :mod:`.sites`).
    """

    tp: int
    model_name: str
    layers: dict[str, LayerPlan]
    layouts: dict[str, int]
    edits: list[Edit]
    inserts: list[Insert]
    losses: dict[str, dict[str, Any]]
    sharded_outputs: dict[str, int]
    unmatched: dict[str, str]
    notes: list[str]
    batch_values: frozenset[str]
    required: list[tuple[int, str, bool]]
    groups: int = 0
    sites: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: expert-bank module -> :class:`~merak.runtime.tensor_parallel.experts.ExpertPlan`
    experts: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: why the loss is not a sum over batch slices (a router load-balancing loss couples every
    #: token of the micro-batch), so sub-micro-batching would change it; empty if it is
    batch_coupled: str = ""

    def style(self, module: str) -> str:
        """``column`` / ``row`` / ``vocab``, ``experts`` for a sharded MoE bank, else ``replicate``."""
        plan = self.layers.get(module)
        if plan is None:
            return "experts" if module in self.experts else "replicate"
        return plan.style

    def valid_tp_values(self, limit: int = 64) -> list[int]:
        """Every tp in ``1..limit`` that divides the sizes this plan splits."""
        return _valid_tps(self.required, limit)

    @property
    def comm_per_step(self) -> dict[str, int]:
        """Collectives per micro-batch (forward all-reduces, backward all-reduces, scatters)."""
        rows = sum(1 for p in self.layers.values() if p.style in ("row", "vocab"))
        copies = len({(i.value, i.kind) for i in self.inserts if i.kind == "copy"})
        scatters = len({(i.value, i.dim) for i in self.inserts if i.kind == "scatter"})
        return {"forward_all_reduce": rows, "backward_all_reduce": copies, "scatter": scatters,
                "cross_entropy": len(self.losses)}

    def to_json(self) -> dict[str, Any]:
        return {
            "tp": self.tp, "model": self.model_name,
            "layers": {k: dataclasses.asdict(v) for k, v in self.layers.items()},
            "unmatched": self.unmatched, "losses": self.losses, "sharded_outputs": self.sharded_outputs,
            "edits": [dataclasses.asdict(e) for e in self.edits],
            "inserts": [dataclasses.asdict(i) for i in self.inserts],
            "comm_per_microbatch": self.comm_per_step, "notes": self.notes,
            "experts": {k: {"mode": v.mode, "num_experts": v.num_experts, "intermediate": v.intermediate,
                            "top_k": v.top_k, "describe": v.describe(self.tp)} for k, v in self.experts.items()},
            "valid_tp": self.valid_tp_values(),
        }

    def table(self, collapse: bool = True) -> str:
        """A readable summary; repeated blocks (``h.0``, ``h.1`` ...) are collapsed to ``h.*``."""
        rows: dict[tuple[str, str, str, str], int] = {}
        for p in self.layers.values():
            name = re.sub(r"\.\d+\.", ".*.", p.module) if collapse else p.module
            if p.style == "column":
                split = "+".join(f"{b}" for b in p.blocks) if len(p.blocks) > 1 else f"{p.features}"
                local = "+".join(f"{b // self.tp}" for b in p.blocks) if len(p.blocks) > 1 else f"{p.features // self.tp}"
                what = f"out {split} -> {local}"
            elif p.style == "row":
                what = f"in {p.features} -> {p.features // self.tp}"
            else:
                what = f"rows {p.features} -> {p.features // self.tp}"
            key = (name, p.style, what, p.note)
            rows[key] = rows.get(key, 0) + 1
        width = max([len(k[0]) + 6 for k in rows] + [20])
        lines = [f"Tensor-parallel plan for {self.model_name}, tp={self.tp}: "
                 f"{sum(1 for p in self.layers.values() if p.style == 'column')} column, "
                 f"{sum(1 for p in self.layers.values() if p.style == 'row')} row, "
                 f"{sum(1 for p in self.layers.values() if p.style == 'vocab')} vocab-parallel embedding layers "
                 f"in {self.groups} regions",
                 f"{'module':<{width}} {'style':<7} {'features (full -> per rank)':<30} note"]
        for (name, style, what, note), count in rows.items():
            label = f"{name} (x{count})" if count > 1 else name
            lines.append(f"{label:<{width}} {style:<7} {what:<30} {note}".rstrip())
        banks: dict[tuple[str, str, str], int] = {}
        for e in self.experts.values():
            key = (re.sub(r"\.\d+\.", ".*.", e.module) if collapse else e.module, e.mode, e.describe(self.tp))
            banks[key] = banks.get(key, 0) + 1
        for (name, mode, what), count in banks.items():
            label = f"{name} (x{count})" if count > 1 else name
            lines.append(f"{label:<{width}} {mode:<7} {what:<30} router replicated".rstrip())
        comm = self.comm_per_step
        lines.append(f"per micro-batch: {comm['forward_all_reduce']} forward all-reduces, "
                     f"{comm['backward_all_reduce']} backward all-reduces, {comm['scatter']} scatters, "
                     f"{comm['cross_entropy']} vocab-parallel cross-entropy")
        lines.append("replicated: norms, embeddings of positions/types, biases of row-parallel layers"
                     + (", and " + ", ".join(sorted({re.sub(r'\.\d+\.', '.*.', m) for m in self.unmatched}))
                        if self.unmatched else ""))
        for module, reason in _collapse_reasons(self.unmatched).items():
            lines.append(f"  {module}: {reason}")
        if self.edits:
            counts: dict[str, int] = {}
            for e in self.edits:
                counts[e.describe()] = counts.get(e.describe(), 0) + 1
            lines.append("graph constants rewritten: " + ", ".join(
                f"{what}{f' (x{n})' if n > 1 else ''}" for what, n in counts.items()))
        for note in dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in self.notes):
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _collapse_reasons(unmatched: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for module, reason in unmatched.items():
        key = re.sub(r"\.\d+\.", ".*.", module)
        out.setdefault(key, re.sub(r"\b(\w+?)_\d+\b", r"\1_N", reason) if key != module else reason)
    return out


def _valid_tps(required: Iterable[tuple[int, str, bool]], limit: int) -> list[int]:
    req = list(required)
    return [t for t in range(1, limit + 1)
            if all(size % t == 0 or (flexible and t % size == 0) for size, _, flexible in req)]


# ---- the search -----------------------------------------------------------------------------------
def plan_tensor_parallel(graph: Any, tp: int, mapping: Mapping[str, str] | Iterable[str] | None = None,
                         moe: str = "tensor") -> TPPlan:
    """Find the tensor-parallel plan of a traced model (a ``ProxyGraph`` from
    :func:`merak.partitioner.trace`) for ``tp`` ranks.

    ``mapping``: ``{"module.name.pattern": style}`` (fnmatch patterns on qualified module names,
    first match wins; styles ``column``, ``row``, ``replicate``, ``vocab``), or strings
    ``"pattern=style"``. ``moe``: how mixture-of-experts banks are sharded, ``tensor`` (inside each
    expert) or ``expert`` (experts spread over the ranks, tokens exchanged by all-to-all), see
    :mod:`.experts`; a bank mapped to ``replicate`` stays whole. Raises :class:`TPError` when sizes are not divisible by ``tp`` (naming
    them and the valid tp values), when no column -> row pair exists, or when the mapping cannot
    be honoured.
    """
    if not isinstance(tp, int) or tp < 1:
        raise TPError(f"tp={tp!r} must be a positive integer")
    mapping = _parse_mapping(mapping)
    ctx = GraphContext(graph, tp, mapping)
    plan = TPPlan(tp=tp, model_name=type(ctx.model).__name__, layers={}, layouts={}, edits=[], inserts=[],
                  losses={}, sharded_outputs={}, unmatched={}, notes=[], batch_values=_batch_values(ctx),
                  required=[])
    if tp == 1:
        return plan
    errors: list[tuple[str, str, int, bool]] = []  # (size name, where, size, kv-style flexible)
    regions: list[Region] = []
    failed: dict[str, str] = {}
    order = sorted(ctx.linears, key=lambda n: (ctx.style_of(ctx.linears[n]) != "column", ctx.index[n]))
    for seed in order:
        module = ctx.linears[seed]
        if seed in ctx.assigned or ctx.style_of(module) in ("replicate", "row"):
            continue
        region = _grow(ctx, seed, errors, failed)
        if region is not None:
            # regions are grown one by one; one that shards a value or claims a layer another
            # already did would make two inconsistent plans for the same ops (MiniCPM5's gated
            # query): the later one is dropped and its seed stays replicated
            taken = {n for r in regions for n in (*r.sharded_dims(), *r.columns, *r.rows)}
            overlap = taken & {*region.sharded_dims(), *region.columns, *region.rows}
            if overlap:
                failed[seed] = f"its region overlaps an earlier one at {ctx.where(sorted(overlap, key=ctx.index.get)[0])}"
                continue
            regions.append(region)
            ctx.assigned.update({c: "column" for c in region.columns})
            ctx.assigned.update({r: "row" for r in region.rows})
            ctx.assigned.update({e: "replicate" for e in region.replicated})
    _commit(ctx, plan, regions)
    _embeddings(ctx, plan, regions)
    _expert_banks(ctx, plan, moe)
    coef = getattr(ctx.config, "router_aux_loss_coef", 0) or 0
    if getattr(ctx.config, "output_router_logits", False) and coef:
        plan.batch_coupled = (f"the router's load-balancing loss (output_router_logits=True, "
                              f"router_aux_loss_coef={coef}) averages over every token of the micro-batch")
    for seed, reason in failed.items():
        module = ctx.linears[seed]
        if module not in plan.layers:
            plan.unmatched.setdefault(module, reason)
    for node, module in ctx.linears.items():
        if module not in plan.layers and module not in plan.unmatched:
            style = ctx.style_of(module)
            plan.unmatched[module] = "mapped to replicate" if style == "replicate" else \
                "reads a replicated value that no column layer shards (not a row partner)"
    _check_mapping(ctx, plan)
    if errors:
        valid = ", ".join(map(str, _valid_tps(plan.required + [(e[2], "", e[3]) for e in errors], 64)))
        places: dict[str, list[str]] = {}
        for name, where, _, _ in errors:
            if name:
                places.setdefault(name, []).append(where)
        lines = [f"{name} is not divisible by tp={tp} (at {where[0]}"
                 + (f" and {len(where) - 1} more place{'s' if len(where) > 2 else ''})" if len(where) > 1 else ")")
                 for name, where in places.items()]
        pad = (f" A vocabulary can be padded: model.resize_token_embeddings(n, pad_to_multiple_of={tp})."
               if any(name.startswith("vocab") for name in places) else "")
        raise TPError("tensor parallelism with tp={} is impossible for {}:\n  {}\nValid tp values for this "
                      "model: {}. Choose one of them, or map the affected modules to 'replicate' in "
                      "tp_mapping.{}".format(tp, plan.model_name, "\n  ".join(lines), valid, pad))
    if not any(p.style == "row" for p in plan.layers.values()) and not plan.losses and not plan.experts:
        unmatched = "\n  ".join(f"{m}: {r}" for m, r in list(_collapse_reasons(plan.unmatched).items())[:12])
        example = _mapping_example(ctx)
        raise TPError(
            f"no column -> row pair of linear layers found in {plan.model_name}, so tp={tp} would only replicate "
            f"work. Linear layers and why they were not paired:\n  {unmatched or '(the model has no nn.Linear / Conv1D)'}"
            f"\nIf the sharded value passes through ops the planner cannot follow, say which layers pair up with "
            f"tp_mapping (module-name patterns), e.g. {example}; ops between a mapped column and its row are then "
            f"assumed to be pointwise. Or run this model with tp=1.")
    return plan


def _expert_banks(ctx: GraphContext, plan: TPPlan, moe: str) -> None:
    """Plan every mixture-of-experts bank the graph calls (an opaque ``call_module`` node)."""
    from merak.partitioner.tracer import is_expert_bank
    from merak.runtime.tensor_parallel.experts import plan_expert_bank

    for node in ctx.nodes:
        if node.op != "call_module" or str(node.target) in plan.experts:
            continue
        bank = ctx.module(node)
        if not is_expert_bank(bank) or ctx.style_of(str(node.target)) == "replicate":
            continue
        index = node.args[1] if len(node.args) > 1 else node.kwargs.get("top_k_index")
        shape = ctx.shape(index) if isinstance(index, fx.Node) else None
        top_k = shape[-1] if shape else int(getattr(ctx.config, "num_experts_per_tok", 1) or 1)
        plan.experts[str(node.target)] = dataclasses.replace(
            plan_expert_bank(bank, str(node.target), ctx.tp, moe, top_k), node=node.name)


def _parse_mapping(mapping: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        parsed: dict[str, str] = {}
        for item in mapping:
            pattern, sep, style = str(item).rpartition("=")
            if not sep or not pattern:
                raise TPError(f"tp_mapping entry {item!r} is not of the form 'module.pattern=style'")
            parsed[pattern.strip()] = style.strip()
        mapping = parsed
    for pattern, style in mapping.items():
        if style not in STYLES:
            raise TPError(f"tp_mapping[{pattern!r}] = {style!r}: the style must be one of {', '.join(STYLES)}")
    return dict(mapping)


def _grow(ctx: GraphContext, seed: str, errors: list[tuple[str, str, int, bool]], failed: dict[str, str]) -> Region | None:
    """Grow the region of ``seed`` until it is consistent; the region, or None (reason in ``failed``).

    Linear layers that joined the region (a K/V projection met by the query) but cannot be
    sharded are left replicated and the region retried: structurally (their value is scattered
    where it meets the sharded one), or because they have fewer heads than ranks (GQA).
    """
    seeds: set[str] = {seed}
    replicated: dict[str, str] = {}  # joined linear -> why it stays replicated
    forced = ctx.style_of(ctx.linears[seed]) == "column"
    for _ in range(64):
        trust = forced or any(ctx.style_of(ctx.linears[s]) == "column" for s in seeds)
        region = Region(ctx, seeds, set(replicated), trust)
        try:
            region.run()
        except NeedsColumns as need:
            seeds |= need.linears
            continue
        except Blocked as fail:
            joined = fail.blame & (seeds - {seed})
            if joined and seed not in fail.blame:
                replicated.update({j: f"left replicated ({fail.reason})" for j in joined})
                seeds -= joined
                continue
            if forced:
                raise TPError(f"tp_mapping makes {ctx.linears[seed]} column-parallel, but its sharded output "
                              f"cannot be followed: {fail.reason}") from None
            failed[seed] = fail.reason
            return None
        if not region.rows and not region.losses:
            failed[seed] = "its sharded output reaches no row-parallel partner"
            return None
        if region.violations:
            heads = max((size for size, what, _ in region.required if what == "heads"), default=0)

            def kv(v: Violation) -> bool:  # fewer heads than the query's: K/V of grouped-query attention
                return v.what == "heads" and v.size < heads

            if all(kv(v) and ctx.tp % v.size == 0 for v in region.violations):
                if any(seed in v.blame for v in region.violations):
                    failed[seed] = f"replicated: {ctx.size_name(region.violations[0].size, 'kv_heads')} < tp={ctx.tp}"
                    return None
                for v in region.violations:
                    replicated.update({b: f"replicated: {ctx.size_name(v.size, 'kv_heads')} < tp={ctx.tp} "
                                          f"(each rank computes all K/V heads, then keeps the ones its query heads use)"
                                       for b in v.blame})
                    seeds -= v.blame
                continue
            for v in region.violations:
                errors.append((ctx.size_name(v.size, "kv_heads" if kv(v) else v.what), ctx.where(v.node), v.size, kv(v)))
            # what this region needs of any tp, for the list of valid values in the error
            errors.extend(("", "", size, what == "heads" and size < heads) for size, what, _ in region.required)
            failed[seed] = "sizes not divisible by tp"
            return None
        region.replicated = replicated
        for linear, why in replicated.items():
            if why.startswith("replicated:"):
                region.required.append(_kv_requirement(ctx, linear))
        return region
    raise TPError(f"the tensor-parallel search around {ctx.linears[seed]} did not converge")


def _kv_requirement(ctx: GraphContext, linear: str) -> tuple[int, str, bool]:
    """A K/V projection left replicated: its head count must divide tp (or be divisible by it)."""
    out = ctx.sites[linear].out_features
    head = None
    for user in ctx.by_name[linear].users:
        shape = ctx.shape(user)
        if shape is not None and len(shape) == 4:
            head = shape[2]
    return (head or out, "kv_heads", True)


def _commit(ctx: GraphContext, plan: TPPlan, regions: list[Region]) -> None:
    for gid, region in enumerate(regions):
        for column, blocks in region.columns.items():
            ctx.assigned[column] = "column"
            site = ctx.sites[column]
            module, features = site.module, site.out_features
            note = "vocab-parallel LM head + cross-entropy" if region.vocab_head else ""
            if blocks and len(blocks) > 1:
                note = f"fused: {len(blocks)} blocks split separately"
            _set_layer(plan, LayerPlan(module, "column", site.kind, features, tuple(blocks or ()), gid, note,
                                       region.vocab_head))
            if site.functional:
                plan.sites[column] = site
        for row in region.rows:
            ctx.assigned[row] = "row"
            site = ctx.sites[row]
            has_bias = site.bias is not None if site.functional else \
                getattr(ctx.module(ctx.by_name[row]), "bias", None) is not None
            _set_layer(plan, LayerPlan(site.module, "row", site.kind, site.in_features, (), gid,
                                       "bias replicated" if has_bias else ""))
            if site.functional:
                plan.sites[row] = site
        plan.layouts.update(region.sharded_dims())
        plan.edits.extend(region.edits)
        plan.inserts.extend(region.inserts.values())
        plan.losses.update(region.losses)
        plan.sharded_outputs.update(region.outputs)
        plan.required.extend(region.required)
        plan.notes.extend(region.notes)
        for linear, why in region.replicated.items():
            plan.unmatched[ctx.linears[linear]] = why
    plan.groups = len(regions)


def _set_layer(plan: TPPlan, layer: LayerPlan) -> None:
    old = plan.layers.get(layer.module)
    if old is not None and (old.style, old.blocks) != (layer.style, layer.blocks):
        raise TPError(f"module {layer.module} is called several times and would be {old.style} at one call and "
                      f"{layer.style} at another; map it to 'replicate' in tp_mapping")
    plan.layers[layer.module] = layer if old is None else old


def _embeddings(ctx: GraphContext, plan: TPPlan, regions: list[Region]) -> None:
    """Vocab-parallel input embeddings: the vocabulary of a vocab-parallel LM head, or mapped.

    Every lookup counts, whether a module call or ``F.embedding`` / ``aten.embedding`` on a
    parameter (an ``nn.Embedding`` subclass traced through, an export graph). A lookup that would
    read a vocab-sharded weight but cannot be made vocab-parallel is refused here, naming the
    module and the ``tp_mapping`` that works, rather than failing inside a step.
    """
    heads = {p.features for p in plan.layers.values() if p.style == "column" and p.lm_head}
    canonical = {id(p): n for n, p in ctx.model.named_parameters(remove_duplicate=True)}
    head_modules = {node: name for node, name in ctx.linears.items()
                    if plan.layers.get(name) is not None and plan.layers[name].lm_head}
    head_params = {canonical.get(id(ctx.site_weight(node))): module for node, module in head_modules.items()}
    for node, site in ctx.embeddings.items():
        name = site.module
        style = ctx.style_of(name)
        tied = head_params.get(canonical.get(id(ctx.site_weight(node))))
        replicate_both = json.dumps({name: "replicate", tied: "replicate"}) if tied else ""
        if style == "replicate":
            if tied:
                raise TPError(f"{name} is mapped to 'replicate' but shares its weight with the vocab-parallel LM head "
                              f"{tied}; map the head to 'replicate' too: tp_mapping={replicate_both}")
            continue
        if not (style == "vocab" or tied or (site.num_embeddings in heads and style is None)):
            continue
        fix = f"tp_mapping={replicate_both}" if tied else f"tp_mapping={json.dumps({name: 'replicate'})}"
        if site.num_embeddings % ctx.tp:
            raise TPError(f"{ctx.size_name(site.num_embeddings, 'vocab')} of {name} is not divisible by "
                          f"tp={ctx.tp}; valid tp values: {', '.join(map(str, _valid_tps([(site.num_embeddings, '', False)], 64)))}."
                          f" Pad the vocabulary (model.resize_token_embeddings(n, pad_to_multiple_of={ctx.tp})) "
                          f"or keep it replicated with {fix}")
        if site.options:
            raise TPError(f"embedding {name} ({site.module_type}) uses {', '.join(site.options)}, which a vocab-parallel "
                          f"lookup does not support; keep it replicated with {fix}")
        module = ctx.module(ctx.by_name[node]) if not site.functional else None
        if module is not None and type(module).forward is not nn.Embedding.forward:
            raise TPError(f"embedding {name} ({site.module_type}) is an nn.Embedding subclass with its own forward, kept "
                          f"as one leaf module, so a vocab-parallel lookup would drop what its forward adds; remove it "
                          f"from leaf_modules (its F.embedding call is then sharded) or keep it replicated with {fix}")
        plan.required.append((site.num_embeddings, "vocab", False))
        kind = "Embedding" if not site.functional else f"{site.module_type} (embedding op)"
        _set_layer(plan, LayerPlan(name, "vocab", kind, site.num_embeddings, (), -1,
                                   "tied with the LM head" if tied else ""))
        if site.functional:
            plan.sites[node] = site


def _check_mapping(ctx: GraphContext, plan: TPPlan) -> None:
    for pattern, style in ctx.mapping.items():
        matched = [m for m in {*ctx.linears.values(), *(e.module for e in ctx.embeddings.values()),
                               *(str(n.target) for n in ctx.nodes if n.op == "call_module")}
                   if fnmatch.fnmatchcase(m, pattern)]
        if not matched:
            raise TPError(f"tp_mapping pattern {pattern!r} matches no module the model calls "
                          f"(e.g. {sorted(ctx.linears.values())[:3]})")
        for m in matched:
            if style in ("column", "row", "vocab") and plan.style(m) != style and ctx.style_of(m) == style:
                why = plan.unmatched.get(m, "its input is not sharded by any column layer")
                raise TPError(f"tp_mapping makes {m} {style}-parallel, but {why}")


def _mapping_example(ctx: GraphContext) -> str:
    names = sorted({re.sub(r"\.\d+\.", ".*.", m) for m in ctx.linears.values()})
    if len(names) >= 2:
        return json.dumps({names[0]: "column", names[1]: "row"})
    return '{"*.fc1": "column", "*.fc2": "row"}'


def _batch_values(ctx: GraphContext) -> frozenset[str]:
    """Nodes whose dim 0 is the batch (dim 0 equal to the traced batch size)."""
    batch = None
    for value in ctx.pg.traced.example_inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            batch = value.shape[0]
            break
    if batch is None:
        return frozenset()
    out = set()
    for n in ctx.nodes:
        m = ctx.meta(n.name)
        if isinstance(m, ctx.TensorMeta) and len(m.shape) > 0 and m.shape[0] == batch:
            out.add(n.name)
    return frozenset(out)
