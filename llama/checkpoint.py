# The one place that reads, slices and writes Meta-format checkpoints (params.json + consolidated.NN.pth).
#
# A checkpoint of N shards loads on M model-parallel processes whenever one count divides the other:
# every rank assembles exactly its own slice of each weight, merging several source shards (N > M) or
# cutting one (N < M), reading them memory-mapped, one at a time. The model knows nothing of this.
import contextlib
import hashlib
import json
import logging
import mmap
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch

from llama import distributed, memory, quantize, sharding, validation
from llama.model import ModelArgs, Transformer

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
IGNORED_KEYS = ("rope.freqs",)  # older checkpoints carry the RoPE table; it is recomputed
TIED_KEY = "output.weight"  # may be absent (converted 3.2 checkpoints): the output then shares the embedding

def read_params(ckpt_dir: PathLike) -> dict:
    """params.json of a checkpoint directory, with clear errors for a missing dir or file."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist: give the directory holding params.json and consolidated.NN.pth")
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a Meta checkpoint directory holds params.json")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    validation.check_params(params, str(path), required=True)
    return params


def shard_paths(ckpt_dir: PathLike) -> list[Path]:
    """The consolidated.NN.pth shards, sorted: shard k belongs to model-parallel rank k.

    Raises ValueError when the numbering has gaps (a shard is missing) or other .pth files lie
    beside Meta's shards (two checkpoints mixed in one directory)."""
    paths = sorted(Path(ckpt_dir).glob("*.pth"))
    if not paths:
        raise FileNotFoundError(f"no checkpoint files (*.pth) in {ckpt_dir}")
    numbered = {int(m.group(1)): p for p in paths if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", p.name))}
    if numbered:
        others = [p.name for p in paths if p not in numbered.values()]
        if others:
            raise ValueError(f"{ckpt_dir} holds {others[:3]} beside its consolidated.NN.pth shards: remove them or use another directory")
        gaps = sorted(set(range(max(numbered) + 1)) - set(numbered))
        if gaps:
            missing = [f"consolidated.{k:02d}.pth" for k in gaps]
            raise ValueError(
                f"{ckpt_dir} has shards up to consolidated.{max(numbered):02d}.pth but {missing[:4]} "
                f"{'is' if len(missing) == 1 else 'are'} missing: download or copy the checkpoint again"
            )
        paths = [numbered[k] for k in sorted(numbered)]
    return paths


def expected_keys(n_layers: int, quant: Optional[quantize.QuantConfig] = None) -> set[str]:
    """Every state-dict key of an `n_layers`-layer Llama 3 checkpoint (output.weight included),
    quantized as `quant` says (each quantized weight with its scales, and zeros for int4)."""
    keys = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(n_layers):
        keys |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        keys |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        keys |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    if quant is not None:
        keys = {k for key in keys for k in (quant.keys(key) if quant.applies(key) else [key])}
    return keys


def check_keys(
    state_dict: dict, n_layers: int, source: str, allow_tied: bool = False, quant: Optional[quantize.QuantConfig] = None
) -> None:
    """Strict key check: only IGNORED_KEYS may be extra, and with `allow_tied` output.weight may be
    missing. Names the missing and unexpected keys."""
    want = expected_keys(n_layers, quant)
    have = set(state_dict) - set(IGNORED_KEYS)
    if allow_tied and TIED_KEY not in have:
        want -= set(quant.keys(TIED_KEY) if quant is not None and quant.applies(TIED_KEY) else [TIED_KEY])
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match a {n_layers}-layer Llama 3 model: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def load_shard(path: PathLike) -> dict:
    """One .pth shard, memory-mapped and with weights_only (no code runs on load).

    Raises ValueError naming the file when it is empty, truncated or not a PyTorch zip checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: the download or copy did not finish; fetch it again")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # what weights_only refused to construct
        if found is None:
            _damaged(path, e)
        name = found.group(1)
        if _names_real_object(name):  # intact, but holds something that is not a tensor
            raise ValueError(
                f"{path} holds Python objects other than tensors ({name}: code could run on loading it) and was "
                "refused for safety: use a checkpoint from a source you trust, saved as a plain state dict"
            ) from None
        raise ValueError(  # a name that exists nowhere: more likely damage than a payload
            f"{path} is corrupt or holds Python objects other than tensors (it names {name}) and was refused for "
            "safety: download or copy it again from a source you trust"
        ) from None
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged files
        _damaged(path, e)


def _names_real_object(dotted: str) -> bool:
    """Whether `module.attr` names an object of an already imported module (nothing is imported)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest imported module prefix
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is None:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj is not None
    return False


def _damaged(path: Path, e: Exception) -> None:
    """Raise the ValueError for a shard that could not be read, naming what it looks like."""
    reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    what = "is truncated or corrupt" if is_zip else "is not a PyTorch zip checkpoint (corrupt, or legacy format)"
    raise ValueError(f"{path} {what} ({reason}): download or copy it again") from None


# ---------------------------------------------------------------------------------------------
# Reading: a cheap pass over every shard's header, then each rank's slice one shard at a time


@dataclass
class Layout:
    """What a checkpoint's shards hold, checked against params.json: keys, shapes, dtypes."""

    paths: list[Path]
    shapes: dict[str, torch.Size]  # of one shard (all shards have the same)
    dtypes: dict[str, torch.dtype]
    tied: bool  # output.weight absent: the output layer shares the embedding
    quant: Optional[quantize.QuantConfig] = None  # params.json's quantization block: how the shards are stored

    @property
    def n_shards(self) -> int:
        return len(self.paths)

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)


def inspect_dir(ckpt_dir: PathLike) -> Layout:
    """inspect_checkpoint against the directory's own params.json: does it read as a whole checkpoint?"""
    return inspect_checkpoint(ckpt_dir, ModelArgs(**read_params(ckpt_dir)))


def inspect_checkpoint(ckpt_dir: PathLike, args: ModelArgs) -> Layout:
    """Read the shards' headers (no weights: they are memory-mapped and not touched) and check that
    their keys agree with a Llama 3 model, that all shards have the same shapes, and that those are
    the shapes params.json implies. Raises ValueError naming the first problem."""
    paths = shard_paths(ckpt_dir)
    n = len(paths)
    quant = quantize.QuantConfig.from_params(read_params(ckpt_dir))
    try:
        args.validate(n)
    except ValueError as e:
        raise ValueError(f"{ckpt_dir} has {n} shard(s), which does not fit its params.json: {e}") from None
    first: Optional[dict] = None
    for path in paths:
        shard = load_shard(path)
        check_keys(shard, args.n_layers, str(path), allow_tied=True, quant=quant)
        meta = {k: (v.shape, v.dtype) for k, v in shard.items() if k not in IGNORED_KEYS}
        del shard  # unmaps the file
        if first is None:
            first, first_path = meta, path
            continue
        for key, (shape, _) in meta.items():
            if key not in first:
                raise ValueError(f"{key} is in {path.name} but not in {first_path.name}: the shards do not match")
            if shape != first[key][0]:
                raise ValueError(
                    f"{key} has shape {tuple(shape)} in {path.name} but {tuple(first[key][0])} in "
                    f"{first_path.name}: the shards of {ckpt_dir} do not belong to one checkpoint"
                )
        if TIED_KEY in first and TIED_KEY not in meta:
            raise ValueError(f"{TIED_KEY} is in {first_path.name} but not in {path.name}: the shards do not match")
    for key in first:  # the shard's own order (Meta's: embedding, layers, norm, output)
        want = sharding.piece_shape(key, args, 0, n, quant)
        if first[key][0] != want:
            raise ValueError(
                f"params.json does not match the weights: {key} is {tuple(first[key][0])} in {first_path.name} "
                f"but params.json implies {tuple(want)} for {n} shard(s); use the params.json of this checkpoint"
            )
    return Layout(
        paths,
        {k: first[k][0] for k in first},
        {k: first[k][1] for k in first},
        tied=TIED_KEY not in first,
        quant=quant,
    )


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
    quant: Optional[quantize.QuantConfig] = None,
    reduce_max: Optional[quantize.ReduceMax] = None,
) -> dict[str, torch.Tensor]:
    """The state dict of model-parallel rank `rank` of `count`, assembled from the checkpoint's shards.

    Reads only the shards this rank needs, one at a time and memory-mapped, copying each piece into
    its final tensor (on `device`, in `dtype`; None keeps the stored dtype), so at most this rank's
    slice plus one source shard are resident. output.weight is left out for a tied checkpoint.

    A quantized checkpoint gives its stored quantized tensors (in their own dtypes). `quant` on a
    full-precision one quantizes on load: each weight is assembled alone (its source shards mapped
    together), quantized and dropped, so at most one full-precision tensor is resident beside the
    quantized ones; `reduce_max` (an all-reduce MAX over the ranks) makes the row-parallel int8 and
    fp8 scales those of the whole weight (quantize.quantize_weight). On a quantized checkpoint,
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
        return torch.empty(shape, dtype=kept if keep or dtype is None else dtype, device=device)

    sources = sharding.source_ranks(layout.n_shards, rank, count)
    show = distributed.is_rank0()
    if on_load is None:  # one source shard at a time, each filling its part of every tensor
        targets = {key: target(key) for key in layout.keys}
        covered = dict.fromkeys(targets, 0)
        progress = _progress(sum(t.nbytes for t in targets.values()), show)
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

    # quantizing on load: one tensor at a time, from all its source shards (mapped, not resident).
    # Largest first: the one full-precision tensor held (the 1B's embedding is a fifth of it) then
    # sits beside few quantized ones, and the peak is about the quantized model's size. The order
    # is the same on every rank (the shards' shapes), as reduce_max's all-reduces need.
    if show:
        logger.info("loading %s and quantizing (%s) ...", ", ".join(layout.paths[k].name for k in sources), quant.describe())
    shards = {k: _MappedShard(layout.paths[k]) for k in sources}
    progress = _progress(sum(sharding.piece_shape(key, args, rank, count).numel() * layout.dtypes[key].itemsize for key in layout.keys), show)
    state = {}
    for key in sorted(layout.keys, key=lambda k: -layout.shapes[k].numel()):
        t, done = target(key), 0
        for k, shard in shards.items():
            done = _copy_piece(key, t, done, shard, k, layout.n_shards, args, rank, count, None, progress)
        _check_covered(key, done, args, rank, count, None)
        if on_load.applies(key):
            state.update(quantize.quantize_weight(key, t, on_load, reduce_max))
            del t
            memory.release_freed_memory()  # the quantizing temporaries, before the next tensor is read
        else:
            state[key] = t
    return state


def check_quantization(stored: Optional[quantize.QuantConfig], asked: Optional[quantize.QuantConfig], ckpt_dir: PathLike) -> None:
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
    quant: Optional[quantize.QuantConfig],
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


# ---------------------------------------------------------------------------------------------
# Building the model


@contextlib.contextmanager
def _skeleton() -> Iterator[None]:
    """Construct modules without materialising weights: every one is loaded afterwards.

    fairscale's parallel layers build a full-size master weight on every rank and copy a slice out
    of it (_initialize_affine_weight) when the model-parallel size is above 1: a no-op here. They
    allocate with torch.Tensor(sizes), which ignores the default device, but leave it untouched
    (no resident memory); everything else goes to the meta device.
    """
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        with torch.device("meta"):
            yield
    finally:
        fs_layers._initialize_affine_weight = original


def load_model(
    ckpt_dir: PathLike,
    args: ModelArgs,
    mp_rank: int,
    mp_size: int,
    device: torch.device,
    dtype: torch.dtype,
    quant: Optional[quantize.QuantConfig] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Transformer:
    """Build the Transformer for model-parallel rank `mp_rank` of `mp_size` and fill it from the
    checkpoint, whatever its shard count N, provided N and mp_size divide one another.

    Weights are read memory-mapped and converted to `device`/`dtype` tensor by tensor; a checkpoint
    without output.weight gets an output layer tied to the embedding. Logs progress and the load time
    on rank 0. Raises ValueError / FileNotFoundError with one line saying what is wrong.

    `quant` quantizes the projections on load (llama.quantize; activations stay in `dtype`); a
    checkpoint written quantized (scripts/quantize.py) loads quantized as stored, and `quant`, when
    given, must match it. `compute_dtype`: the dtype quantized products run in (None: the measured
    choice per step, llama.kernels.quantized_kernel).
    """
    start = time.perf_counter()
    n_shards = len(shard_paths(ckpt_dir))
    sharding.check_process_count(args, n_shards, mp_size, str(ckpt_dir))
    _check_model_parallel_group(mp_size)
    layout = inspect_checkpoint(ckpt_dir, args)
    check_quantization(layout.quant, quant, ckpt_dir)
    active = quant or layout.quant  # the same stored form; quant says how to run it (w8a8)
    if active is not None:
        quantize.check_device(active.name, device)
    with _skeleton():
        model = Transformer(args)
    reduce_max = quantize.model_parallel_max() if quant is not None and layout.quant is None else None
    state = load_rank_state(ckpt_dir, args, mp_rank, mp_size, device, dtype, layout, quant, reduce_max)
    tied_output = layout.tied and not (active is not None and active.applies(TIED_KEY))
    if layout.tied and not tied_output:  # the embedding's quantized tensors serve the output too
        for key in active.keys(TIED_KEY):
            state[key] = state[key.replace("output.", "tok_embeddings.", 1)]
    if tied_output:
        state[TIED_KEY] = state["tok_embeddings.weight"]
    if active is not None:
        state = quantize.install(model, state, active, dtype, compute_dtype, consume=True)  # the state is this load's own
    model.load_state_dict(state, strict=True, assign=True)
    if tied_output:
        model.output.weight = model.tok_embeddings.weight  # one tensor, as in a tied model
    if distributed.is_rank0():
        logger.info(
            "loaded %s (%d shard(s)) on %d process(es)%s%s in %.2fs",
            ckpt_dir, n_shards, mp_size, ", output tied to the embedding" if tied_output else "",
            f", quantized ({active.describe()})" if active is not None else "",
            time.perf_counter() - start,
        )
    return model.eval()


def _check_model_parallel_group(mp_size: int) -> None:
    # the parallel layers take their shapes from fairscale's groups, not from our arguments
    have = fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else None
    if have != mp_size:
        raise ValueError(
            f"load_model was asked for {mp_size} model-parallel rank(s) but fairscale's model-parallel "
            f"size is {have}: call llama.distributed.setup(device, {mp_size}) first"
        )


# ---------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    state_dict: dict, params: dict, out_dir: PathLike, n_shards: int = 1, dtype: Optional[torch.dtype] = None
) -> None:
    """Write a full (unsharded) state dict as a Meta checkpoint of `n_shards` consolidated.NN.pth,
    split as fairscale splits it (KV heads repeated when n_shards exceeds n_kv_heads). A state dict
    without output.weight gives a tied checkpoint.

    A quantized state dict (llama.quantize's stored tensors) goes with params holding its
    `quantization` block; its scales split with their weights, and `dtype` leaves them as they are."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    args = ModelArgs(**params)
    quant = quantize.QuantConfig.from_params(params)
    for k in range(n_shards):
        shard = {}
        for key, t in state_dict.items():
            if key not in IGNORED_KEYS:
                t = sharding.shard_tensor(key, t, args, k, n_shards, quant)
            keep = dtype is None or (quant is not None and quant.applies(key))
            shard[key] = (t if keep else t.to(dtype)).detach().clone().contiguous()
        torch.save(shard, out_dir / f"consolidated.{k:02d}.pth")


# ---------------------------------------------------------------------------------------------
# Meta's checklist.chk: the md5 of every file, as Meta's download ships it

CHECKLIST = "checklist.chk"
HASH_CHUNK_BYTES = 8 << 20


def read_checklist(ckpt_dir: PathLike) -> dict[str, str]:
    """File name -> md5 from ckpt_dir/checklist.chk (lines "md5  name", as md5sum writes them)."""
    path = Path(ckpt_dir) / CHECKLIST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: verifying needs the checklist.chk that Meta's download ships")
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", parts[0]):
            raise ValueError(f"{path} line {n} is not 'md5  filename': {line[:80]!r}")
        sums[parts[1].strip().lstrip("*")] = parts[0].lower()  # md5sum marks binary mode with '*'
    return sums


def checklist_problems(ckpt_dir: PathLike, report: Optional[Callable[[str], None]] = None) -> list[str]:
    """Hash every file checklist.chk names; one line per file that is missing or does not match.
    `report` gets a progress line per file (name, size, time)."""
    ckpt_dir = Path(ckpt_dir)
    sums = read_checklist(ckpt_dir)
    problems = []
    for i, (name, want) in enumerate(sums.items(), 1):
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing (checklist.chk lists it)")
            continue
        start, digest = time.perf_counter(), hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        ok = digest.hexdigest() == want
        if not ok:
            problems.append(f"{name}: md5 {digest.hexdigest()} but checklist.chk says {want} (damaged or another version)")
        if report is not None:
            report(f"[{i}/{len(sums)}] {name} {'ok' if ok else 'MISMATCH'} "
                   f"({path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - start:.1f}s)")
    return problems


def verify_checklist(ckpt_dir: PathLike) -> None:
    """Raise ValueError naming every file of ckpt_dir that checklist.chk says is damaged or missing.
    Rank 0 hashes (logging progress); every rank gets the verdict, so all stop together."""
    read_checklist(ckpt_dir)  # on every rank: a missing or malformed checklist stops all of them alike
    problems = None
    if distributed.is_rank0():
        logger.info("verifying %s against %s ...", ckpt_dir, CHECKLIST)
        try:
            problems = checklist_problems(ckpt_dir, logger.info)
        except OSError as e:  # an unreadable file: the other ranks must hear of it, not wait
            problems = [f"{e.filename}: {e.strerror}"]
    problems = distributed.broadcast_object(problems)
    if problems:
        raise ValueError(f"{ckpt_dir} does not match its {CHECKLIST}: " + "; ".join(problems) + ": download those files again")
