# Kernels inside compiled CPU graphs whose weights are frozen into them (llama.runtime.compiled.CompiledStep):
# one inductor pass over the traced graph, and the start-up probe that decides what it rewrites.
"""Compiled graphs of a model held in the last-level cache (inductor's freezing, on CPU).

At the demo model's size a step is bound by the fixed cost of each library call (a oneDNN or MKL
product, an SDPA call, whatever its size), not by the bytes it reads. `frozen_graph_pass` rewrites a traced graph before inductor lowers it:

- products of one input by several frozen weights (wq, wk and wv; w1 and w3) become one product
  of the weights concatenated (the concatenation is folded into a constant once, at compilation)
  and a split of its result: one call where there were three or two;
- where `compile_one_row_in_graph` measures it faster, one-row products and the attention of one
  decode step become inductor's own loops (`one_row_product`, `decode_attention`), with no library
  call at all.

Each output column is the same sum of the same products either way; only its rounding may differ,
as between any two kernels. Nothing here applies to graphs that are not frozen.
"""
import functools
import logging
import math
import operator
import time
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from llama import distributed
from llama.runtime.cpu import best_time
from llama.runtime.policy import dtype_name

logger = logging.getLogger(__name__)

# Repeats of each probe call when timing compiled one-row steps both ways, and blocks per call.
IN_GRAPH_PROBE_CALLS = 60
PROBE_LAYERS = 4
# Query rows per KV head up to which an attention call is a decode step's (the n_rep heads sharing
# a KV head, a token or two each: decode steps, a draft's steps): rewritten as loops; more rows
# (verify passes, prefill) keep SDPA, faster there.
DECODE_ATTENTION_ROWS = 8

# Rows up to which a product is a loop (with `loops`): one, decode steps' (more read the weight
# once per row, where a library call reads it once).
LOOP_ROWS = 1

# Frozen graphs' wrapper compiled to C++ (see `frozen_options`).
CPP_WRAPPER = True

LINEAR = (F.linear, torch._C._nn.linear)


def one_row_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear of one row as a broadcast multiply and a float32 sum over the input dimension:
    inductor compiles it into its own loop, where F.linear becomes a call into a library."""
    y = (x[..., None, :].float() * weight.float()).sum(-1).to(x.dtype)  # (..., out_features)
    return y if bias is None else y + bias


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, enable_gqa: bool = False
) -> torch.Tensor:
    """F.scaled_dot_product_attention of a few query rows per head, in float32, as broadcast
    multiplies, sums and a softmax that inductor compiles into its own loops.

    q (bsz, heads, rows, head_dim); k, v (bsz, kv_heads, slots, head_dim), kv_heads = heads unless
    `enable_gqa` (query heads j * n_rep ... j * n_rep + n_rep - 1 then read KV head j, as SDPA's);
    attn_mask, boolean (True: attend) or additive, broadcastable to (bsz, heads, rows, slots).
    Returns (bsz, heads, rows, head_dim) in q's dtype."""
    bsz, heads, rows, head_dim = q.shape
    dtype, kv_heads = q.dtype, (k.shape[1] if enable_gqa else heads)
    q = q.float().view(bsz, kv_heads, heads // kv_heads, rows, head_dim)  # (b, kv, rep, rows, d)
    scores = (q[..., None, :] * k.float()[:, :, None, None]).sum(-1) / math.sqrt(head_dim)  # (b, kv, rep, rows, slots)
    if attn_mask is not None:
        while attn_mask.dim() < 4:
            attn_mask = attn_mask[None]
        m = attn_mask.shape
        attn_mask = attn_mask[:, :, None] if m[1] == 1 else attn_mask.view(m[0], kv_heads, heads // kv_heads, *m[2:])
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    p = torch.softmax(scores, dim=-1)
    out = (p[..., None] * v.float()[:, :, None, None]).sum(-2)  # (b, kv, rep, rows, d)
    return out.view(bsz, heads, rows, head_dim).to(dtype)


# ---------------------------------------------------------------- the pass


def _value(node: object) -> Optional[torch.Tensor]:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _frozen_weight(graph: torch.fx.Graph, node: object) -> Optional[torch.Tensor]:
    """The tensor a get_attr node reads (a parameter or buffer, which freezing makes a constant)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr" or graph.owning_module is None:
        return None
    try:
        value = functools.reduce(getattr, node.target.split("."), graph.owning_module)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _join_products(graph: torch.fx.Graph) -> None:
    """F.linear calls of one input by frozen weights without bias -> one call of the weights
    concatenated along the output dimension, its result split back."""
    groups: dict = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in LINEAR and not node.kwargs and len(node.args) >= 2:
            weight = _frozen_weight(graph, node.args[1])
            if weight is not None and (len(node.args) < 3 or node.args[2] is None):
                groups.setdefault((node.args[0], weight.dtype), []).append((node, weight.shape[0]))
    for (x, _), members in groups.items():
        if len(members) < 2:
            continue
        nodes = [n for n, _ in members]
        with graph.inserting_before(nodes[0]):  # the weights' own get_attr nodes may come later
            weight = graph.call_function(torch.cat, ([graph.get_attr(n.args[1].target) for n in nodes],), {"dim": 0})
            parts = graph.call_function(torch.split, (graph.call_function(F.linear, (x, weight)), [s for _, s in members]), {"dim": -1})
            outputs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        for node, out in zip(nodes, outputs):
            old_weight = node.args[1]
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            if not old_weight.users:
                graph.erase_node(old_weight)


def _is_decode_attention(node: torch.fx.Node) -> bool:
    q, k = (_value(a) for a in node.args[:2]) if len(node.args) == 3 else (None, None)
    plain = set(node.kwargs) <= {"attn_mask", "is_causal", "enable_gqa", "dropout_p"}
    if not plain or q is None or k is None or q.device.type != "cpu" or q.dim() != 4:
        return False
    rows = q.shape[2] * (q.shape[1] // k.shape[1] if node.kwargs.get("enable_gqa") else 1)  # per KV head
    return rows <= DECODE_ATTENTION_ROWS and not node.kwargs.get("is_causal") and not node.kwargs.get("dropout_p")


def _loops(graph: torch.fx.Graph) -> None:
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in LINEAR:
            x = _value(node.args[0])
            if x is not None and x.device.type == "cpu" and x.numel() <= LOOP_ROWS * x.shape[-1]:
                node.target = one_row_product  # the same arguments: (input, weight, bias)
        elif node.target is F.scaled_dot_product_attention and _is_decode_attention(node):
            node.target = decode_attention
            node.kwargs = {"attn_mask": node.kwargs.get("attn_mask"), "enable_gqa": bool(node.kwargs.get("enable_gqa"))}


def frozen_options(loops: bool) -> dict:
    """Inductor settings of a compiled CPU step whose weights are frozen into it (for
    `torch._inductor.config.patch` around its calls): freezing, this module's pass, and the graph's
    wrapper in C++ (`cpp_wrapper`): a verify or fused speculative step still calls about 50 library
    kernels (MKL products of several rows, SDPA), each through some microseconds of Python in the
    default wrapper; the C++ wrapper calls them directly (measured in the commit that chose it)."""
    return {"freezing": True, "cpp_wrapper": CPP_WRAPPER, "pre_grad_custom_pass": frozen_graph_pass(loops)}


@functools.lru_cache(maxsize=None)
def frozen_graph_pass(loops: bool):
    """Inductor pre-grad pass (for `pre_grad_custom_pass`, with freezing) over a compiled step:
    products of one input joined; with `loops`, one-row products and decode attention as
    inductor's own loops (see the module's docstring). (Built on first use: importing inductor
    takes more than a second.)"""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class FrozenGraphPass(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            _join_products(graph)
            if loops:
                _loops(graph)

        def uuid(self) -> str:  # inductor's compiled-graph cache key
            return f"llama.runtime.graphs.frozen_graph_pass/2/loops={loops}"

    return FrozenGraphPass()


# ---------------------------------------------------------------- the probe


class _OneRowProbe(torch.nn.Module):
    """`layers` blocks of a one-row decode step: a dim x dim product whose first heads x head_dim
    outputs are the queries of an attention over `slots` cached keys and values, half of them masked."""

    def __init__(self, dim: int, heads: Tuple[int, int, int], slots: int, dtype: torch.dtype, in_graph: bool, layers: int):
        super().__init__()
        n_kv, n_rep, head_dim = heads
        self.in_graph, self.heads = in_graph, heads
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.full((dim, dim), 0.01, dtype=dtype), requires_grad=False) for _ in range(layers))
        self.register_buffer("k", torch.full((1, n_kv, slots, head_dim), 0.1, dtype=dtype))
        self.register_buffer("v", torch.full((1, n_kv, slots, head_dim), 0.2, dtype=dtype))
        self.register_buffer("mask", (torch.arange(slots) < slots // 2)[None, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_kv, n_rep, head_dim = self.heads
        width = n_kv * n_rep * head_dim
        for w in self.weights:
            y = one_row_product(x, w) if self.in_graph else F.linear(x, w)
            q = y[:, :width].view(1, n_kv, n_rep, head_dim)
            attend = decode_attention if self.in_graph else F.scaled_dot_product_attention
            a = attend(q, self.k, self.v, attn_mask=self.mask)
            x = torch.cat([a.reshape(1, width), y[:, width:]], dim=1)
        return x


def compile_one_row_in_graph(dim: int, heads: Tuple[int, int, int], slots: int, dtype: torch.dtype) -> bool:
    """Whether a compiled one-row step of weights held in the cache (frozen into the graph) runs
    faster with its products and attention as compiled loops (`frozen_graph_pass(loops=True)`)
    than as library calls on this CPU: four blocks of a dim x dim product of `dtype` and an
    attention of `heads` (KV heads, query heads per KV head, head_dim) over `slots` cached
    positions, timed both ways, by rank 0, once per process and shape; the choice is logged once."""
    return _one_row_in_graph(dim, tuple(heads), slots, dtype, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _one_row_in_graph(dim: int, heads: Tuple[int, int, int], slots: int, dtype: torch.dtype, threads: int) -> bool:
    import torch._inductor.config as inductor_config

    start, faster, seconds = time.perf_counter(), None, {}
    if distributed.is_rank0():
        x = torch.full((1, dim), 0.5, dtype=dtype)
        try:
            with torch.inference_mode(), inductor_config.patch(freezing=True):
                for in_graph in (False, True):
                    probe = _OneRowProbe(dim, heads, slots, dtype, in_graph, PROBE_LAYERS).eval()
                    fn = torch.compile(probe, dynamic=False)
                    seconds[in_graph] = best_time(lambda fn=fn: fn(x), IN_GRAPH_PROBE_CALLS)
            faster = seconds[True] < seconds[False]
        except Exception as e:  # no compiler here: the model's own compilation will say so
            logger.debug("could not time compiled one-row steps: %s", e)
            faster = False
    faster = distributed.broadcast_object(faster)
    if distributed.is_rank0() and len(seconds) == 2:
        logger.info(
            "Compiled one-row steps (%dx%d %s products, attention over %d slots): %s (measured in %.1f s)",
            dim, dim, dtype_name(dtype), slots, "compiled loops" if faster else "library calls",
            time.perf_counter() - start,
        )
        logger.debug(
            "Compiled one-row steps timings: library calls %.1f us, compiled loops %.1f us a block",
            1e6 * seconds[False] / PROBE_LAYERS, 1e6 * seconds[True] / PROBE_LAYERS,
        )
    return faster
