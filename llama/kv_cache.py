# The KV cache: one per attention layer, rows of it owned by sequences that the engine schedules,
# or a pool of fixed-size blocks that sequences hold through block tables.
import contextlib
from typing import Iterator, NamedTuple, Optional, Sequence, Union

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


class Slots(NamedTuple):
    """Where a forward pass of a block cache writes and reads: `write` (bsz, seqlen), the new tokens'
    slots (block * block_size + offset); `read` (bsz, blocks), the blocks holding positions
    0..kv_len-1 that each row attends to (the caller's mask hides those a row has not filled)."""

    write: torch.Tensor
    read: torch.Tensor
    kv_len: int
    first: Optional[int] = None  # one row whose blocks read are consecutive from this one: read as one slice


class Group(NamedTuple):
    """Rows of one shape in a pass of several (llama.model.Transformer.forward_groups)."""

    rows: int
    seqlen: int
    freqs_cis: torch.Tensor
    mask: Optional[torch.Tensor]
    slots: Slots


class BlockKVCache(nn.Module):
    """Keys and values of one attention layer in a pool of `blocks` blocks of `block_size` tokens,
    (blocks * block_size, n_kv_heads, head_dim) each: sequences hold blocks through block tables
    (llama.engine.blocks), so that a sequence's tokens need not be contiguous and a finished one
    frees its blocks without moving anything. Block 0 is never handed out: table entries past a
    sequence's blocks point there, so padding writes land in it and masked reads come from it.

    `rows` and `seq_len` bound what the engine runs over the pool: at most `rows` sequences decoded
    together, none longer than `seq_len` tokens (what `shape` reports, as for a `KVCache`).
    """

    def __init__(self, blocks: int, block_size: int, rows: int, seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.block_size, self.rows, self.seq_len = block_size, rows, seq_len
        shape = (blocks * block_size, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def blocks(self) -> int:
        return self.k.shape[0] // self.block_size

    def update(self, slots: Slots, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys and values (bsz, seqlen, n_kv_heads, head_dim) into `slots.write` and return
        the keys and values of `slots.read`, gathered into (bsz, n_kv_heads, kv_len, head_dim)."""
        write = slots.write.reshape(-1)
        self.k[write] = xk.reshape(write.shape[0], *xk.shape[2:])
        self.v[write] = xv.reshape(write.shape[0], *xv.shape[2:])
        if slots.first is not None:  # a view, no copy: a long prompt's chunks re-read its whole context
            lo = slots.first * self.block_size
            return self.k[lo : lo + slots.kv_len].transpose(0, 1)[None], self.v[lo : lo + slots.kv_len].transpose(0, 1)[None]
        # whole blocks gathered (block_size rows of memory each), then cut to kv_len positions
        bsz, n = slots.read.shape
        keys = self.k.view(-1, self.block_size, *self.k.shape[1:])[slots.read].view(bsz, n * self.block_size, *self.k.shape[1:])
        values = self.v.view(-1, self.block_size, *self.v.shape[1:])[slots.read].view(bsz, n * self.block_size, *self.v.shape[1:])
        return keys[:, : slots.kv_len].transpose(1, 2), values[:, : slots.kv_len].transpose(1, 2)


def block_slots(tables: torch.Tensor, block_size: int, start_pos: Union[int, torch.Tensor], seqlen: int,
                kv_len: Optional[int], first: Optional[int] = None) -> Slots:
    """The `Slots` of a forward pass of `seqlen` tokens per row from `start_pos` (an int, or one per
    row), through block `tables` (bsz, n) of block numbers (0 past a row's blocks); rows read
    positions up to the last new one (int start) or the first `kv_len` (tensor start). `first`: the
    tables are one row of consecutive blocks from this one (read as a slice where they cover kv_len)."""
    bsz, device = tables.shape[0], tables.device
    steps = torch.arange(seqlen, device=device)
    if isinstance(start_pos, int):
        pos, kv_len = (start_pos + steps).expand(bsz, seqlen), start_pos + seqlen
    else:
        pos = start_pos[:, None] + steps
    n = -(-kv_len // block_size)  # every position written is below kv_len
    if n > tables.shape[1]:  # past every row's blocks: block 0
        tables = torch.cat([tables, tables.new_zeros(bsz, n - tables.shape[1])], dim=1)
    covered = first is not None and bsz == 1 and n <= tables.shape[1]
    write = tables.gather(1, pos // block_size) * block_size + pos % block_size
    return Slots(write, tables[:, :n], kv_len, first if covered else None)


def caches(model: nn.Module) -> list[KVCache]:
    """The model's KV caches, one per layer (empty before `allocate`)."""
    return [layer.attention.kv_cache for layer in model.layers if layer.attention.kv_cache is not None]


def allocate(model: nn.Module, rows: int, seq_len: int, keep: bool = False) -> None:
    """Give every attention layer of `model` a KV cache of `rows` rows of `seq_len` tokens, in the
    activations' dtype and on the device of the model (the final norm's: projections may hold
    quantized weights). keep: a cache of rows at least as many and as long is kept."""
    if seq_len > model.params.max_seq_len:
        raise ValueError(f"KV cache of {seq_len} tokens exceeds max_seq_len {model.params.max_seq_len}")
    have = shape(model) if pool(model) is None else None
    if keep and have is not None and have[0] >= rows and have[1] >= seq_len:
        return
    w = model.norm.weight
    for layer in model.layers:
        a = layer.attention
        a.kv_cache = KVCache(rows, a.n_local_kv_heads, seq_len, a.head_dim, w.dtype, w.device)


def allocate_blocks(model: nn.Module, blocks: int, block_size: int, rows: int, seq_len: int, keep: bool = False) -> None:
    """Give every attention layer of `model` a `BlockKVCache` of `blocks` blocks (block 0 among them,
    never handed out) of `block_size` tokens, for at most `rows` sequences of `seq_len` tokens.
    keep: a block cache of as many blocks or more, of that block size, is kept (with the new bounds)."""
    if seq_len > model.params.max_seq_len:
        raise ValueError(f"KV cache of {seq_len} tokens exceeds max_seq_len {model.params.max_seq_len}")
    have = pool(model)
    if keep and have is not None and have[0] >= blocks and have[1] == block_size:
        for cache in caches(model):
            cache.rows, cache.seq_len = rows, seq_len
        return
    w = model.norm.weight
    for layer in model.layers:
        a = layer.attention
        a.kv_cache = BlockKVCache(blocks, block_size, rows, seq_len, a.n_local_kv_heads, a.head_dim, w.dtype, w.device)


def pool(model: nn.Module) -> Optional[tuple[int, int]]:
    """(blocks, block_size) of the model's block KV cache, or None (none, or a cache of rows)."""
    c = model.layers[0].attention.kv_cache
    return (c.blocks, c.block_size) if isinstance(c, BlockKVCache) else None


def free(model: nn.Module) -> None:
    for layer in model.layers:
        layer.attention.kv_cache = None


def shape(model: nn.Module) -> Optional[tuple[int, int]]:
    """(rows, tokens) the model's KV cache holds, or None before it is allocated."""
    c = model.layers[0].attention.kv_cache
    return None if c is None else (c.rows, c.seq_len)  # a block cache: its bounds


def move_rows(model: nn.Module, dst: list[int], src: list[int]) -> None:
    """In every layer, row dst[i] takes the contents of row src[i] (nothing to move in a block cache:
    block tables follow their sequences)."""
    if not dst or pool(model) is not None:
        return
    device = model.layers[0].attention.wk.weight.device
    dst_t, src_t = torch.tensor(dst, device=device), torch.tensor(src, device=device)
    for cache in caches(model):
        cache.move_rows(dst_t, src_t)


@contextlib.contextmanager
def using_tables(models: Sequence[nn.Module], tables: Sequence[Sequence[int]]) -> Iterator[None]:
    """Within this block, forward passes of `models` (block caches of one shape) run rows through
    these block `tables`, one list of block numbers per row (row i of a pass from row0 uses
    tables[row0 + i])."""
    device = models[0].tok_embeddings.weight.device
    width = max(1, max(len(t) for t in tables))
    t = torch.tensor([list(t) + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)
    first = None
    if len(tables) == 1 and len(tables[0]) and list(tables[0]) == list(range(tables[0][0], tables[0][0] + len(tables[0]))):
        first = tables[0][0]
    for m in models:
        m.kv_tables, m.kv_first = t, first
    try:
        yield
    finally:
        for m in models:
            m.kv_tables, m.kv_first = None, None
