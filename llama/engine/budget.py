"""How many tokens a block KV cache holds by default: on CUDA, a fraction of the memory left free
once the weights are loaded (what the model's and any draft's caches take per token, the same
block tables indexing both); elsewhere, what rows of the longest sequence would take."""
import logging
from typing import Optional, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# of the free memory after the weights load: the rest is left to the activations of a step
FREE_MEMORY_FRACTION = 0.9


def bytes_per_token(models: Sequence[nn.Module]) -> int:
    """KV cache bytes one token takes in every layer of `models` (keys and values, this process's heads)."""
    total = 0
    for m in models:
        w = m.norm.weight
        for layer in m.layers:
            a = layer.attention
            total += 2 * a.n_local_kv_heads * a.head_dim * w.element_size()
    return total


def default_kv_tokens(models: Sequence[nn.Module], rows: int, seq_len: int, fraction: float = FREE_MEMORY_FRACTION,
                      device: Optional[torch.device] = None) -> int:
    """The KV cache's tokens when none are asked: on CUDA, `fraction` of the free memory
    (torch.cuda.mem_get_info, the smallest over the processes under torchrun, which keep the same
    books) divided by `bytes_per_token`, logged in one line; elsewhere rows x seq_len. `device`:
    the models' unless given."""
    device = device or models[0].norm.weight.device
    if device.type != "cuda":
        return rows * seq_len
    free, total = torch.cuda.mem_get_info(device)
    free = _smallest(free, device)
    per_token = bytes_per_token(models)
    tokens = int(free * fraction) // per_token
    logger.info("KV cache: %d tokens (%.1f of %.1f GiB free on %s x %.2f, %d bytes a token); --kv_cache_tokens sets it",
                tokens, free / 2**30, total / 2**30, device, fraction, per_token)
    if tokens < seq_len:
        raise ValueError(f"only {free / 2**30:.1f} GiB of GPU memory is free after the weights load, {tokens} KV cache "
                         f"tokens, less than one sequence of --max_seq_len {seq_len}: lower --max_seq_len or free the GPU")
    return tokens


def _smallest(free: int, device: torch.device) -> int:
    """The smallest `free` over the processes under torchrun (every rank sizes the same pool)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return free
    t = torch.tensor([free], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())
