#!/usr/bin/env python
"""Write a weight-only quantized copy of a Meta-format Llama 3 checkpoint, in Meta's layout.

  python scripts/quantize.py SRC DST --mode int8|int4 [--group_size 32] [--quantize_output True] [--shards N] [--overwrite]

DST gets params.json with a `quantization` block ({"mode": ..., "group_size": ..., "output": ...}),
consolidated.NN.pth shards holding each projection's stored quantized tensors (keys and layout:
llama/weights/quant_formats.py and docs/quantization.md), the embedding and norms as stored, and
tokenizer.model when SRC has one. Llama.build loads DST directly; quantizing SRC on load gives the
same tensors bit for bit. One full-precision tensor at a time is read (memory-mapped) and quantized;
the quantized model is held whole until it is written. DST appears whole or not at all
(llama/atomic.py): a DST that holds files is refused unless --overwrite, which replaces it whole.
"""
from llama import cli
from llama.weights.reshard import quantize_checkpoint

if __name__ == "__main__":
    cli.log_to_stdout("llama.weights.reshard")
    cli.run(quantize_checkpoint)
