# The KV cache: one per attention layer, rows of it owned by sequences that the engine schedules.
from typing import Optional, Union

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of one attention layer, (rows, n_kv_heads, seq_len, head_dim) each.

    A row holds one sequence. Rows are written by `update` (a prefill or decode step of a batch of
    consecutive rows), reordered with `move_rows`, and cleared with `reset_rows`. The tensors are
    non-persistent buffers: they never appear in the state_dict (checkpoint keys stay exact) and
    they keep their addresses across steps (compiled decoding and CUDA graphs use them in place).
    """

    def __init__(self, rows: int, n_kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (rows, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def rows(self) -> int:
        return self.k.shape[0]

    @property
    def seq_len(self) -> int:
        return self.k.shape[2]

    def update(
        self,
        row0: int,
        start_pos: Union[int, torch.Tensor],
        xk: torch.Tensor,
        xv: torch.Tensor,
        kv_len: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys and values (bsz, seqlen, n_kv_heads, head_dim) into rows row0..row0+bsz at
        positions start_pos... (an int for all rows, or a (bsz,) tensor, one start per row), and
        return the keys and values those rows attend to, (bsz, n_kv_heads, kv, head_dim):
        positions up to the last new one (int start), or the first `kv_len` (default: all) slots,
        where the caller's mask hides what a row has not written (tensor start)."""
        bsz, seqlen = xk.shape[:2]
        rows = slice(row0, row0 + bsz)
        if isinstance(start_pos, int):
            end = start_pos + seqlen
            self.k[rows, :, start_pos:end] = xk.transpose(1, 2)
            self.v[rows, :, start_pos:end] = xv.transpose(1, 2)
            return self.k[rows, :, :end], self.v[rows, :, :end]
        pos = start_pos[:, None] + torch.arange(seqlen, device=xk.device)  # (bsz, seqlen)
        index = torch.arange(row0, row0 + bsz, device=xk.device)[:, None]
        self.k[index, :, pos] = xk
        self.v[index, :, pos] = xv
        kv_len = self.seq_len if kv_len is None else kv_len
        return self.k[rows, :, :kv_len], self.v[rows, :, :kv_len]

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Row dst[i] takes the contents of row src[i] (all read before any is written)."""
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]

    def reset_rows(self, rows: torch.Tensor) -> None:
        self.k[rows] = 0
        self.v[rows] = 0


def caches(model: nn.Module) -> list[KVCache]:
    """The model's KV caches, one per layer (empty before `allocate`)."""
    return [layer.attention.kv_cache for layer in model.layers if layer.attention.kv_cache is not None]


def allocate(model: nn.Module, rows: int, seq_len: int) -> None:
    """Give every attention layer of `model` a KV cache of `rows` rows of `seq_len` tokens, in the
    activations' dtype and on the device of the model (the final norm's: projections may hold
    quantized weights)."""
    if seq_len > model.params.max_seq_len:
        raise ValueError(f"KV cache of {seq_len} tokens exceeds max_seq_len {model.params.max_seq_len}")
    w = model.norm.weight
    for layer in model.layers:
        a = layer.attention
        a.kv_cache = KVCache(rows, a.n_local_kv_heads, seq_len, a.head_dim, w.dtype, w.device)


def free(model: nn.Module) -> None:
    for layer in model.layers:
        layer.attention.kv_cache = None


def shape(model: nn.Module) -> Optional[tuple[int, int]]:
    """(rows, tokens) the model's KV cache holds, or None before it is allocated."""
    c = model.layers[0].attention.kv_cache
    return None if c is None else (c.rows, c.seq_len)


def move_rows(model: nn.Module, dst: list[int], src: list[int]) -> None:
    """In every layer, row dst[i] takes the contents of row src[i]."""
    if not dst:
        return
    device = model.layers[0].attention.wk.weight.device
    dst_t, src_t = torch.tensor(dst, device=device), torch.tensor(src, device=device)
    for cache in caches(model):
        cache.move_rows(dst_t, src_t)
