"""A quantized layer's prefill dequantizes its weight block by block into a reused buffer (int8, and
int4 in its stored form) and equals dequantize-then-F.linear within the rounding of its compute
dtype, over several blocks and in one; int4 held in PyTorch's packed layout keeps the packed kernel."""
import functools

import pytest
import torch
import torch.nn.functional as F

from llama.runtime import quant_choice
from llama.weights import quant_blocks, quant_formats, quant_modules


@pytest.mark.parametrize("mode, path", [("int8", "pack"), ("int8", "dequant"), ("int4", "dequant")])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [64, None])  # three blocks, or the whole weight in one
def test_prefill_blocks_equal_dequantize_then_linear(mode, path, act, block_rows, monkeypatch):
    out_f, in_f, rows = 192, 128, 40
    if block_rows:
        scratch = {dt: torch.empty(block_rows * in_f, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
        monkeypatch.setattr(quant_blocks, "prefill_scratch", scratch.__getitem__)
    w = torch.randn(out_f, in_f) / in_f**0.5
    stored = quant_formats.quantize_int8(w) + (None,) if mode == "int8" else quant_formats.quantize_int4(w, 32)
    deq = quant_formats.dequantize(mode, *stored, group_size=32)
    lin = quant_modules.QuantizedLinear(mode, *stored, 32, act, path=path)
    assert quant_choice.step_for(rows) == "prefill" and lin._blocks_readable()
    calls = []
    monkeypatch.setattr(F, "linear", lambda x, wt, *a, f=F.linear: calls.append(wt.shape) or f(x, wt, *a))
    x = torch.randn(rows, in_f).to(act)
    got = lin(x)
    assert calls == [(block_rows or out_f, in_f)] * (out_f // (block_rows or out_f))
    want = F.linear(x.double(), deq.double())
    # int4's scales and zeros are applied in the compute dtype: a few of its roundings per weight
    tol = 8 * torch.finfo(act).eps * (x.double().abs() @ deq.double().abs().t()).max()
    assert got.dtype == act and (got.double() - want).abs().max() <= tol


def test_int4_in_the_packed_layout_keeps_the_packed_kernel_at_prefill():
    stored = quant_formats.quantize_int4(torch.randn(128, 128), 32)
    assert not quant_modules.QuantizedLinear("int4", *stored, 32, torch.bfloat16, path="pack")._blocks_readable()


def test_a_buffer_first_used_under_inference_mode_serves_products_outside_it(monkeypatch):
    fresh = functools.lru_cache(maxsize=None)(quant_blocks.prefill_scratch.__wrapped__)  # none made yet
    monkeypatch.setattr(quant_blocks, "prefill_scratch", fresh)
    stored = quant_formats.quantize_int8(torch.randn(96, 128)) + (None,)
    lin = quant_modules.QuantizedLinear("int8", *stored, 32, torch.float32, path="dequant")
    x = torch.randn(40, 128)
    with torch.inference_mode():
        inside = lin(x)
    assert torch.equal(lin(x), inside)  # an inference tensor as the buffer refused the write here
