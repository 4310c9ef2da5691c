"""An int8 model's load takes at most 0.6x the memory of the bfloat16 one: the peak resident memory
each load adds, each in a fresh process, quantizing on load as Llama.build(quantize="int8") does."""
import json
import subprocess
import sys

import pytest
import torch

import helpers
from llama.args import ModelArgs
from llama.weights import checkpoint, save, sharding

# the 1B's layer count and proportions (a tied vocabulary matrix, feed-forward 4x wide) at half
# its width: a load's peak holds one full-precision matrix beside the quantized ones, as the 1B's does
PARAMS = {"dim": 1024, "n_layers": 16, "n_heads": 16, "n_kv_heads": 4, "vocab_size": 16384, "multiple_of": 256,
          "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "rope_theta": 500000.0}

LOAD = """
import json, sys, torch
from llama import distributed, memory
from llama.args import ModelArgs
from llama.runtime import quant_choice
from llama.weights import checkpoint, loader, quant_formats, quant_modules

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

ckpt, mode = sys.argv[1], sys.argv[2]
distributed.setup(torch.device("cpu"))
args = ModelArgs(**checkpoint.read_params(ckpt), max_seq_len=16, max_batch_size=1)
quant = quant_formats.resolve(None if mode == "none" else mode)
if quant is not None:
    # measured once per machine and kept: its probes stream twice the last-level cache, the same
    # bytes for any model, which would set this small model's peak whenever they run in this process
    quant_choice.quantized_kernel(quant.name, "decode", torch.bfloat16)
    memory.release_freed_memory()
base = status("VmRSS")
model = loader.load_model(ckpt, args, 0, 1, torch.device("cpu"), torch.bfloat16, quant, torch.bfloat16)
print(json.dumps({"added": status("VmHWM") - base, "held": quant_modules.quantized_bytes(model)}))
"""


def load_memory(ckpt, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOAD, str(ckpt), mode], capture_output=True, text=True,
                          env=helpers.child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_int8_load_peak_is_at_most_0_6x_bfloat16(tmp_path):
    args = ModelArgs(**PARAMS)
    g = torch.Generator().manual_seed(0)
    keys = sorted(checkpoint.expected_keys(args.n_layers) - {checkpoint.TIED_KEY})  # tied, as the 1B ships
    state = {k: torch.randn(sharding.full_shape(k, args), generator=g).bfloat16() for k in keys}
    save.save_checkpoint(state, PARAMS, tmp_path, n_shards=1)
    del state
    bf16, int8 = load_memory(tmp_path, "none"), load_memory(tmp_path, "int8")
    assert int8["held"] <= 0.51 * bf16["held"]
    assert int8["added"] <= 0.6 * bf16["added"], (int8, bf16)
