#!/usr/bin/env python
"""Write a weight-only quantized copy of a Meta-format Llama 3 checkpoint, in Meta's layout.

  python scripts/quantize.py SRC DST --mode int8|int4 [--group_size 32] [--quantize_output True] [--shards N] [--overwrite]

DST gets params.json with a `quantization` block ({"mode": ..., "group_size": ..., "output": ...}),
consolidated.NN.pth shards holding each projection's stored quantized tensors (keys and layout:
llama/quantize.py and the README's "Quantization" section), the embedding and norms as stored, and
tokenizer.model when SRC has one. Llama.build loads DST directly; quantizing SRC on load gives the
same tensors bit for bit. One full-precision tensor at a time is read (memory-mapped) and quantized;
the quantized model is held whole until it is written. DST appears whole or not at all
(llama/atomic.py): a DST that holds files is refused unless --overwrite, which replaces it whole.
"""
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama import atomic, cli  # noqa: E402
from llama.weights import checkpoint, quant_formats, save, sharding  # noqa: E402
from llama.model import ModelArgs  # noqa: E402


def main(
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
        raise ValueError(f"unknown mode {mode!r}: scripts/quantize.py writes {' or '.join(quant_formats.FILE_MODES)} (fp8 quantizes on load)")
    config = quant_formats.resolve(mode, group_size, quantize_output)
    args = ModelArgs(**params)
    layout = checkpoint.inspect_checkpoint(src_dir, args)
    n_out = shards or layout.n_shards
    args.validate(n_out)
    keys = [k for k in checkpoint.expected_keys(args.n_layers) if config.applies(k)]
    if mode == "int4":
        sharding.check_group_alignment(args, n_out, config.group_size, keys)
    atomic.check_destination(out, overwrite, inputs=[src_dir])  # refused before any work
    print(f"{src_dir}: {layout.n_shards} shard(s) -> {config.describe()}, {n_out} shard(s) in {out}")
    start = time.perf_counter()
    mapped = [checkpoint.load_shard(p) for p in layout.paths]  # memory-mapped: nothing read yet
    state = {}
    for key in layout.keys:
        full = sharding.merge_pieces(key, [m[key] for m in mapped], args)
        state.update(quant_formats.quantize_weight(key, full, config) if config.applies(key) else {key: full})
    # a tied checkpoint stays tied: the loader gives the output the embedding's quantized tensors
    print(f"quantized {len(keys)} projections in {time.perf_counter() - start:.1f}s")
    # published only once the whole result reads back as a quantized checkpoint
    with atomic.atomic_output_dir(out, overwrite, inputs=[src_dir], verify=checkpoint.inspect_dir) as tmp:
        save.save_checkpoint(state, {**params, "quantization": config.to_params()}, tmp, n_shards=n_out)
        if (src_dir / "tokenizer.model").is_file():
            shutil.copyfile(src_dir / "tokenizer.model", tmp / "tokenizer.model")
    size = sum(p.stat().st_size for p in out.glob("*.pth"))
    print(f"done: {out} ({size / 1e9:.3f} GB, {time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    cli.run(main)
