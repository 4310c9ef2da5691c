"""This package's own CPU kernels (llama/runtime/native.py, csrc/gemv.cpp, csrc/q8.cpp): each product
equals dequantize-then-F.linear within float rounding at every instruction set this CPU has (each
forced), those with int8 activations the same of the activations rounded per block as they say; the
quantized layers and the greedy tokens are those of the dequantized path (with int8 activations:
perplexity within the quantization bounds), and a machine without a C++ compiler runs everything on
PyTorch's own products (the fallback, logged once)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import helpers
from llama.parallel_layers import project
from llama.runtime import native, quant_choice
from llama.runtime import quant_kernels as qk
from llama.weights import quant_blocks, quant_formats, quant_modules

REPO = Path(__file__).resolve().parent.parent
ISAS = native.available_isas() if native.kernels() is not None else []
A8_ISAS = native.available_isas(int8_activations=True) if native.kernels() is not None else []
BF16_ISAS = native.available_isas(bf16_activations=True) if native.kernels() is not None else []
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
@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])  # each row count of a pass, and several passes
def test_the_bfloat16_product_with_bfloat16_activations_is_f_linear_in_float32(isa, rows):
    """bfloat16 x bfloat16 products summed in float32 (F.linear in bfloat16 computes them so, summed
    in another order): float32 results, and bfloat16 ones rounded as PyTorch rounds; inner sizes that
    take each width of vector and none, activations small (one row per step) and large (several)."""
    gen = torch.Generator().manual_seed(rows)
    for n, k in ((70, 512), (37, 8192), (11, 96), (13, 48), (9, 100)):  # 96: a step and a vector past it
        w, x = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(rows, k, generator=gen).bfloat16()
        want = F.linear(x.float(), w.float())
        close(native.bf16_mm(x, w, isa), want, k)
        got = native.bf16_mm(x, w, isa, out_dtype=torch.bfloat16)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, native.bf16_mm(x, w, isa).bfloat16())  # the same sums, rounded as PyTorch rounds
        if isa == BF16_ISAS[-1]:  # the model's entry: any leading dimensions, the widest instruction set
            assert torch.equal(native.bf16_linear(x.view(rows, 1, k), w), got.view(rows, 1, n))


def rounded_per_block(x: torch.Tensor, block: int = native.A8_BLOCK) -> torch.Tensor:
    """x (rows, k) rounded as the int8-activation kernels say they round it, in float64: symmetric
    int8 per block of `block` columns (the last one may be short), scale max|x| / 127 in float32."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for b in range(0, x.shape[1], block):
        xb = x[:, b : b + block].float()
        d = xb.abs().amax(dim=1, keepdim=True) / 127
        q = torch.where(d == 0, 0.0, torch.round(xb / d).clamp(-127, 127))
        out[:, b : b + block] = q.double() * d.double()
    return out


@needs_kernels
@pytest.mark.parametrize("isa", A8_ISAS)
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_each_int8_activation_kernel_equals_the_rounded_activations_times_the_weights(isa, rows):
    """int8 x int8 and int8 x int4 integer products = F.linear in float64 of the activations rounded
    per block and the dequantized weights; odd output counts, an inner size with a short last block
    (int8) and with half a vector left over (int4, 96 columns), every int4 group size."""
    gen = torch.Generator().manual_seed(rows)
    for n, k in ((70, 512), (13, 100), (9, 96)):
        w, x = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)
        x[0, :32] = 0  # an all-zero block: scale 0
        xr = rounded_per_block(x)
        q, s = quant_formats.quantize_int8(w)
        close(native.int8a_mm(x, q, s.float(), isa).double(), F.linear(xr, q.double() * s.double()[:, None]), k)
        for group in (32, 64, 128, 256):
            if k % group == 0:
                q4, s4, z4 = quant_formats.quantize_int4(w, group)
                want = F.linear(xr, qk.dequantize_int4(qk.unpack_int4(q4), s4, z4, group).double())
                close(native.int4a_mm(x, q4, s4, z4, group, isa).double(), want, k)


@needs_kernels
def test_int8_activations_stay_within_their_rounding_of_the_float_product():
    """Against the float32 activations' product: each activation moves by at most half a step of
    its block (1/254 of the block's max; for normal values a root-mean-square of about 0.5% of
    their own), so the product moves by about that, under 1% of its size."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(256, 2048, generator=gen), torch.randn(4, 2048, generator=gen)
    q, s = quant_formats.quantize_int8(w)
    want = F.linear(x, q.float() * s.float()[:, None])
    err = (native.int8a_mm(x, q, s.float()) - want).norm() / want.norm()
    assert 1e-4 < err < 1e-2  # rounded (not the float product), by about its rounding
    q4, s4, z4 = quant_formats.quantize_int4(w, 32)
    want = F.linear(x, qk.dequantize_int4(qk.unpack_int4(q4), s4, z4, 32))
    err = (native.int4a_mm(x, q4, s4, z4, 32) - want).norm() / want.norm()
    assert 1e-4 < err < 1e-2


@needs_kernels
def test_the_kernels_refuse_what_they_cannot_read():
    q = torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="is not contiguous torch.float32"):
        native.int8_mm(torch.zeros(1, 64), q, torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not match the weight's 64 inputs"):
        native.int8_mm(torch.zeros(1, 32), q, torch.ones(8))
    with pytest.raises(ValueError, match="group size 48"):
        native.int4_mm(torch.zeros(1, 96), torch.zeros(8, 48, dtype=torch.uint8), torch.ones(8, 2), torch.ones(8, 2), 48)
    with pytest.raises(ValueError, match="group size 96 must divide 192 and be a power of two"):
        native.int4a_mm(torch.zeros(1, 192), torch.zeros(8, 96, dtype=torch.uint8), torch.ones(8, 2), torch.ones(8, 2), 96)


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


@needs_kernels
def test_a_bfloat16_model_decodes_the_same_greedy_tokens_through_the_native_product(monkeypatch):
    """The policy planning this package's bfloat16 product for decode and small batches (as it does
    where that is measured fastest): the demo model's greedy tokens, one prompt and two together,
    are those of PyTorch's bfloat16 products, and the decode steps' products did go through it."""
    import dataclasses

    from llama import Llama
    from llama.demo import DEMO_DIR, TOKENIZER_PATH
    from llama.runtime import compute
    from llama.runtime import policy as kernel_policy

    calls, product = [], native.bf16_linear
    monkeypatch.setattr(compute.native, "bf16_linear", lambda x, w: calls.append(x.shape[:-1].numel()) or product(x, w))
    llama = Llama.build(str(DEMO_DIR), str(TOKENIZER_PATH), 128, 2, device="cpu", dtype="bfloat16")
    plain = kernel_policy.uniform(torch.bfloat16)  # PyTorch's products
    own = dataclasses.replace(plain, decode=kernel_policy.StepKernels(torch.bfloat16, native=True),
                              small=kernel_policy.StepKernels(torch.bfloat16, native=True))
    prompts = [llama.tokenizer.encode(t, bos=True, eos=False) for t in ("Once upon a time", "The little robot said")]
    out = {}
    calls.clear()  # the start-up probe's
    for name, policy in (("plain", plain), ("own", own)):
        llama.policy = policy
        out[name] = (llama.generate(prompts[:1], 16, temperature=0)[0], llama.generate(prompts, 16, temperature=0)[0])
        assert bool(calls) == (name == "own")
    assert out["own"] == out["plain"]
    assert {1, 2} <= set(calls)  # one-row and two-row decode steps


def test_without_a_compiler_the_products_run_on_pytorchs_own_kernels(tmp_path):
    """The compiler hidden (CXX naming a missing binary), in a fresh build directory: no native
    kernels, one log line, a quantized layer still chooses and runs a PyTorch path, and a bfloat16
    step planned on this package's bfloat16 product runs PyTorch's."""
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from llama.runtime import native, quant_choice\n"
        "from llama.weights import quant_formats, quant_modules\n"
        "assert native.kernels() is None and native.kernels() is None\n"
        "w = torch.randn(64, 128)\n"
        "lin = quant_modules.QuantizedLinear('int8', *quant_formats.quantize_int8(w), None, 32, torch.float32)\n"
        "assert not {'native', 'native_a8'} & {p for p, _ in lin.kernels.values()}, lin.kernels\n"
        "print('ran', tuple(lin(torch.randn(1, 128)).shape))\n"
        # a bfloat16 step planned on the native product: PyTorch's product runs (and the probe has no native case)
        "from llama.runtime import compute, probes\n"
        "from llama.runtime import policy as kp\n"
        "p = kp.Policy(torch.bfloat16, *[kp.StepKernels(torch.bfloat16, native=True)] * 3)\n"
        "x, wb = torch.randn(1, 1, 128).bfloat16(), w.bfloat16()\n"
        "with compute.kernels_for(torch.zeros(1, 1, dtype=torch.long), p):\n"
        "    assert torch.equal(torch.nn.functional.linear(x, wb), torch.nn.functional.linear(x, wb))\n"
        "assert all(k[2] != kp.NATIVE for k in probes.measure(repeats=1, from_memory=False))\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), native.KERNELS_DIR_ENV: str(tmp_path / "kernels"),
           "PYTHONPATH": str(REPO)}
    env.pop(quant_choice.WEIGHT_ONLY_ENV, None)  # int8 activations allowed: still no native path without kernels
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ran (1, 64)" in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.startswith("CPU kernels:")]
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "PyTorch's own products run" in lines[0]
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").rglob("*.so"))


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_layer_on_the_int8_activation_path_computes_the_rounded_product(mode):
    w, x = torch.randn(96, 256), torch.randn(2, 5, 256)
    stored = quant_formats.quantize_int8(w) + (None,) if mode == "int8" else quant_formats.quantize_int4(w, 32)
    lin = quant_modules.QuantizedLinear(mode, *stored, 32, torch.bfloat16, path="native_a8")
    assert set(lin.kernels.values()) == {("native_a8", torch.float32)}
    got = lin(x.bfloat16())
    want = F.linear(rounded_per_block(x.bfloat16().reshape(10, 256)), quant_formats.dequantize(mode, *stored, 32).double())
    assert got.dtype == torch.bfloat16
    close(got.double().reshape(10, 96), want.to(torch.bfloat16).double(), 256 * 128)  # returned in bfloat16


@pytest.fixture
def int8_activations_allowed(monkeypatch):
    """The suite runs weight-only (conftest): these tests measure with the int8-activation kernels."""
    monkeypatch.delenv(quant_choice.WEIGHT_ONLY_ENV, raising=False)
    quant_choice._measured_quantized_policy.cache_clear()
    yield
    quant_choice._measured_quantized_policy.cache_clear()


@needs_kernels
def test_the_policy_takes_int8_activations_only_for_decode_where_they_win_and_names_them(int8_activations_allowed, monkeypatch):
    probed = []

    def fake_best_time(fn, repeats, give_up=float("inf"), median=False):
        probed.append(fn.kernel)
        return 1e-4 if fn.kernel in (native.int8a_mm, native.int4a_mm) else 1e-3

    monkeypatch.setattr(quant_choice.cpu, "best_time", fake_best_time)
    monkeypatch.setattr(quant_choice, "WARM_UP_GIVE_UP", float("inf"))  # the fake times decide alone
    # the fake times make the probes' size irrelevant: small weights, two copies, not the 1B's shape over twice the cache
    monkeypatch.setattr(quant_choice, "QUANT_PROBE_SHAPE", {step: (64, 256) for step in quant_choice.QUANT_PROBE_SHAPE})
    monkeypatch.setattr(quant_choice.cpu, "streamed_copies", lambda n_bytes: 2)
    policy = quant_choice._measured_quantized_policy(1, True)
    assert probed.count(native.int8a_mm) == probed.count(native.int4a_mm) == len(quant_choice.A8_STEPS) * quant_choice.PROBE_ROUNDS
    for mode in quant_choice.QUANT_MODES:
        assert policy.kernel(mode, "decode") == policy.kernel(mode, "small") == ("native_a8", torch.float32)
        assert policy.kernel(mode, "prefill")[0] != "native_a8"  # not a candidate there
        assert policy.kernel(mode, "decode", torch.bfloat16)[0] != "native_a8"  # float32 activations in
    assert "native_a8 rounds the activations to int8 per block of 32 (LLAMA_WEIGHT_ONLY=1" in policy.describe()
    # LLAMA_WEIGHT_ONLY=1: not a candidate, measured apart (not the kept choice of the other setting)
    monkeypatch.setenv(quant_choice.WEIGHT_ONLY_ENV, "1")
    probed.clear()
    assert quant_choice.quantized_kernel("int8", "decode")[0] != "native_a8"
    assert native.int8a_mm not in probed and native.int4a_mm not in probed and probed


def _demo(monkeypatch, path: str, quantize, dtype: str = "float32"):
    """The demo model with every quantized product on `path` (for native_a8: prefill too, to score a text)."""
    from llama import Llama
    from llama.demo import DEMO_DIR, TOKENIZER_PATH

    monkeypatch.setattr(quant_choice, "quantized_kernel", lambda m, step, dt=None: (path, torch.float32))
    return Llama.build(str(DEMO_DIR), str(TOKENIZER_PATH), 128, 1, device="cpu", dtype=dtype, quantize=quantize)


def _perplexity(llama, text: str) -> float:
    from llama.eval.scoring import windowed_nll

    ids = llama.tokenizer.encode(text, bos=True, eos=False)[:257]  # two windows of 128
    nll, n = windowed_nll(llama.model, ids, 128, 128, batch_size=2)
    return math.exp(nll / n)


@pytest.fixture(scope="module")
def heldout_bf16_perplexity():
    text = (REPO / "tests" / "data" / "demo_heldout_head.txt").read_text()[:1500]
    with pytest.MonkeyPatch.context() as mp:
        return text, _perplexity(_demo(mp, "dequant", None, "bfloat16"), text)


@needs_kernels
@pytest.mark.parametrize("mode,bound", [("int8", 0.01), ("int4", 0.05)])
def test_int8_activations_keep_the_demo_models_perplexity_and_mostly_its_tokens(mode, bound, monkeypatch,
                                                                                 heldout_bf16_perplexity):
    """Perplexity on held-out text within the quantization bound of bfloat16's (int8 1%, int4 5%);
    the greedy tokens against the weight-only product's are counted (rounded activations may change
    some) and the share that match is printed."""
    text, ppl = heldout_bf16_perplexity
    a8 = _demo(monkeypatch, "native_a8", mode)
    assert a8.model.layers[0].feed_forward.w1.kernels["decode"] == ("native_a8", torch.float32)
    ppl_a8 = _perplexity(a8, text)
    assert abs(ppl_a8 / ppl - 1) <= bound, (ppl, ppl_a8)
    prompt = a8.tokenizer.encode("Once upon a time", bos=True, eos=False)
    tokens = a8.generate([prompt], 16, temperature=0)[0][0]
    # weight-only: the same layers on the float-activation kernels (dequantize-then-F.linear's products,
    # tested above), which read the same stored form
    for lin in a8.model.modules():
        if isinstance(lin, quant_modules.QuantizedLinear):
            lin.kernels = {step: ("native", torch.float32) for step in lin.kernels}
    weight_only = a8.generate([prompt], 16, temperature=0)[0][0]
    same = sum(a == b for a, b in zip(tokens, weight_only))
    print(f"{mode}: perplexity {ppl_a8:.3f} with int8 activations, {ppl:.3f} bfloat16; "
          f"greedy tokens {same}/{len(weight_only)} as the weight-only product's")


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("a8", [False, True])
def test_the_unchecked_entry_of_the_model_equals_the_checked_ones(mode, a8):
    """native.quantized_linear (QuantizedLinear's decode: no weight checks) = int8(a)_mm / int4(a)_mm."""
    g = torch.Generator().manual_seed(5)
    stored = quant_formats.quantize_weight("layers.0.attention.wq.weight", torch.randn(96, 256, generator=g),
                                           quant_formats.resolve(mode))
    q, scales, *zeros = stored.values()
    x = torch.randn(2, 3, 256, generator=g).bfloat16()
    x2 = x.reshape(6, 256).float()
    if mode == "int8":
        got = native.quantized_linear(x, q, scales.float(), None, 0, a8)
        want = (native.int8a_mm if a8 else native.int8_mm)(x2, q, scales.float())
    else:
        got = native.quantized_linear(x, q, scales, zeros[0], 32, a8)
        want = (native.int4a_mm if a8 else native.int4_mm)(x2, q, scales, zeros[0], 32)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 96)
    assert torch.equal(got, want.bfloat16().reshape(2, 3, 96))


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 6])
def test_one_call_over_several_weights_equals_each_weight_alone(mode, rows):
    """native.quantized_products with int8 activations (one call for a block's wq, wk, wv): each
    result equals that weight's own checked product, float32 in and out, and bfloat16 in and out
    (the bfloat16 result is the float32 one rounded); weight row counts that split the threads'
    range inside a weight and across them."""
    g = torch.Generator().manual_seed(rows)
    config = quant_formats.resolve(mode)
    stored = [list(quant_formats.quantize_weight("layers.0.attention.wq.weight", torch.randn(n, 256, generator=g),
                                                 config).values()) for n in (96, 13, 40)]
    weights = [(q, s.float(), None) if mode == "int8" else (q, s, z[0]) for q, s, *z in stored]
    x = torch.randn(rows, 256, generator=g).bfloat16()
    alone = [native.int8a_mm(x.float(), q, s) if z is None else native.int4a_mm(x.float(), q, s, z, 32)
             for q, s, z in weights]
    for got, want in zip(native.quantized_products(x.float()[None], weights, 32, True), alone):
        assert torch.equal(got[0], want)
    for got, want in zip(native.quantized_products(x[None], weights, 32, True), alone):
        assert got.dtype == torch.bfloat16 and torch.equal(got[0], want.bfloat16())


@needs_kernels
def test_a_block_takes_wq_wk_wv_and_w1_w3_in_one_call_unless_a_hook_watches():
    """llama.parallel_layers.project on quantized projections with int8 activations at decode: one
    kernel call for wq, wk, wv (and one for w1, w3), the outputs of each layer alone; a forward hook
    on wk makes it call each layer, so the hook sees its call."""
    g = torch.Generator().manual_seed(0)
    layers = [quant_modules.QuantizedLinear("int4", *quant_formats.quantize_int4(torch.randn(n, 256, generator=g), 32),
                                            32, torch.bfloat16, path="native_a8") for n in (256, 64, 64)]
    x = torch.randn(1, 1, 256, generator=g).bfloat16()
    calls = []
    real = native.quantized_products
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "quantized_products", lambda *a: calls.append(len(a[1])) or real(*a))
        joint = project(x, *layers)
        assert calls == [3]
        for got, layer in zip(joint, layers):
            assert torch.equal(got, layer(x))
        seen = []
        layers[1].register_forward_hook(lambda m, i, o: seen.append(o))
        calls.clear()
        alone = project(x, *layers)
        assert calls == [1, 1, 1] and len(seen) == 1
        assert all(torch.equal(a, b) for a, b in zip(alone, joint))


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_int4_rows_dequantize_to_the_pytorch_forms_values_bit_for_bit(isa):
    """native.int4_into (a prefill's blocks) = quant_blocks.int4_into's PyTorch ops, every rounding
    alike: bfloat16 and float32, each group size, an odd row count."""
    g = torch.Generator().manual_seed(3)
    for group in quant_formats.GROUP_SIZES:
        q, s, z = quant_formats.quantize_int4(torch.randn(37, 512, generator=g) * 0.02, group)
        for dt in (torch.bfloat16, torch.float32):
            want = quant_blocks.int4_into(torch.empty(37, 512, dtype=dt), qk.unpack_int4(q), s, z, group)
            assert torch.equal(native.int4_into(torch.empty(37, 512, dtype=dt), q, s, z, group, isa), want)
