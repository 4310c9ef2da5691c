# The tensor-parallel rules, in one place: which dimension each checkpoint key splits on across
# model-parallel ranks (as fairscale's parallel layers split it), the KV-head repeat when there are
# more ranks than KV heads, which range of a full weight each rank holds, which source shards a rank
# reads, which process counts a shape allows, how shards merge back, and where int4 groups may split.
#
# Loading, resharding, conversion and quantization all ask this module; none re-derives a split.
# Quantized keys (`<module>.weight` packed, `<module>.scales`, `<module>.zeros`) split with their
# weight: the same rows for column-parallel layers, the matching columns (in packed or group units)
# for row-parallel ones; an int8 per-output-channel scale of a row-parallel layer is replicated.
from typing import Optional, Protocol, Sequence

import torch

from llama.args import ModelArgs

COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")  # split dim 0
ROW_PARALLEL = ("wo", "w2")  # split dim 1
KV_PARALLEL = ("wk", "wv")  # with more ranks than KV heads each rank holds one whole, repeated, head


class QuantFormat(Protocol):
    """What the sharding rules need to know of a quantized checkpoint (llama.weights.quant_formats.QuantConfig)."""

    mode: str  # "int8" | "int4" | "fp8"
    group_size: int

    def applies(self, key: str) -> bool:
        """Whether the weight of `key`'s module is quantized."""


def module_of(key: str) -> str:
    """The module a state-dict key belongs to: "wq" for layers.0.attention.wq.weight."""
    return key.split(".")[-2]


def _kind(key: str) -> str:
    return key.split(".")[-1]  # weight | scales | zeros


def shard_dim(key: str, quant: Optional[QuantFormat] = None) -> Optional[int]:
    """The dimension along which `key` is split across ranks, or None if replicated (the norms, and
    the per-output-channel scales of a row-parallel int8 or fp8 layer)."""
    module = module_of(key)
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL:
        if _kind(key) == "scales" and quant is not None and quant.mode in ("int8", "fp8"):
            return None
        return 1
    return None


def column_factor(key: str, quant: Optional[QuantFormat] = None) -> int:
    """How many input columns of the full-precision weight one stored column of `key` stands for:
    1 for plain and int8 weights, 2 for int4 weights (two 4-bit values per byte), group_size for
    int4 scales and zero points (one per group)."""
    if quant is None or quant.mode != "int4" or not quant.applies(key):
        return 1
    return 2 if _kind(key) == "weight" else quant.group_size


def full_shape(key: str, args: ModelArgs, quant: Optional[QuantFormat] = None) -> torch.Size:
    """Shape of the full (unsharded) tensor `key` of `args`' model (quantized as `quant` says)."""
    dim, vocab, hidden = args.dim, args.vocab_size, args.ffn_hidden_dim
    q_rows, kv_rows = args.n_heads * args.head_dim, (args.n_kv_heads or args.n_heads) * args.head_dim
    shapes = {
        "tok_embeddings": (vocab, dim), "output": (vocab, dim),
        "norm": (dim,), "attention_norm": (dim,), "ffn_norm": (dim,),
        "wq": (q_rows, dim), "wk": (kv_rows, dim), "wv": (kv_rows, dim), "wo": (dim, q_rows),
        "w1": (hidden, dim), "w3": (hidden, dim), "w2": (dim, hidden),
    }
    rows, *cols = shapes[module_of(key)]
    if quant is None or not quant.applies(key) or _kind(key) == "weight" and quant.mode in ("int8", "fp8"):
        return torch.Size((rows, *cols))
    if quant.mode in ("int8", "fp8"):  # scales: one per output channel
        return torch.Size((rows,))
    return torch.Size((rows, cols[0] // column_factor(key, quant)))


def piece_range(
    key: str, args: ModelArgs, rank: int, count: int, quant: Optional[QuantFormat] = None
) -> Optional[tuple[int, int]]:
    """(start, length) along shard_dim(key) of the full tensor that rank `rank` of `count` holds;
    None for replicated tensors.

    Even splits, except wk/wv with more ranks than KV heads: rank r then holds the whole head
    r // (count / n_kv_heads), so ranks share (repeat) heads.
    """
    dim = shard_dim(key, quant)
    if dim is None:
        return None
    n_kv = args.n_kv_heads or args.n_heads
    if module_of(key) in KV_PARALLEL and count > n_kv:
        head = rank // (count // n_kv)
        return head * args.head_dim, args.head_dim
    size = full_shape(key, args, quant)[dim] // count
    return rank * size, size


def piece_shape(
    key: str, args: ModelArgs, rank: int, count: int, quant: Optional[QuantFormat] = None
) -> torch.Size:
    """Shape of rank `rank`'s slice of `key` when the model is split over `count` ranks."""
    shape = list(full_shape(key, args, quant))
    span = piece_range(key, args, rank, count, quant)
    if span is not None:
        shape[shard_dim(key, quant)] = span[1]
    return torch.Size(shape)


def shard_tensor(
    key: str, full: torch.Tensor, args: ModelArgs, rank: int, count: int, quant: Optional[QuantFormat] = None
) -> torch.Tensor:
    """Rank `rank`'s slice (a view) of the full tensor `full` when split over `count` ranks."""
    span = piece_range(key, args, rank, count, quant)
    return full if span is None else full.narrow(shard_dim(key, quant), *span)


def source_ranks(n_shards: int, rank: int, count: int) -> list[int]:
    """The source shards rank `rank` of `count` reads: several when merging, one when cutting."""
    if n_shards >= count:
        per = n_shards // count
        return list(range(rank * per, (rank + 1) * per))
    return [rank // (count // n_shards)]


def merge_pieces(key: str, pieces: Sequence[torch.Tensor], args: ModelArgs, quant: Optional[QuantFormat] = None) -> torch.Tensor:
    """The full tensor `key` from its pieces in shards 0..n-1 (the reverse of shard_tensor).

    With more shards than KV heads, wk/wv shards repeat whole heads: each group of repeats must be
    equal (ValueError otherwise) and contributes once.
    """
    return _concat(key, distinct_pieces(key, pieces, args), quant)


def distinct_pieces(key: str, pieces: Sequence[torch.Tensor], args: ModelArgs) -> list[torch.Tensor]:
    """The pieces of `key` that hold distinct data: all of them, except repeated KV heads."""
    n, n_kv = len(pieces), args.n_kv_heads or args.n_heads
    if module_of(key) in KV_PARALLEL and n > n_kv:
        rep = n // n_kv
        for k in range(n):
            if not torch.equal(pieces[k], pieces[k - k % rep]):
                raise ValueError(f"{key}: shard {k} should repeat shard {k - k % rep}'s KV head")
        return list(pieces[::rep])
    return list(pieces)


def merged_shape(key: str, pieces: Sequence[torch.Tensor], args: ModelArgs, quant: Optional[QuantFormat] = None) -> torch.Size:
    """Shape of merge_pieces(key, pieces, args) without concatenating."""
    dim, pieces = shard_dim(key, quant), distinct_pieces(key, pieces, args)
    shape = list(pieces[0].shape)
    if dim is not None:
        shape[dim] = sum(p.shape[dim] for p in pieces)
    return torch.Size(shape)


def _concat(key: str, pieces: list[torch.Tensor], quant: Optional[QuantFormat]) -> torch.Tensor:
    dim = shard_dim(key, quant)
    return pieces[0] if dim is None else torch.cat(pieces, dim=dim)


def check_process_count(args: ModelArgs, n_shards: int, mp_size: int, source: str = "the checkpoint") -> None:
    """ValueError, saying what to do, unless `n_shards` shards can be loaded on `mp_size` ranks."""
    if mp_size > args.n_heads:
        raise ValueError(
            f"{mp_size} model-parallel processes but the model has only {args.n_heads} attention heads: "
            f"use at most {args.n_heads} processes"
        )
    if n_shards % mp_size and mp_size % n_shards:
        fits = [m for m in range(1, args.n_heads + 1) if (n_shards % m == 0 or m % n_shards == 0) and _fits(args, m)]
        raise ValueError(
            f"{source} has {n_shards} shard(s) and {mp_size} model-parallel processes were started, and neither "
            f"count divides the other: use one of {fits[:8]} processes, or reshard it (scripts/reshard.py)"
        )
    args.validate(mp_size)


def check_group_alignment(args: ModelArgs, count: int, group_size: int, keys: Sequence[str]) -> None:
    """ValueError unless every int4 group of `keys` lies within one rank's slice when split over
    `count` ranks: the input dimension (of a row-parallel layer: of each rank's columns) must be a
    multiple of `group_size`."""
    for key in sorted(keys):  # sorted: the same key is named on every run, whatever order a set gives
        k_full = full_shape(key, args)[1]
        split = count if module_of(key) in ROW_PARALLEL else 1
        k_local = k_full // split
        if k_full % group_size:
            raise ValueError(
                f"group size {group_size} does not divide the input dimension {k_full} of {key}: "
                f"use a group size that divides it (32, 64, 128, 256)"
            )
        if k_local % group_size:
            raise ValueError(
                f"int4 groups of {group_size} would straddle the split of {key} over {count} processes "
                f"({k_local} input columns each): use a group size that divides {k_local}, or fewer processes"
            )


def _fits(args: ModelArgs, mp_size: int) -> bool:
    try:
        args.validate(mp_size)
        return True
    except ValueError:
        return False
