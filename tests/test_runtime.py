"""The kernel and dtype policy (llama/runtime: policy, probes, compute, quant_choice): chosen from measured timings (faked here to test
each outcome), bypassed by a forced dtype, exact in float32, and a bfloat16-weights model that
prefills in float32 computes what float32 computes on the same weights."""
import functools
import logging
import time

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.runtime import compute, native, probes, quant_choice, quant_kernels
from llama.runtime import cpu as cpu_info
from llama.runtime import policy as kernel_policy
from llama.weights import quant_formats, quant_modules
from llama.engine.runner import call_model

BF16, F32 = torch.bfloat16, torch.float32


def timings(decode: dict, small: dict, prefill: dict) -> dict:
    """(kind, compute, onednn) -> seconds, from {compute: (oneDNN s, PyTorch's own s)} per kind."""
    out = {}
    for kind, table in (("decode", decode), ("small", small), ("prefill", prefill)):
        for compute, (on, off) in table.items():
            out[(kind, compute, True)], out[(kind, compute, False)] = on, off
    return out


# The measurements on the 2-core AVX2 CPU without native bfloat16 (8192x2048 product):
# one row 0.96 ms in bfloat16 through PyTorch's own GEMV, 3.29 ms in float32; 256 rows 65.7 ms in
# float32, 235 ms in bfloat16.
NO_NATIVE_BF16 = timings(
    decode={"bfloat16": (2.0e-3, 0.96e-3), "float32": (3.29e-3, 3.4e-3)},
    small={"bfloat16": (4e-3, 5e-3), "float32": (6e-3, 6.5e-3), "upcast": (8e-3, 9e-3)},
    prefill={"bfloat16": (235e-3, 300e-3), "float32": (65.7e-3, 80e-3), "upcast": (70e-3, 85e-3)},
)
# A CPU with native bfloat16 (AMX, AVX512-BF16): bfloat16 through oneDNN wins everywhere.
NATIVE_BF16 = timings(
    decode={"bfloat16": (0.5e-3, 0.9e-3), "float32": (1.1e-3, 1.2e-3)},
    small={"bfloat16": (0.8e-3, 2e-3), "float32": (2e-3, 2.5e-3), "upcast": (3e-3, 3.5e-3)},
    prefill={"bfloat16": (5e-3, 40e-3), "float32": (20e-3, 30e-3), "upcast": (22e-3, 33e-3)},
)


def test_policy_follows_the_timings_of_a_cpu_without_native_bf16():
    p = kernel_policy.choose(NO_NATIVE_BF16)
    assert p.weights == BF16  # half the memory, and the faster one-row product
    assert p.decode == kernel_policy.StepKernels(BF16, onednn=False)  # PyTorch's own GEMV
    assert p.small == kernel_policy.StepKernels(BF16, onednn=True)
    assert p.prefill == kernel_policy.StepKernels(F32, onednn=True)  # upcast, 70 ms against 235 in bfloat16
    assert p.plan(1) is p.decode and p.plan(8) is p.small and p.plan(512) is p.prefill


def test_policy_follows_the_timings_of_a_cpu_with_native_bf16():
    p = kernel_policy.choose(NATIVE_BF16)
    assert p.weights == BF16
    assert p.decode == p.small == p.prefill == kernel_policy.StepKernels(BF16, onednn=True)


def test_policy_takes_this_packages_bfloat16_product_where_it_is_timed_fastest():
    """The native bfloat16 product, timed for decode and small batches, is planned where it is the
    fastest: oneDNN left as set there; a slower one changes nothing."""
    native_kernel = kernel_policy.NATIVE
    fast = {**NO_NATIVE_BF16, ("decode", "bfloat16", native_kernel): 0.5e-3, ("small", "bfloat16", native_kernel): 3e-3}
    p = kernel_policy.choose(fast)
    assert p.weights == BF16
    assert p.decode == p.small == kernel_policy.StepKernels(BF16, native=True)
    assert p.prefill == kernel_policy.StepKernels(F32, onednn=True)
    assert "decode bfloat16, this package's bfloat16 product" in p.describe()
    slow = {**NO_NATIVE_BF16, ("decode", "bfloat16", native_kernel): 1e-3, ("small", "bfloat16", native_kernel): 9e-3}
    assert kernel_policy.choose(slow) == kernel_policy.choose(NO_NATIVE_BF16)
    assert "bfloat16-native 0.500" in probes.format_timings(fast)


def test_float32_weights_when_float32_decodes_faster():
    slow_bf16 = {**NO_NATIVE_BF16, ("decode", "bfloat16", True): 9e-3, ("decode", "bfloat16", False): 8e-3}
    p = kernel_policy.choose(slow_bf16)
    assert p.weights == F32
    assert {p.decode.dtype, p.small.dtype, p.prefill.dtype} == {F32}  # never a downcast per step
    assert p.decode.onednn is True and p.prefill.onednn is True


@pytest.fixture
def fake_cpu(monkeypatch):
    """policy_for on a CPU that measures as `NO_NATIVE_BF16`, the measurement cache emptied."""
    calls = []

    def measure(from_memory=True, cached=None):
        calls.append(from_memory)
        return NO_NATIVE_BF16

    monkeypatch.setattr(probes, "measure", measure)
    probes._measured_cpu_policy.cache_clear()
    yield calls
    probes._measured_cpu_policy.cache_clear()


def test_the_choice_is_measured_and_logged_once(fake_cpu, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.DEBUG, logger="llama.runtime"):
        first = probes.policy_for(cpu)
        second = probes.policy_for(cpu)
        assert probes.resolve_dtype(None, cpu) == BF16
    assert first == second == kernel_policy.choose(NO_NATIVE_BF16, reason=first.reason)
    assert len(fake_cpu) == 1
    # the choice: one line at INFO; what it was chosen from: at DEBUG
    lines = [r.getMessage() for r in caplog.records if "Kernel policy" in r.getMessage() and r.levelno == logging.INFO]
    assert len(lines) == 1
    assert "weights in bfloat16" in lines[0] and "prefill float32" in lines[0] and "ms)" not in lines[0]
    timings = [r.getMessage() for r in caplog.records if "Kernel policy" in r.getMessage() and r.levelno == logging.DEBUG]
    assert len(timings) == 1 and "decode (1 row, ms)" in timings[0]


def test_forced_dtypes_bypass_the_policy(fake_cpu, monkeypatch):
    cpu = torch.device("cpu")
    f32 = probes.policy_for(cpu, "float32")
    assert f32 == kernel_policy.uniform(F32, reason="forced")  # no kernel switched: plain PyTorch
    assert not fake_cpu  # not even measured
    bf16 = probes.policy_for(cpu, "bf16")
    assert bf16.weights == BF16 and {bf16.decode.dtype, bf16.small.dtype, bf16.prefill.dtype} == {BF16}
    assert bf16.decode.onednn is False and bf16.prefill.onednn is True  # the faster kernel in bfloat16
    assert probes.resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int3': use bfloat16, float16 or float32"):
        probes.resolve_dtype("int3", cpu)


def test_weights_that_fit_in_the_cache_are_timed_from_the_cache(fake_cpu, monkeypatch):
    """A model larger than the last-level cache is timed from memory, one that fits from the cache
    (a 260 MB cache holds the demo model but not a 1B); each is measured once."""
    monkeypatch.setattr(cpu_info, "last_level_cache_bytes", lambda: 260 * 2**20)
    cpu = torch.device("cpu")
    demo, one_b = 23 * 2**20, 2 * 1_236_000_000
    probes.policy_for(cpu, weight_bytes=demo)
    probes.policy_for(cpu, weight_bytes=one_b)
    probes.policy_for(cpu)  # unknown size: from memory
    probes.policy_for(cpu, weight_bytes=demo)
    assert fake_cpu == [False, True]
    assert "weights read from the cache" in probes.policy_for(cpu, weight_bytes=demo).reason


def test_last_level_cache_is_read_from_sysfs():
    size = cpu_info.last_level_cache_bytes()
    assert size >= 2**20 and size % 1024 == 0  # a cache of a megabyte or more, in whole KB


def test_kernels_for_applies_the_plan_of_each_step_and_restores_the_flags():
    p = kernel_policy.choose(NO_NATIVE_BF16)
    seen = {}

    for name, tokens in (("decode", torch.zeros(1, 1)), ("small", torch.zeros(4, 1)), ("prefill", torch.zeros(1, 64))):
        with compute.kernels_for(tokens, p):
            x = torch.nn.functional.linear(torch.ones(2, 3, dtype=BF16), torch.ones(4, 3, dtype=BF16))
            seen[name] = (torch.backends.mkldnn.enabled, x.dtype)
        assert torch.backends.mkldnn.enabled  # restored
    assert seen == {"decode": (False, BF16), "small": (True, BF16), "prefill": (True, F32)}
    with compute.kernels_for(torch.zeros(1, 64), p, compiled=True):  # compiled: the weights' dtype
        assert torch.nn.functional.linear(torch.ones(2, 3, dtype=BF16), torch.ones(4, 3, dtype=BF16)).dtype == BF16


@pytest.mark.parametrize("from_memory", [True, False])
def test_measure_times_every_case_on_this_cpu(from_memory):
    t = probes.measure(repeats=1, from_memory=from_memory)
    expected = {(k, c, o) for k in kernel_policy.KINDS for c in kernel_policy.COMPUTES for o in (True, False)}
    if native.kernels() is not None:  # this package's bfloat16 product, for the steps that read weights at few rows
        expected |= {("decode", "bfloat16", kernel_policy.NATIVE), ("small", "bfloat16", kernel_policy.NATIVE)}
    assert set(t) == expected - {("decode", "upcast", True), ("decode", "upcast", False)}
    assert all(s > 0 for s in t.values())
    assert isinstance(kernel_policy.choose(t).weights, torch.dtype)


def test_the_probe_reads_fresh_weights_from_memory(monkeypatch):
    """From memory, consecutive decode products read disjoint bytes, and the buffer spans twice the
    cache; from the cache, every product reads the same weight."""
    monkeypatch.setattr(cpu_info, "last_level_cache_bytes", lambda: 96 * 2**20)
    seen = []
    linear = torch.nn.functional.linear

    def spy(x, w, *rest):
        seen.append((x.shape[0], w.dtype, w.data_ptr(), w.untyped_storage().nbytes()))
        return linear(x, w, *rest)

    for from_memory in (True, False):
        seen.clear()
        monkeypatch.setattr(compute.F, "linear", spy)
        probes.measure(repeats=1, from_memory=from_memory, rounds=1)
        monkeypatch.setattr(compute.F, "linear", linear)
        decode = [(ptr, dt) for rows, dt, ptr, _ in seen if rows == 1]
        if from_memory:
            assert seen[0][3] >= 2 * 96 * 2**20  # the buffer: twice the cache
            assert all(a[0] != b[0] for a, b in zip(decode, decode[1:]))
        else:
            assert len({ptr for ptr, _ in decode}) == 1


def test_a_model_in_the_cache_is_timed_with_its_own_shape_over_its_own_bytes(monkeypatch):
    """From the cache with the model's shape and size: decode and small products multiply that
    shape, each call the next window of as many bytes as the model holds in that dtype (so a model
    larger than the inner caches streams from the last one, as it will); prefill keeps its shape."""
    seen = []
    linear = torch.nn.functional.linear

    def spy(x, w, *rest):
        seen.append((x.shape[0], w.dtype, tuple(w.shape), w.data_ptr()))
        return linear(x, w, *rest)

    shape, model_bytes = (96, 64), 40 * 96 * 64 * 2  # 40 such weights in bfloat16
    monkeypatch.setattr(compute.F, "linear", spy)
    probes.measure(repeats=1, from_memory=False, cached=(shape, model_bytes))
    monkeypatch.setattr(compute.F, "linear", linear)
    assert {s for rows, _, s, _ in seen if rows < 64} == {shape}
    assert {s for rows, _, s, _ in seen if rows == 64} == {probes.PROBE_SHAPE["prefill"]}
    for dtype in (BF16, F32):
        ptrs = [ptr for rows, dt, _, ptr in seen if rows == 1 and dt == dtype]
        assert all(a != b for a, b in zip(ptrs, ptrs[1:]))  # a fresh window each call
        size = 96 * 64 * dtype.itemsize
        assert max(ptrs) - min(ptrs) + size <= model_bytes * dtype.itemsize // 2  # within the model's bytes
    policy = kernel_policy.choose(probes.measure(repeats=1, from_memory=False, cached=(shape, model_bytes)))
    assert policy.weights in (BF16, F32)


PROMPT = [[5, 9, 2, 77, 31, 8, 100, 3, 64, 12, 250, 7, 19, 44, 2, 90, 17, 33, 21, 6]]


def test_float32_stays_exact(tiny_ckpt, byte_tokenizer):
    """dtype="float32" computes exactly what plain PyTorch computes (no policy at all)."""
    llama = Llama.build(str(tiny_ckpt), str(byte_tokenizer), 64, 2, device="cpu", dtype="float32")
    tokens = torch.tensor(PROMPT)
    for rows in (tokens, tokens[:, :1]):  # a prefill and a one-row step
        with_policy = call_model(llama.model, llama.policy, rows, 0)
        plain = llama.model(rows, 0)  # the model holds no policy
        assert torch.equal(with_policy, plain)


def test_bf16_weights_prefilled_in_float32_match_float32(tiny_ckpt, byte_tokenizer, fake_cpu):
    """The default policy of a CPU without native bfloat16 holds bfloat16 weights and prefills in
    float32: its logits are those of float32 on the same (bfloat16-rounded) weights, up to the
    bfloat16 KV cache, and far closer than a bfloat16 prefill; then it decodes in bfloat16."""
    build = dict(max_seq_len=64, max_batch_size=2, device="cpu")
    policy = Llama.build(str(tiny_ckpt), str(byte_tokenizer), **build)
    assert policy.policy.prefill.dtype == F32 and policy.model.output.weight.dtype == BF16
    bf16 = Llama.build(str(tiny_ckpt), str(byte_tokenizer), dtype="bfloat16", **build)
    f32 = Llama.build(str(tiny_ckpt), str(byte_tokenizer), dtype="float32", **build)
    with torch.no_grad():
        for p in f32.model.parameters():
            p.copy_(p.bfloat16().float())  # the same weights as the bfloat16 models

    tokens = torch.tensor(PROMPT)
    want = f32.model(tokens, 0)
    got, low = call_model(policy.model, policy.policy, tokens, 0), call_model(bf16.model, bf16.policy, tokens, 0)
    err, err_bf16 = (got - want).abs().max().item(), (low - want).abs().max().item()
    assert err < err_bf16 / 3, (err, err_bf16)  # 0.025 against 0.11 (logits up to 17) when written
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)

    assert policy.model.layers[0].attention.kv_cache.k.dtype == BF16  # one cache, in the weights' dtype
    out, _ = policy.generate(PROMPT, max_gen_len=6, temperature=0)
    ref, _ = bf16.generate(PROMPT, max_gen_len=6, temperature=0)
    assert len(out[0]) == 6 and len(ref[0]) == 6


def test_upcast_linear_is_the_float32_product_of_the_converted_weight():
    torch.manual_seed(0)
    w, x, b = torch.randn(300, 64).to(BF16), torch.randn(2, 5, 64), torch.randn(300)
    want = torch.nn.functional.linear(x, w.float(), b)
    for scratch in (torch.empty(64 * 7), torch.empty(300 * 64)):  # blocks of 7 rows; the whole weight
        torch.testing.assert_close(compute.upcast_linear(x, w, scratch, b), want, rtol=1e-5, atol=2e-5)  # float32 rounding, summed in another order
    with compute.ComputeIn(F32):  # also reached by keyword, as F.linear's own names
        got = torch.nn.functional.linear(input=x.to(BF16), weight=w)
    assert got.dtype == F32
    torch.testing.assert_close(got, torch.nn.functional.linear(x.to(BF16).float(), w.float()), rtol=1e-5, atol=2e-5)  # float32 rounding, summed in another order


def test_bench_kernels_reports_every_case(tmp_path):
    import json
    import subprocess
    import sys

    import helpers

    out = tmp_path / "k.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_kernels.py", "--rows", "1,4", "--shape", "64,128", "--repeats", "1",
         "--bandwidth_mb", "16", "--out", str(out)],
        cwd=helpers.REPO, env=helpers.child_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    cases = {(r["rows"], r["case"]) for r in report["results"]}
    for rows in (1, 4):
        for case in ("bfloat16, oneDNN", "bfloat16, own", "float32, own", "float32 over upcast bfloat16, oneDNN"):
            assert (rows, case) in cases
    if native.kernels() is not None:  # this package's own, at each instruction set the CPU has
        for case in ("bfloat16", "int8", "int4"):
            assert {(1, f"{case}, native {isa}") for isa in native.available_isas()} <= cases
        assert {(1, f"bfloat16, native bf16 act. {isa}") for isa in native.available_isas(bf16_activations=True)} <= cases
        for case in ("int8", "int4"):  # and with the activations rounded to int8 (native_a8)
            assert {(1, f"{case}, native int8 act. {isa}") for isa in native.available_isas(int8_activations=True)} <= cases
    assert {"int8", "int4"} <= set(report["times_bfloat16"]["1"])  # the fastest of each, against bfloat16
    assert all(r["ms"] > 0 and r["weight_gb_s"] > 0 and r["gflop_s"] > 0 and r["share_of_read"] > 0 for r in report["results"])
    assert report["read_gb_s"] > 0 and report["policy"].startswith("weights in ")
    bad = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--rows", "0"], cwd=helpers.REPO,
                         env=helpers.child_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: rows [0] and shape 8192x2048 must be positive"


# ---------------------------------------------------------------------------------------------
# Quantized products: the CPU kernel of each mode and step, measured the same way


def quant_timings(fastest: dict) -> dict:
    """(mode, step, path, compute) -> seconds: 1 ms for each (mode, step)'s `fastest` (path,
    compute name), 2 ms for the others of that compute, 5 ms for the rest."""
    out = {}
    for mode in quant_choice.QUANT_MODES:
        for step in quant_choice.QUANT_STEPS:
            win = fastest[(mode, step)]
            for path in quant_choice.QUANT_PATHS:
                for dt in ("bfloat16", "float32"):
                    out[(mode, step, path, dt)] = 1e-3 if (path, dt) == win else 2e-3 if dt == win[1] else 5e-3
    return out


def test_quantized_kernels_follow_the_timings():
    t = quant_timings({
        ("int8", "decode"): ("pack", "bfloat16"), ("int8", "prefill"): ("dequant", "float32"),
        ("int4", "decode"): ("pack", "float32"), ("int4", "prefill"): ("pack", "bfloat16"),
        ("int8", "small"): ("pack", "bfloat16"), ("int4", "small"): ("dequant", "bfloat16"),
    })
    t[("int4", "prefill", "dequant", "float32")] = 1.5e-3  # the fastest in float32, not overall
    p = quant_choice.choose_quantized(t)
    assert p.kernel("int8", "decode") == ("pack", BF16) and p.kernel("int8", "prefill") == ("dequant", F32)
    assert p.kernel("int4", "decode") == ("pack", F32) and p.kernel("int4", "prefill") == ("pack", BF16)
    # int4 keeps one form of its weights, the one losing less over the steps (packed: 1 + 2 + 1 against
    # the stored form's 2 + 1 + 1.5): the small batch takes the fastest packed path
    assert p.kernel("int8", "small") == ("pack", BF16) and p.kernel("int4", "small") == ("pack", BF16)
    # a forced dtype: the fastest path in it; for int4 of the form that loses less in it (float32:
    # stored 2 + 1 + 1 against packed 1 + 1 + 3.3)
    assert p.kernel("int8", "prefill", BF16)[1] == BF16 and p.kernel("int8", "decode", F32)[1] == F32
    assert p.kernel("int8", "prefill", F32) == ("dequant", F32)
    assert p.kernel("int4", "prefill", F32) == ("dequant", F32) and p.kernel("int4", "decode", F32)[0] in quant_choice.STORED_FORM
    t[("int4", "decode", "dequant", "float32")] = 0.5e-3  # the stored form decodes fastest: every step reads it
    p = quant_choice.choose_quantized(t)
    assert {p.kernel("int4", s)[0] for s in quant_choice.QUANT_STEPS} == {"dequant"}
    assert p.kernel("int4", "prefill", F32) == ("dequant", F32)
    assert p.kernel("int8", "decode", torch.float16) == ("dequant", torch.float16)  # no packed kernel timed in it
    # the packed form decodes 10% faster but prefills 3x slower: the stored form is kept
    t = quant_timings({(m, s): ("native_a8", "float32") for m in quant_choice.QUANT_MODES for s in quant_choice.QUANT_STEPS})
    t.update({("int4", "decode", "pack", "bfloat16"): 0.9e-3, ("int4", "prefill", "dequant", "bfloat16"): 0.4e-3,
              ("int4", "prefill", "pack", "bfloat16"): 1.2e-3})
    p = quant_choice.choose_quantized(t)
    assert p.kernel("int4", "decode") == ("native_a8", F32) and p.kernel("int4", "prefill") == ("dequant", BF16)
    t[("int4", "decode", "pack", "bfloat16")] = 0.1e-3  # 10x faster decoding: worth the slower prefill
    assert quant_choice.choose_quantized(t).kernel("int4", "prefill") == ("pack", BF16)
    with pytest.raises(ValueError, match="quantize='fp8' has no CPU kernel: use one of int8, int4"):
        p.kernel("fp8", "decode")


@pytest.fixture
def fresh_quantized_policy():
    quant_choice._measured_quantized_policy.cache_clear()
    yield
    quant_choice._measured_quantized_policy.cache_clear()


def test_the_quantized_kernels_are_measured_once_and_the_fastest_is_taken(fresh_quantized_policy, monkeypatch, caplog):
    """The timer says the packed kernel with float32 activations wins everywhere (it never does on
    the project's CPU): every QuantizedLinear then takes it, measured once (each candidate in
    PROBE_ROUNDS rounds), logged once; decode and small batches never time dequantize-then-F.linear."""
    calls = []

    def fake_best_time(fn, repeats, give_up=float("inf"), median=False):
        # the probe: one of quant_kernels' products, x in the compute dtype
        dequant = fn.kernel in (quant_kernels.int8_dequant_mm, quant_kernels.int4_dequant_mm)
        own = fn.kernel in (native.int8_mm, native.int4_mm)
        kernel = ("dequant" if dequant else "native" if own else "pack", fn.x.dtype)
        calls.append(kernel)
        assert not (dequant and median)  # only prefill, from the cache, times it
        return 1e-3 if kernel == ("pack", F32) else 2e-3

    monkeypatch.setattr(cpu_info, "best_time", fake_best_time)
    monkeypatch.setattr(quant_choice, "WARM_UP_GIVE_UP", float("inf"))  # the fake times decide alone
    # the fake times make the probes' size irrelevant: small weights, two copies, not the 1B's shape over twice the cache
    monkeypatch.setattr(quant_choice, "QUANT_PROBE_SHAPE", {step: (64, 256) for step in quant_choice.QUANT_PROBE_SHAPE})
    monkeypatch.setattr(cpu_info, "streamed_copies", lambda n_bytes: 2)
    w = torch.randn(64, 128)
    with caplog.at_level(logging.DEBUG, logger="llama.runtime"):
        for mode, stored in (("int8", quant_formats.quantize_int8(w) + (None,)), ("int4", quant_formats.quantize_int4(w, 32))):
            lin = quant_modules.QuantizedLinear(mode, *stored, 32, BF16)
            assert lin.kernels == {"decode": ("pack", F32), "small": ("pack", F32), "prefill": ("pack", F32)}
            forced = quant_modules.QuantizedLinear(mode, *stored, 32, BF16, compute_dtype=BF16)
            assert {dt for _, dt in forced.kernels.values()} == {BF16}
    # pack in each compute dtype, dequant too at prefill, and the native kernels (float32 activations) where they build
    own = native.kernels() is not None
    per_mode = (len(quant_choice.STREAMED) * (2 + own) + 4 + own) * quant_choice.PROBE_ROUNDS
    assert len(calls) == len(quant_choice.QUANT_MODES) * per_mode
    assert calls.count(("dequant", F32)) == len(quant_choice.QUANT_MODES) * quant_choice.PROBE_ROUNDS
    lines = [r.getMessage() for r in caplog.records if "Quantized kernels" in r.getMessage() and r.levelno == logging.INFO]
    assert len(lines) == 1 and "int8 decode pack in float32" in lines[0] and "ms)" not in lines[0]
    timings = [r.getMessage() for r in caplog.records if "Quantized kernels" in r.getMessage() and r.levelno == logging.DEBUG]
    assert len(timings) == 1 and "int4 prefill (256 rows, ms)" in timings[0]


def test_measure_quantized_times_every_candidate_on_this_cpu():
    native.kernels()  # built (once per test session) before the clock starts: the build is not the measurement
    start = time.perf_counter()
    t = quant_choice.measure_quantized(repeats=1)
    assert time.perf_counter() - start < 15  # a second or two on the 2 shared cores
    want = {(m, s, p, str(dt).removeprefix("torch."))
            for m in quant_choice.QUANT_MODES for s in quant_choice.QUANT_STEPS for p in quant_choice.QUANT_PATHS for dt in quant_choice.QUANT_COMPUTES
            if p not in ("native", "native_a8") or dt == F32 and native.kernels() is not None}
    # native_a8 (int8 activations) only where allowed (the suite runs weight-only: conftest), for decode steps
    want = {c for c in want if c[2] != "native_a8" or quant_choice.int8_activations_allowed() and c[1] in quant_choice.A8_STEPS}
    want = {c for c in want if not (c[1] in quant_choice.STREAMED and c[2] in quant_choice.NOT_STREAMED)}
    assert set(t) == want and all(s > 0 for s in t.values())
    assert quant_choice.choose_quantized(t).kernel("int8", "decode")[0] in quant_choice.QUANT_PATHS


def test_best_time_gives_up_on_a_loser_after_its_first_call():
    calls = []
    assert cpu_info.best_time(lambda: calls.append(time.sleep(0.01)), repeats=5, give_up=0.001) >= 0.01
    assert len(calls) == 1


def test_the_upcast_buffer_first_used_under_inference_mode_serves_products_outside_it(monkeypatch):
    fresh = functools.lru_cache(maxsize=None)(compute.upcast_scratch.__wrapped__)  # none made yet
    monkeypatch.setattr(compute, "upcast_scratch", fresh)
    x, w = torch.randn(3, 64), torch.randn(48, 64).to(torch.bfloat16)
    with torch.inference_mode():
        inside = compute.upcast_linear(x, w, compute.upcast_scratch(torch.float32, torch.device("cpu")))
    outside = compute.upcast_linear(x, w, compute.upcast_scratch(torch.float32, torch.device("cpu")))
    assert torch.equal(outside, inside) and torch.equal(inside, F.linear(x, w.float()))


def test_weights_are_allocated_on_huge_pages_where_linux_gives_them(monkeypatch, tiny_ckpt, byte_tokenizer):
    """A tensor advised before it is written is backed by 2 MB pages (where transparent huge pages
    are not off), the loader advises every weight it allocates or quantizes, and LLAMA_NO_HUGE_PAGES=1
    leaves the default pages."""
    from pathlib import Path

    from llama.runtime import pages

    advised, advise = [], pages.advise_huge_pages
    monkeypatch.setattr(pages, "advise_huge_pages", lambda t: advised.append(t.shape) or advise(t))
    llama = Llama.build(str(tiny_ckpt), str(byte_tokenizer), 64, 1, device="cpu", dtype="float32")
    assert len(advised) >= len(llama.model.state_dict()) - 1  # each weight as it is allocated (output tied or not)
    advised.clear()  # quantized on load: the stored forms, made by computation, moved under advised pages too
    int4 = Llama.build(str(tiny_ckpt), str(byte_tokenizer), 64, 1, device="cpu", dtype="float32", quantize="int4")
    packed = {tuple(m.weight.shape) for m in int4.model.modules() if hasattr(m, "kernels")}  # (out, in / 2)
    assert packed and packed <= set(map(tuple, advised))
    monkeypatch.setattr(pages, "advise_huge_pages", advise)

    # over glibc's largest mmap threshold (32 MB): fresh pages, never memory an earlier test freed
    t = torch.empty(20 * pages.HUGE_PAGE // 2, dtype=torch.bfloat16)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off here")
    assert pages.advise_huge_pages(t)
    t.fill_(1)
    # the kernel marks the advised range ("hg" in its mappings' VmFlags); whether it finds free 2 MB
    # pages to back it with depends on the machine's fragmentation at the moment, so only the
    # advice is checked, not the pages it got (AnonHugePages)
    lo, hi, span, flags = t.data_ptr(), t.data_ptr() + t.nbytes, False, []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            a, b = (int(v, 16) for v in first.split("-"))
            span = a < hi and b > lo and min(b, hi) - max(a, lo) >= pages.HUGE_PAGE
        elif first == "VmFlags:" and span:
            flags.append(line.split()[1:])
    assert flags and all("hg" in f for f in flags), flags  # every mapping with a whole 2 MB page of it
    monkeypatch.setenv(pages.DISABLE_ENV, "1")
    assert not pages.advise_huge_pages(torch.empty(4 * pages.HUGE_PAGE // 2, dtype=torch.bfloat16))
    monkeypatch.delenv(pages.DISABLE_ENV)
    assert not pages.advise_huge_pages(torch.empty(16))  # under 2 MB: nothing to ask


def test_the_dtype_probe_keeps_each_products_fastest_round(monkeypatch):
    """probes.measure times every case in cpu.PROBE_ROUNDS rounds and keeps each one's fastest, so one
    slow round (other work on the cores) does not make the choice that later processes keep."""
    calls = []
    monkeypatch.setattr(probes.cpu, "best_time", lambda *a, **k: calls.append(1) or 1.0)
    cases = len(probes.measure(repeats=1, rounds=1))
    for slow_round in (0, 1):
        calls.clear()
        monkeypatch.setattr(probes.cpu, "best_time",
                            lambda *a, **k: calls.append(1) or (2.0 if (len(calls) - 1) // cases == slow_round else 1.0))
        timings = probes.measure(repeats=1)
        assert len(calls) == probes.cpu.PROBE_ROUNDS * cases and len(timings) == cases
        assert set(timings.values()) == {1.0}
