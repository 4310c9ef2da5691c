#!/usr/bin/env python
"""Rewrite a Meta-format Llama 3 checkpoint with another number of shards, once, instead of at every load.

  python scripts/reshard.py CKPT_DIR OUT_DIR --shards M [--dtype bfloat16] [--overwrite]

The shard counts must divide one another (8 -> 1, 2, 4, 16, ...). Each output shard is assembled from
the memory-mapped source shards it needs, one source shard at a time (llama.weights, the same code
that loads checkpoints), written, then read back and compared with what was meant to be written.
params.json is copied unchanged, and tokenizer.model when present. A quantized checkpoint
(scripts/quantize.py) reshards as stored: its scales split with their weights. OUT_DIR appears whole
or not at all (llama/atomic.py): an OUT_DIR that holds files is refused unless --overwrite, which
replaces it whole.
"""
from llama import cli
from llama.weights.reshard import reshard

if __name__ == "__main__":
    cli.log_to_stdout("llama.weights.reshard")
    cli.run(reshard)
