#!/usr/bin/env python
"""Rewrite a Meta-format Llama 3 checkpoint with another number of shards, once, instead of at every load.

  python scripts/reshard.py CKPT_DIR OUT_DIR --shards M [--dtype bfloat16] [--overwrite]

The shard counts must divide one another (8 -> 1, 2, 4, 16, ...). Each output shard is assembled from
the memory-mapped source shards it needs, one source shard at a time (llama.checkpoint, the same code
that loads checkpoints), written, then read back and compared with what was meant to be written.
params.json is copied unchanged, and tokenizer.model when present. A quantized checkpoint
(scripts/quantize.py) reshards as stored: its scales split with their weights. OUT_DIR appears whole
or not at all (llama/atomic.py): an OUT_DIR that holds files is refused unless --overwrite, which
replaces it whole.
"""
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import atomic  # noqa: E402
from llama.runtime import policy  # noqa: E402
from llama.weights import checkpoint, rank_state, sharding  # noqa: E402
from llama.model import ModelArgs  # noqa: E402


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
    out_dtype = policy.parse_dtype(dtype) if dtype else None
    tied = " (output tied to the embedding)" if layout.tied else ""
    print(f"{src}: {layout.n_shards} shard(s) -> {shards} shard(s) in {out}{tied}")
    # published only once the whole result reads back as a checkpoint of `shards` shards
    with atomic.atomic_output_dir(out, overwrite, inputs=[src], verify=checkpoint.inspect_dir) as tmp:
        _write(src, tmp, args, layout, shards, out_dtype)
    print(f"done: {out}")


def _write(
    src: Path, out: Path, args: ModelArgs, layout: checkpoint.Layout, shards: int, out_dtype: Optional[torch.dtype]
) -> None:
    start = time.perf_counter()
    for k in range(shards):
        state = rank_state.load_rank_state(src, args, k, shards, "cpu", out_dtype, layout)
        path = out / f"consolidated.{k:02d}.pth"
        torch.save(state, path)
        _verify_shard(path, state, args, k, shards, layout.quant)
        print(f"[{k + 1}/{shards}] wrote and verified {path.name} ({time.perf_counter() - start:.1f}s)")
        del state
    shutil.copyfile(src / "params.json", out / "params.json")
    if (src / "tokenizer.model").is_file():
        shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
        print("copied tokenizer.model")


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


def main() -> None:
    try:
        fire.Fire(reshard)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
