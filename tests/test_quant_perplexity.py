"""Perplexity of the demo model on its held-out text with int8 and int4 weights, on every kernel the
measured quantized policy can choose on this machine (each forced in turn), within the quantization
bounds of the full-precision model: int8 within 1%, int4 within 5% of bfloat16 and of float32."""
import math

import pytest
import torch

import helpers
from llama import Llama
from llama.demo import DEMO_DIR, TOKENIZER_PATH
from llama.eval.scoring import windowed_nll
from llama.runtime import quant_choice

TEXT = (helpers.REPO / "tests" / "data" / "demo_heldout_head.txt").read_text()[:1000]  # about 240 tokens: one window
WINDOW = 256
BOUNDS = {"int8": 0.01, "int4": 0.05}


def perplexity(llama: Llama) -> float:
    ids = llama.tokenizer.encode(TEXT, bos=True, eos=False)
    nll, n = windowed_nll(llama.model, ids, WINDOW, WINDOW, batch_size=1, policy=llama.policy)
    return math.exp(nll / n)


def build(dtype: str, quantize=None) -> Llama:
    return Llama.build(str(DEMO_DIR), str(TOKENIZER_PATH), max_seq_len=WINDOW, max_batch_size=1, device="cpu",
                       dtype=dtype, quantize=quantize)


def offered_kernels(monkeypatch) -> list[tuple[str, str, str]]:
    """(mode, path, compute dtype name) of each candidate the measured policy timed on this machine
    (which candidates it times does not depend on the probes' size: small weights in two copies, one round)."""
    with monkeypatch.context() as mp:
        mp.setattr(quant_choice, "QUANT_PROBE_SHAPE", {step: (64, 256) for step in quant_choice.QUANT_PROBE_SHAPE})
        mp.setattr(quant_choice.cpu, "streamed_copies", lambda n_bytes: 2)
        timings = quant_choice.measure_quantized(repeats=1, rounds=1)
    return sorted({(mode, path, dt) for mode, _, path, dt in timings})


@pytest.fixture(scope="module")
def references() -> dict:
    return {dtype: perplexity(build(dtype)) for dtype in ("bfloat16", "float32")}


def test_every_offered_kernel_keeps_perplexity_within_the_quantization_bounds(references, monkeypatch):
    kernels = offered_kernels(monkeypatch)
    assert {(m, p) for m, p, _ in kernels} >= {(m, p) for m in BOUNDS for p in ("pack", "dequant")}
    failures = []
    for mode, path, dt_name in kernels:
        dt = getattr(torch, dt_name)
        monkeypatch.setattr(quant_choice, "quantized_kernel", lambda m, step, compute=None, p=path, d=dt: (p, d))
        # the activations in the kernel's dtype, as a model built in it runs them
        got = perplexity(build(dt_name, mode))
        for ref_name, ref in references.items():
            if abs(got / ref - 1) > BOUNDS[mode]:
                failures.append(f"{mode} {path} in {dt_name}: {got:.3f} vs {ref_name} {ref:.3f}")
    assert not failures, failures
