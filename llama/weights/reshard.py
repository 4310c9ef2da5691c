"""Rewriting a Meta-format checkpoint on disk, once, instead of at every load: with another shard
count (reshard) or with weight-only quantized projections (quantize_checkpoint). Both write through
llama/atomic.py (the output directory appears whole and verified, or not at all) and log their
progress at INFO level (scripts/reshard.py and scripts/quantize.py show it)."""
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from llama import atomic
from llama.runtime import policy as kernel_policy
from llama.weights import checkpoint, quant_formats, rank_state, save, sharding
from llama.model import ModelArgs

logger = logging.getLogger(__name__)


def reshard(ckpt_dir: str, out_dir: str, shards: int, dtype: Optional[str] = None, overwrite: bool = False) -> None:
    """Write CKPT_DIR's weights to OUT_DIR as `shards` consolidated.NN.pth shards.

    Args:
        ckpt_dir: source checkpoint (params.json + consolidated.NN.pth).
        out_dir: new directory (or an empty one); it appears only once complete and verified.
        shards: number of output shards; it and the source's shard count must divide one another.
        dtype: output dtype (bfloat16, float16, float32); default: keep the stored one.
        overwrite: replace an OUT_DIR that holds files (whole: nothing of it is kept).
    """
    src, out = Path(ckpt_dir), Path(out_dir)
    atomic.check_destination(out, overwrite, inputs=[src])  # refuse before reading anything
    params = checkpoint.read_params(src)
    args = ModelArgs(**params)
    layout = checkpoint.inspect_checkpoint(src, args)
    sharding.check_process_count(args, layout.n_shards, shards, str(src))
    out_dtype = kernel_policy.parse_dtype(dtype) if dtype else None
    tied = " (output tied to the embedding)" if layout.tied else ""
    logger.info("%s: %d shard(s) -> %d shard(s) in %s%s", src, layout.n_shards, shards, out, tied)
    # published only once the whole result reads back as a checkpoint of `shards` shards
    with atomic.atomic_output_dir(out, overwrite, inputs=[src], verify=checkpoint.inspect_dir) as tmp:
        _write(src, tmp, args, layout, shards, out_dtype)
    logger.info("done: %s", out)


def _write(
    src: Path, out: Path, args: ModelArgs, layout: checkpoint.Layout, shards: int, out_dtype: Optional[torch.dtype]
) -> None:
    start = time.perf_counter()
    for k in range(shards):
        state = rank_state.load_rank_state(src, args, k, shards, "cpu", out_dtype, layout)
        path = out / f"consolidated.{k:02d}.pth"
        torch.save(state, path)
        _verify_shard(path, state, args, k, shards, layout.quant)
        logger.info("[%d/%d] wrote and verified %s (%.1fs)", k + 1, shards, path.name, time.perf_counter() - start)
        del state
    shutil.copyfile(src / "params.json", out / "params.json")
    if (src / "tokenizer.model").is_file():
        shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
        logger.info("copied tokenizer.model")


def _verify_shard(path: Path, state: dict, args: ModelArgs, rank: int, count: int, quant=None) -> None:
    """Re-read a written shard and compare it, tensor by tensor, with what was meant to be written."""
    back = checkpoint.load_shard(path)
    if set(back) != set(state):
        raise ValueError(f"{path} reads back with keys {sorted(set(back) ^ set(state))} changed")
    for key, t in state.items():
        want = sharding.piece_shape(key, args, rank, count, quant)
        if back[key].shape != want or not torch.equal(back[key], t):
            shape = tuple(back[key].shape)
            raise ValueError(f"{path}: {key} does not read back as written (shape {shape}, want {tuple(want)})")


def quantize_checkpoint(
    src: str,
    dst: str,
    mode: str = "int8",
    group_size: int = 32,
    quantize_output: bool = True,
    shards: Optional[int] = None,
    overwrite: bool = False,
) -> None:
    """Quantize checkpoint SRC into the new directory DST.

    Args:
        src: full-precision checkpoint (params.json + consolidated.NN.pth).
        dst: output directory: new or empty, unless --overwrite.
        mode: int8 (symmetric, a scale per output channel) or int4 (group-wise scales and zero points).
        group_size: int4 group size along the input dimension (32, 64, 128, 256).
        quantize_output: quantize the output projection and the embedding too (False keeps them as stored).
        shards: shard count of DST (default: SRC's); any count the model splits into.
        overwrite: replace an existing DST whole.
    """
    src_dir, out = Path(src), Path(dst)
    params = checkpoint.read_params(src_dir)
    if "quantization" in params:
        raise ValueError(f"{src_dir} is already quantized ({params['quantization']}): quantize its full-precision original")
    if mode not in quant_formats.FILE_MODES:
        raise ValueError(f"unknown mode {mode!r}: a quantized checkpoint holds {' or '.join(quant_formats.FILE_MODES)} (fp8 quantizes on load)")
    config = quant_formats.resolve(mode, group_size, quantize_output)
    args = ModelArgs(**params)
    layout = checkpoint.inspect_checkpoint(src_dir, args)
    n_out = shards or layout.n_shards
    args.validate(n_out)
    keys = [k for k in checkpoint.expected_keys(args.n_layers) if config.applies(k)]
    if mode == "int4":
        sharding.check_group_alignment(args, n_out, config.group_size, keys)
    atomic.check_destination(out, overwrite, inputs=[src_dir])  # refused before any work
    logger.info("%s: %d shard(s) -> %s, %d shard(s) in %s", src_dir, layout.n_shards, config.describe(), n_out, out)
    start = time.perf_counter()
    mapped = [checkpoint.load_shard(p) for p in layout.paths]  # memory-mapped: nothing read yet
    state = {}
    for key in layout.keys:
        full = sharding.merge_pieces(key, [m[key] for m in mapped], args)
        state.update(quant_formats.quantize_weight(key, full, config) if config.applies(key) else {key: full})
    # a tied checkpoint stays tied: the loader gives the output the embedding's quantized tensors
    logger.info("quantized %d projections in %.1fs", len(keys), time.perf_counter() - start)
    # published only once the whole result reads back as a quantized checkpoint
    with atomic.atomic_output_dir(out, overwrite, inputs=[src_dir], verify=checkpoint.inspect_dir) as tmp:
        save.save_checkpoint(state, {**params, "quantization": config.to_params()}, tmp, n_shards=n_out)
        if (src_dir / "tokenizer.model").is_file():
            shutil.copyfile(src_dir / "tokenizer.model", tmp / "tokenizer.model")
    size = sum(p.stat().st_size for p in out.glob("*.pth"))
    logger.info("done: %s (%.3f GB, %.1fs)", out, size / 1e9, time.perf_counter() - start)
