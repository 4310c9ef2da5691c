"""This package's own CPU kernels (llama/runtime/native.py, csrc/gemv.cpp): each product equals
dequantize-then-F.linear within float rounding at every instruction set this CPU has (each forced),
the quantized layers and the greedy tokens are those of the dequantized path, and a machine without
a C++ compiler runs everything on PyTorch's own products (the fallback, logged once)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import helpers
from llama.runtime import native, quant_choice
from llama.runtime import quant_kernels as qk
from llama.weights import quant_formats, quant_modules

REPO = Path(__file__).resolve().parent.parent
ISAS = native.available_isas() if native.kernels() is not None else []
needs_kernels = pytest.mark.skipif(not ISAS, reason="no C++ compiler here (the fallback is tested below)")


def close(got: torch.Tensor, want: torch.Tensor, inputs: int) -> None:
    """Equal within the rounding of float32 sums of `inputs` terms taken in another order."""
    tol = 4 * inputs * torch.finfo(torch.float32).eps * want.abs().max().item()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 9])  # one row, a partial pass of 4, several passes
def test_each_kernel_equals_dequantize_then_linear(isa, rows):
    gen = torch.Generator().manual_seed(rows)
    n, k = 70, 512  # 70 output rows: blocks of 4 and a tail
    w, x = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)
    q, s = quant_formats.quantize_int8(w)
    close(native.int8_mm(x, q, s.float(), isa), F.linear(x, q.float() * s.float()[:, None]), k)
    for group in (32, 128):
        q4, s4, z4 = quant_formats.quantize_int4(w, group)
        want = F.linear(x, qk.dequantize_int4(qk.unpack_int4(q4), s4, z4, group))
        close(native.int4_mm(x, q4, s4, z4, group, isa), want, k)
    wb = w.bfloat16()
    close(native.bf16_mm(x, wb, isa), F.linear(x, wb.float()), k)


@needs_kernels
def test_the_kernels_refuse_what_they_cannot_read():
    q = torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="is not contiguous torch.float32"):
        native.int8_mm(torch.zeros(1, 64), q, torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not match the weight's 64 inputs"):
        native.int8_mm(torch.zeros(1, 32), q, torch.ones(8))
    with pytest.raises(ValueError, match="group size 48"):
        native.int4_mm(torch.zeros(1, 96), torch.zeros(8, 48, dtype=torch.uint8), torch.ones(8, 2), torch.ones(8, 2), 48)


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_layer_on_the_native_path_computes_the_dequantized_product(mode):
    w, x = torch.randn(96, 256), torch.randn(2, 5, 256)
    stored = quant_formats.quantize_int8(w) + (None,) if mode == "int8" else quant_formats.quantize_int4(w, 32)
    own = quant_modules.QuantizedLinear(mode, *stored, 32, torch.float32, path="native")
    ref = quant_modules.QuantizedLinear(mode, *stored, 32, torch.float32, path="dequant")
    assert {p for p, _ in own.kernels.values()} == {"native"}
    close(own(x), ref(x), 256)
    close(own(x[:, :1]), ref(x[:, :1]), 256)  # one row: the decode kernel


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_tokens_are_unchanged_through_the_policy(tiny_ckpt, byte_tokenizer, monkeypatch, mode):
    """The policy picking the native kernels (faked fastest) gives the dequantized path's tokens."""
    from llama import Llama

    out = {}
    for path in ("native", "dequant"):
        monkeypatch.setattr(quant_choice, "quantized_kernel", lambda m, step, dt=None, p=path: (p, torch.float32))
        llama = Llama.build(str(tiny_ckpt), str(byte_tokenizer), 64, 1, dtype="float32", quantize=mode)
        assert llama.model.layers[0].attention.wq.kernels["decode"][0] == path
        prompt = llama.tokenizer.encode("native kernels", bos=True, eos=False)
        out[path] = llama.generate([prompt], 12, temperature=0)[0]
    assert out["native"] == out["dequant"]


def test_without_a_compiler_the_products_run_on_pytorchs_own_kernels(tmp_path):
    """The compiler hidden (CXX naming a missing binary), in a fresh build directory: no native
    kernels, one log line, and a quantized layer still chooses and runs a PyTorch path."""
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from llama.runtime import native, quant_choice\n"
        "from llama.weights import quant_formats, quant_modules\n"
        "assert native.kernels() is None and native.kernels() is None\n"
        "w = torch.randn(64, 128)\n"
        "lin = quant_modules.QuantizedLinear('int8', *quant_formats.quantize_int8(w), None, 32, torch.float32)\n"
        "assert 'native' not in {p for p, _ in lin.kernels.values()}, lin.kernels\n"
        "print('ran', tuple(lin(torch.randn(1, 128)).shape))\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), native.KERNELS_DIR_ENV: str(tmp_path / "kernels"),
           "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ran (1, 64)" in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.startswith("CPU kernels:")]
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "PyTorch's own products run" in lines[0]
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").rglob("*.so"))
