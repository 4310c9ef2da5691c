# Compiled forward passes: torch.compile of a model's step with static shapes (CUDA graphs on GPU,
# inductor's freezing for CPU models held in the cache), the KV cache length that keeps their
# shapes few, and the tensors CUDA graphs may keep in place.
import logging
from typing import Any, Callable, Optional, Sequence

import torch

from llama import distributed, kv_cache
from llama.model import Transformer
from llama.runtime import cpu, graphs
from llama.runtime.compute import kernels_for
from llama.runtime.policy import Policy

logger = logging.getLogger(__name__)

class CompiledStep:
    """torch.compile of a forward pass of `model` over its whole KV cache: (bsz, t) tokens at (bsz,)
    positions -> (bsz, t, vocab) logits, with static shapes (one compilation per (bsz, t): decode
    steps, verify passes of k + 1 tokens, a draft's steps), or of another function of the same
    arguments (`step`: llama.engine.acceptance.greedy_pass); on CUDA with CUDA graphs
    ("reduce-overhead"), which remove the launch overhead that dominates small steps. On CPU,
    weights that fit in the last-level cache are compiled with inductor's freezing: folded into
    each graph as constants, prepacked for oneDNN, whose product of a few rows then costs about
    what one row costs (unfrozen, a verify pass of a few tokens costs about twice a one-token
    step). Each compiled shape holds its own copy, at most
    the cache's size; larger weights are bound by memory reads, which prepacking does not change,
    and are compiled as they are. Frozen graphs take `graphs.frozen_options`: a C++
    wrapper, and a pass that joins products of one input into one call (wq, wk, wv; w1, w3) and
    makes one-row products and decode attention compiled loops instead of library calls where
    `graphs.compile_one_row_in_graph` measures them faster. (Freezing takes
    effect only through the global inductor setting and with oneDNN enabled while compiling, so
    these calls leave oneDNN on.) A call
    returns None once compilation has failed (a warning is logged once): the caller then runs the
    pass eagerly, which writes the same KV cache slots, and so does every later call."""

    def __init__(
        self,
        model: Transformer,
        step: Optional[Callable[..., Any]] = None,
        also: Sequence[Transformer] = (),
        policy: Optional[Policy] = None,
    ):
        """step: the function of (tokens, start_pos) to compile (default: the model's forward pass
        over its KV cache); also: other models it runs, whose weights count with the model's for
        the freezing rule; policy: the kernel policy its unfrozen steps run under (None: PyTorch's
        defaults)."""
        # a model and its draft share this code object: decode, 3 verify lengths and 2 draft
        # lengths are recompilations of it, more than Dynamo's default limit of 8 allows
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
        self.model = model
        self.policy = policy
        device = model.tok_embeddings.weight.device
        if device.type == "cpu" or distributed.model_parallel_size() == 1:
            distributed.traceable_collectives()  # fairscale's own cannot be traced under torchrun
        else:  # NCCL inside CUDA graphs is untried: as before, these passes fail to compile and run eagerly
            from fairscale.nn.model_parallel import mappings

            torch.compiler.allow_in_graph(mappings.reduce_from_model_parallel_region)
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs: no launch overhead
        self.fn: Optional[Callable] = torch.compile(step or self._step, mode=mode, dynamic=False)
        weight_bytes = sum(p.numel() * p.element_size() for m in [model, *also] for p in m.parameters())
        self.freeze = device.type == "cpu" and cpu.fits_in_cache(weight_bytes)
        # frozen weights: one-row steps as compiled loops where this CPU runs them faster,
        # measured at the first call over one cache row (steps over more rows have no such product)
        self.in_graph: Optional[bool] = None

    def _step(self, tokens: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        return self.model._forward(tokens, start_pos, None, use_cache=True)

    def __call__(self, tokens: torch.Tensor, start_pos: torch.Tensor, *extra: torch.Tensor) -> Any:
        """The compiled function of (tokens, start_pos, *extra), or None (compilation failed)."""
        if self.fn is None:
            return None
        try:
            if self.freeze:  # oneDNN left on: a graph compiled with it off gets no prepacked products
                import torch._inductor.config as inductor_config

                if self.in_graph is None and tokens.shape[0] == 1:
                    attention = self.model.layers[0].attention
                    heads = (attention.n_local_kv_heads, attention.n_rep, attention.head_dim)
                    self.in_graph = graphs.compile_one_row_in_graph(
                        self.model.params.dim, heads, kv_cache.shape(self.model)[1], self.model.tok_embeddings.weight.dtype)
                with inductor_config.patch(**graphs.frozen_options(bool(self.in_graph))):
                    return self.fn(tokens, start_pos, *extra)
            with kernels_for(tokens, self.policy, compiled=True):
                torch.compiler.cudagraph_mark_step_begin()
                return self.fn(tokens, start_pos, *extra)
        except Exception as e:  # a pass rerun writes the same KV cache slots, so eager can take over
            logger.warning("compiled forward passes failed, running eagerly from now on: %s", e)
            self.fn = None
            return None


RECOMPILE_LIMIT = 16


def static_cache_len(total_len: int, max_seq_len: int) -> int:
    """KV cache length for compiled decoding: a power of two (at least 256), so that few shapes (few
    compilations) serve every request; decode attention then reads at most twice the context."""
    return min(max_seq_len, max(256, 1 << (total_len - 1).bit_length()))


def mark_static(model: Transformer) -> None:
    """The KV cache and RoPE table keep their addresses across steps: CUDA graphs may use them in place."""
    torch._dynamo.mark_static_address(model.rope_table(model.tok_embeddings.weight.device))
    for cache in kv_cache.caches(model):
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)
