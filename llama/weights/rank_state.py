# Each rank's slice of a checkpoint: the state dict of model-parallel rank r of M assembled from the
# shards it needs (several when merging, one when cutting), each read memory-mapped, one at a time,
# copied piece by piece into its final tensor with the mapped pages dropped once copied, so at most
# this rank's slice plus one source shard are resident; optionally quantized on load.
import logging
import mmap
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from llama import distributed, memory
from llama.args import ModelArgs
from llama.runtime import pages
from llama.weights import sharding
from llama.weights.checkpoint import Layout, PathLike, expected_keys, inspect_checkpoint, load_shard
from llama.weights.quant_formats import QuantConfig, ReduceMax, quantize_weight

logger = logging.getLogger(__name__)


class _MappedShard:
    """A memory-mapped shard that can drop the pages of each tensor once it has been copied.

    Copying from a mapping makes its pages resident in this process; without dropping them a
    one-shard load would count the weights twice (file pages + the copy)."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors = load_shard(path)
        self._ranges = _file_mappings(path)

    def release(self, t: torch.Tensor) -> None:
        """Drop the resident pages spanned by `t` (a view of one of this shard's tensors)."""
        if t.numel() == 0:
            return
        start = t.data_ptr()
        end = start + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()
        # only a tensor inside this file's private mapping: there MADV_DONTNEED just forgets clean
        # pages (the data stays in the file); on ordinary memory it would destroy data
        if not any(lo <= start and end <= hi for lo, hi in self._ranges):
            return
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo:
            memory.madvise_dontneed(lo, hi - lo)


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which `path` is mapped into this process (Linux; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6 and parts[5] == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


def load_rank_state(
    ckpt_dir: PathLike,
    args: ModelArgs,
    rank: int,
    count: int,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    layout: Optional[Layout] = None,
    quant: Optional[QuantConfig] = None,
    reduce_max: Optional[ReduceMax] = None,
) -> dict[str, torch.Tensor]:
    """The state dict of model-parallel rank `rank` of `count`, assembled from the checkpoint's shards.

    Reads only the shards this rank needs, one at a time and memory-mapped, copying each piece into
    its final tensor (on `device`, in `dtype`; None keeps the stored dtype), so at most this rank's
    slice plus one source shard are resident. output.weight is left out for a tied checkpoint.

    A quantized checkpoint gives its stored quantized tensors (in their own dtypes). `quant` on a
    full-precision one quantizes on load: each weight is assembled alone (its source shards mapped
    together), quantized and dropped, so at most one full-precision tensor is resident beside the
    quantized ones; `reduce_max` (an all-reduce MAX over the ranks) makes the row-parallel int8 and
    fp8 scales those of the whole weight (quantize_weight). On a quantized checkpoint,
    `quant` must be how it is stored.
    """
    layout = layout or inspect_checkpoint(ckpt_dir, args)
    sharding.check_process_count(args, layout.n_shards, count, str(ckpt_dir))
    stored = layout.quant
    check_quantization(stored, quant, ckpt_dir)
    active = stored or quant
    if active is not None and active.mode == "int4":
        sharding.check_group_alignment(
            args, count, active.group_size, [k for k in expected_keys(args.n_layers) if active.applies(k)]
        )
    on_load = quant if stored is None else None
    if on_load is not None and count > 1 and reduce_max is None and on_load.mode != "int4":
        raise ValueError("quantizing int8/fp8 on load over several ranks needs reduce_max (load_model passes it)")

    def target(key: str) -> torch.Tensor:
        kept = layout.dtypes[key]  # quantized tensors, and weights about to be quantized, keep theirs
        keep = (stored is not None and stored.applies(key)) or (on_load is not None and on_load.applies(key))
        shape = sharding.piece_shape(key, args, rank, count, stored)
        out = torch.empty(shape, dtype=kept if keep or dtype is None else dtype, device=device)
        pages.advise_huge_pages(out)  # before it is filled: decode streams it (llama.runtime.pages)
        return out

    piece = _Piece(layout, args, rank, count)
    if on_load is None:
        return _by_shard(piece, target)
    return _quantizing(piece, target, on_load, reduce_max)


@dataclass(frozen=True)
class _Piece:
    """Which slice is assembled: rank `rank` of `count` of the checkpoint `layout` of `args`."""

    layout: Layout
    args: ModelArgs
    rank: int
    count: int

    @property
    def sources(self) -> list[int]:
        return sharding.source_ranks(self.layout.n_shards, self.rank, self.count)


def _by_shard(piece: _Piece, target: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the slice, one source shard at a time, each filling its part of every tensor."""
    layout, args, rank, count, stored = piece.layout, piece.args, piece.rank, piece.count, piece.layout.quant
    show = distributed.is_rank0()
    targets = {key: target(key) for key in layout.keys}
    covered = dict.fromkeys(targets, 0)
    progress = _progress(sum(t.nbytes for t in targets.values()), show)
    sources = piece.sources
    for i, k in enumerate(sources):
        path = layout.paths[k]
        if show:  # with several ranks each reads its own shards: say both counts
            logger.info(
                "loading %s (shard %d of %d in the checkpoint, %.2f GB; %d of %d this process reads) ...",
                path.name, k + 1, layout.n_shards, path.stat().st_size / 1e9, i + 1, len(sources),
            )
        shard = _MappedShard(path)
        for key, t in targets.items():
            covered[key] = _copy_piece(key, t, covered[key], shard, k, layout.n_shards, args, rank, count, stored, progress)
    for key in targets:
        _check_covered(key, covered[key], args, rank, count, stored)
    return targets


def _quantizing(
    piece: _Piece, target: Callable[[str], torch.Tensor], quant: QuantConfig, reduce_max: Optional[ReduceMax]
) -> dict[str, torch.Tensor]:
    """The slice of a full-precision checkpoint quantized on load: one tensor at a time, from all its
    source shards (mapped, not resident). Largest first: the one full-precision tensor held (the
    1B's embedding is a fifth of it) then sits beside few quantized ones, and the peak is about the
    quantized model's size. The order is the same on every rank (the shards' shapes), as
    reduce_max's all-reduces need."""
    layout, args, rank, count = piece.layout, piece.args, piece.rank, piece.count
    show = distributed.is_rank0()
    if show:
        logger.info("loading %s and quantizing (%s) ...", ", ".join(layout.paths[k].name for k in piece.sources), quant.describe())
    shards = {k: _MappedShard(layout.paths[k]) for k in piece.sources}
    progress = _progress(sum(sharding.piece_shape(key, args, rank, count).numel() * layout.dtypes[key].itemsize for key in layout.keys), show)
    state = {}
    for key in sorted(layout.keys, key=lambda k: -layout.shapes[k].numel()):
        t, done = target(key), 0
        for k, shard in shards.items():
            done = _copy_piece(key, t, done, shard, k, layout.n_shards, args, rank, count, None, progress)
        _check_covered(key, done, args, rank, count, None)
        if quant.applies(key):
            stored = quantize_weight(key, t, quant, reduce_max)
            del t
            memory.release_freed_memory()  # the quantizing temporaries, before the next tensor is read
            # made by computation, in pages already written: moved under huge pages as the loaded are
            state.update({k: pages.in_huge_pages(v) for k, v in stored.items()})
            del stored
            memory.release_freed_memory()
        else:
            state[key] = t
    return state


def check_quantization(stored: Optional[QuantConfig], asked: Optional[QuantConfig], ckpt_dir: PathLike) -> None:
    """ValueError when a quantized checkpoint is asked to load with another quantization."""
    if stored is not None and asked is not None and stored != asked.stored_form():  # w8a8 loads int8 weights
        raise ValueError(
            f"{ckpt_dir} is quantized ({stored.describe()}) but quantize={asked.name!r} "
            f"({asked.describe()}) was asked: build with quantize={stored.mode!r}"
            f"{f', group_size={stored.group_size}' if stored.mode == 'int4' else ''}"
            f"{'' if stored.output else ', quantize_output=False'}, or quantize the full-precision checkpoint"
        )


def _check_covered(key: str, done: int, args: ModelArgs, rank: int, count: int, quant) -> None:
    want = sharding.piece_range(key, args, rank, count, quant)
    if done != (1 if want is None else want[1]):  # a slicing bug, never a user error
        raise RuntimeError(f"internal error: {key} of rank {rank}/{count} was not fully assembled")


def _copy_piece(
    key: str,
    target: torch.Tensor,
    covered: int,
    shard: _MappedShard,
    k: int,
    n: int,
    args: ModelArgs,
    rank: int,
    count: int,
    quant: Optional[QuantConfig],
    progress: Callable[[int], None],
) -> int:
    """Copy the overlap of source shard k (of n) with rank `rank`'s (of `count`) slice `target` of
    `key`, of which `covered` rows or columns are filled already; returns how many are now, and
    tells `progress` the bytes filled."""
    src = shard.tensors[key]
    dim, span = sharding.shard_dim(key, quant), sharding.piece_range(key, args, rank, count, quant)
    if span is None:  # replicated: any one shard gives it
        if not covered:
            _copy_released(target, src, shard)
            progress(target.nbytes)
        return 1
    s_start, s_len = sharding.piece_range(key, args, k, n, quant)
    t_start, t_len = span
    lo, hi = max(s_start, t_start), min(s_start + s_len, t_start + t_len)
    # a repeated KV head comes from several shards; `covered` counts rows already filled
    if lo < hi and covered < t_len and lo - t_start >= covered:
        piece = target.narrow(dim, lo - t_start, hi - lo)
        _copy_released(piece, src.narrow(dim, lo - s_start, hi - lo), shard)
        progress(piece.nbytes)
        return covered + hi - lo
    return covered


PROGRESS_MIN_BYTES = 1 << 30  # loads smaller than this log only their shards


def _progress(total: int, show: bool) -> Callable[[int], None]:
    """A counter of bytes loaded that logs each further quarter of `total` (on rank 0, for loads
    of at least PROGRESS_MIN_BYTES): a single 16 GB shard otherwise shows one line for minutes."""
    done = 0
    start = time.perf_counter()

    def add(n_bytes: int) -> None:
        nonlocal done
        before, done = done, done + n_bytes
        if show and total >= PROGRESS_MIN_BYTES and 4 * done // total > 4 * before // total:  # a quarter passed
            logger.info(
                "  %d%% of this process's weights (%.2f of %.2f GB) in %.1fs",
                100 * done // total, done / 1e9, total / 1e9, time.perf_counter() - start,
            )

    return add


COPY_CHUNK_BYTES = 16 << 20  # resident memory exceeds the weights by at most this


def _copy_released(dst: torch.Tensor, src: torch.Tensor, shard: _MappedShard) -> None:
    """dst.copy_(src) (converting dtype and device) in chunks of rows, dropping each chunk's source
    pages once copied: resident memory grows by the copy alone, not by the mapped file too."""
    if src.dim() == 1:  # norms: small
        dst.copy_(src)
        shard.release(src)
        return
    step = max(1, COPY_CHUNK_BYTES // max(src[0].numel() * src.element_size(), 1))
    for i in range(0, len(src), step):
        dst[i : i + step].copy_(src[i : i + step])
        shard.release(src[i : i + step])
