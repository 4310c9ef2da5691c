"""Weight-only quantization: the weight transforms against plain math, every CPU kernel path against
dequantize-then-F.linear, quantized checkpoints against quantizing on load (bit for bit), real
multi-process runs against one process, resharding, and one-line errors for bad input."""
import concurrent.futures
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import helpers
from llama import Llama, distributed
from llama.runtime import native, quant_choice, quant_kernels
from llama.runtime import w8a8 as w8a8_kernels
from llama.weights import checkpoint, convert, hf, loader, quant_formats, quant_modules, rank_state, save, sharding
from llama.model import ModelArgs
from llama.weights.reshard import quantize_checkpoint, reshard

# hidden 384 and dim 128: int4 groups of 32 fit each slice on 1, 2 and 4 processes
PARAMS = {**helpers.TINY_PARAMS, "dim": 128, "multiple_of": 128, "ffn_dim_multiplier": None}
WORKER = "tests/workers/quantized_generate.py"




@pytest.fixture(scope="module")
def fp_ckpt(tmp_path_factory):
    """Full-precision bfloat16 checkpoint (as Meta ships them), 1 shard, with the byte tokenizer."""
    out = tmp_path_factory.mktemp("fp")
    sd = {k: v.bfloat16() for k, v in helpers.random_state_dict(PARAMS, seed=5).items()}
    save.save_checkpoint(sd, PARAMS, out)
    helpers.write_byte_tokenizer(out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def q_ckpts(tmp_path_factory, fp_ckpt):
    """fp_ckpt written by scripts/quantize.py as int8 and as int4 (group 32)."""
    root = tmp_path_factory.mktemp("q")
    for mode in ("int8", "int4"):
        quantize_checkpoint(str(fp_ckpt), str(root / mode), mode=mode)
    return {mode: root / mode for mode in ("int8", "int4")}


def build(ckpt, quant=None, **kwargs) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), 32, 2, dtype="float32", quantize=quant, **kwargs)


def logits_of(llama: Llama) -> torch.Tensor:
    llama.model.free_cache()
    return llama.model(torch.tensor([[1, 72, 101, 108, 108, 111]]), 0)


# ---------------------------------------------------------------------------------------------
# The transforms and the kernels


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantized_weights_are_within_half_a_step(group_size):
    w = torch.randn(48, 256) * torch.linspace(0.01, 3, 256)  # groups of very different ranges
    w[3] += 5.0  # a row far from zero: the zero point's rounding must not push it off the grid
    q, s = quant_formats.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16
    assert ((quant_formats.dequantize("int8", q, s) - w).abs() <= s.float()[:, None] / 2).all()
    q4, s4, z4 = quant_formats.quantize_int4(w, group_size)
    assert q4.shape == (48, 128) and s4.shape == z4.shape == (48, 256 // group_size)
    step = s4.float().repeat_interleave(group_size, dim=1)
    assert ((quant_formats.dequantize("int4", q4, s4, z4, group_size) - w).abs() <= step / 2).all()
    assert torch.equal(quant_formats.unpack_int4(q4), quant_formats.unpack_int4(q4).clamp(0, 15))


@pytest.mark.parametrize("mode", ["int8", "int4"])
# None: the measured policy; native_a8 rounds the activations (tests/test_native_kernels.py)
@pytest.mark.parametrize("path", tuple(p for p in quant_modules.CPU_PATHS if p != "native_a8") + (None,))
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_quantized_linear_equals_dequantize_then_linear(mode, path, act):
    w = torch.randn(96, 128) / 128**0.5
    stored = quant_formats.quantize_int8(w) + (None,) if mode == "int8" else quant_formats.quantize_int4(w, 32)
    deq = quant_formats.dequantize(mode, *stored, group_size=32)
    lin = quant_modules.QuantizedLinear(mode, *stored, 32, act, path=path)
    for rows in (1, 9, 17):  # a decode step, a small batch and a prefill-size product
        x = torch.randn(rows, 128).to(act)
        _, dt = lin.kernels[quant_choice.step_for(rows)]
        dt = dt or act
        want = F.linear(x.to(dt).double(), deq.double())  # the activations as the kernel sees them
        got = lin(x)
        assert got.dtype == act and got.shape == (rows, 96)
        eps = max(torch.finfo(dt).eps, torch.finfo(act).eps)  # computed in dt, returned in act
        tol = 4 * eps * (x.to(dt).double().abs() @ deq.double().abs().t()).max()
        assert (got.double() - want).abs().max() <= tol
    # the held form reads back as the stored one (the packed int4 layout through the kernel itself)
    assert torch.allclose(lin.dequantize(), deq, atol=1e-2 * deq.abs().max().item())


needs_w8a8 = pytest.mark.skipif(not w8a8_kernels.w8a8_available(), reason="no fbgemm int8 product in this PyTorch/CPU")


@needs_w8a8
@pytest.mark.parametrize("levels", [127, 63])  # 63: the range taken where fbgemm's full range overflows
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_w8a8_linear_rounds_each_input_row_to_int8_and_is_exact_otherwise(levels, act):
    w = torch.randn(96, 128) / 128**0.5
    q, s = quant_formats.quantize_int8(w)
    deq = quant_formats.dequantize("int8", q, s).double()
    lin = quant_modules.QuantizedLinear("int8", q, s, None, 32, act, path="dynamic")
    lin.levels = levels
    assert torch.equal(lin.dequantize(), deq.float())  # fbgemm's packed copy reads back as stored
    x = torch.randn(9, 128).to(act)
    x[2] *= 50  # a row far larger than the others keeps its own scale
    got = lin(x).double()
    assert got.dtype == torch.float64 and lin(x).dtype == act
    # plain math: each row rounded to `levels` steps of its absolute maximum, times the int8 weights
    xd = x.double()
    amax = xd.abs().amax(1, keepdim=True)
    rounded = torch.round(xd / amax * levels).clamp(-levels, levels) * amax / levels
    want = rounded @ deq.t()
    eps = torch.finfo(act).eps
    one_step = amax / levels * deq.abs().amax(1)  # an input on a rounding tie may land a step away
    assert ((got - want).abs() <= 4 * eps * (xd.abs() @ deq.abs().t()) + one_step).all()
    assert (got - want).norm() <= max(1e-3, eps) * want.norm()  # bfloat16 results are rounded to it
    # against the unrounded activations: at most half a step per input (a bound, not the kernel's own)
    bound = amax / (2 * levels) * deq.abs().sum(1) + 4 * eps * (xd.abs() @ deq.abs().t())
    assert ((got - xd @ deq.t()).abs() <= bound * 1.001).all()
    # a row's result does not depend on the rows beside it
    assert torch.equal(lin(x[2:3]), lin(x)[2:3])


def test_row_parallel_int8_scales_are_those_of_the_whole_row():
    w = torch.randn(8, 64)
    whole = quant_formats.quantize_weight("layers.0.attention.wo.weight", w, quant_formats.resolve("int8"))
    halves = [w[:, :32], w[:, 32:]]
    amax = torch.maximum(*(h.abs().amax(1) for h in halves))
    parts = [quant_formats.quantize_weight("layers.0.attention.wo.weight", h, quant_formats.resolve("int8"), lambda _: amax) for h in halves]
    assert all(torch.equal(p["layers.0.attention.wo.scales"], whole["layers.0.attention.wo.scales"]) for p in parts)
    assert torch.equal(torch.cat([p["layers.0.attention.wo.weight"] for p in parts], 1), whole["layers.0.attention.wo.weight"])


# ---------------------------------------------------------------------------------------------
# Loading, checkpoints, processes


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_checkpoint_loads_to_the_logits_of_quantizing_on_load_bit_for_bit(fp_ckpt, q_ckpts, mode):
    args = ModelArgs(**PARAMS)
    on_load = rank_state.load_rank_state(fp_ckpt, args, 0, 1, quant=quant_formats.resolve(mode))
    stored = rank_state.load_rank_state(q_ckpts[mode], args, 0, 1)
    assert stored.keys() == on_load.keys()
    assert all(torch.equal(stored[k], on_load[k]) and stored[k].dtype == on_load[k].dtype for k in stored)
    from_file, quantized = build(q_ckpts[mode]), build(fp_ckpt, mode)
    assert isinstance(from_file.model.layers[1].feed_forward.w2, quant_modules.QuantizedLinear)
    assert torch.equal(logits_of(from_file), logits_of(quantized))
    assert torch.equal(logits_of(build(q_ckpts[mode], mode)), logits_of(quantized))  # its own mode is fine
    full = logits_of(build(fp_ckpt))
    assert (logits_of(quantized) - full).abs().max() < (0.05 if mode == "int8" else 0.5) * full.abs().max()


@needs_w8a8
def test_w8a8_runs_int8_weights_with_int8_activations_in_the_blocks(fp_ckpt, q_ckpts):
    on_load, from_file = build(fp_ckpt, "w8a8"), build(q_ckpts["int8"], "w8a8")  # int8 checkpoints load as w8a8
    for llama in (on_load, from_file):
        assert llama.model.layers[1].feed_forward.w2.kernels["decode"][0] == "dynamic"
        assert llama.model.output.kernels["decode"][0] != "dynamic"  # the logits stay weight-only
    assert torch.equal(logits_of(on_load), logits_of(from_file))
    int8, full = logits_of(build(fp_ckpt, "int8")), logits_of(build(fp_ckpt))
    got = logits_of(on_load)
    assert not torch.equal(got, int8)  # the activations were rounded
    assert (got - full).abs().max() < 0.05 * full.abs().max()
    with pytest.raises(ValueError, match=r"is quantized \(int4, .*\) but quantize='w8a8' .* build with quantize='int4'"):
        build(q_ckpts["int4"], "w8a8")


def test_w8a8_without_its_kernel_is_a_one_line_error(fp_ckpt, monkeypatch):
    monkeypatch.setattr(w8a8_kernels, "w8a8_available", lambda: False)
    with pytest.raises(ValueError, match="quantize='w8a8' cannot run here: .*; use quantize='int8'"):
        build(fp_ckpt, "w8a8")


def test_w8a8_on_a_cpu_where_fbgemm_saturates_names_the_reason_and_int8(fp_ckpt, monkeypatch):
    """An x86 CPU whose fbgemm product the start-up check found inexact (AVX2 without VNNI)."""
    monkeypatch.setattr(w8a8_kernels, "w8a8_levels", lambda: 0)
    with pytest.raises(ValueError) as refused:
        build(fp_ckpt, "w8a8")
    message = str(refused.value)
    assert "\n" not in message and "not exact on this CPU" in message and "127 and at 63" in message
    assert message.endswith("use quantize='int8' (the same int8 weights, activations not rounded)")
    assert "not on cuda" in w8a8_kernels.why_unavailable(torch.device("cuda"))


def test_quantize_none_is_the_unquantized_model_and_output_can_stay_full_precision(fp_ckpt):
    plain = build(fp_ckpt)
    assert not any(isinstance(m, quant_modules.QuantizedLinear) for m in plain.model.modules())
    kept = build(fp_ckpt, "int8", quantize_output=False)
    assert not isinstance(kept.model.output, quant_modules.QuantizedLinear)
    assert isinstance(kept.model.layers[0].attention.wq, quant_modules.QuantizedLinear)
    assert quant_modules.quantized_bytes(kept.model) < sum(p.nbytes for p in plain.model.parameters())


def test_quantized_runs_on_1_2_and_4_processes_give_the_tokens_of_one(tmp_path, fp_ckpt, q_ckpts):
    runs = [f"{fp_ckpt}|int8", f"{fp_ckpt}|int4", f"{q_ckpts['int4']}|none"]
    if native.kernels() is not None:  # int8 activations: one call for wq, wk, wv (w1, w3) on each rank's slices
        runs += [f"{fp_ckpt}|int8|native_a8", f"{fp_ckpt}|int4|native_a8"]
    w8a8 = [f"{fp_ckpt}|w8a8"] if w8a8_kernels.w8a8_available() else []

    def launch(n: int) -> dict:
        out = tmp_path / f"out{n}.pt"
        proc = helpers.run_torchrun(WORKER, [",".join(runs + w8a8), fp_ckpt / "tokenizer.model", out], nproc=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return torch.load(out)

    # one process first: it measures the quantized kernels and keeps the choice (this test's cache
    # directory), which the 2 and 4 processes, started side by side, then read: every run multiplies
    # with the same kernels
    results = {1: launch(1)}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results.update(zip((2, 4), pool.map(launch, (2, 4))))
    for run in runs + w8a8:  # w8a8's row-parallel layers round each input row with the whole row's scale
        for n in (2, 4):
            assert results[n][run]["tokens"] == results[1][run]["tokens"], (run, n)
            torch.testing.assert_close(results[n][run]["logits"], results[1][run]["logits"], rtol=1e-4, atol=1e-4)
    assert results[1][runs[1]]["tokens"] == results[1][runs[2]]["tokens"]  # on load == from the file
    assert all(results[n][run]["decode"] == "native_a8" for run in runs[3:] for n in (1, 2, 4))


def test_reshard_of_a_quantized_checkpoint_loads_bit_for_bit(tmp_path, q_ckpts):
    args = ModelArgs(**PARAMS)
    for mode, shards in (("int4", 4), ("int8", 2)):
        out = tmp_path / f"{mode}-{shards}"
        reshard(str(q_ckpts[mode]), str(out), shards)
        assert json.loads((out / "params.json").read_text())["quantization"]["mode"] == mode
        back = tmp_path / f"{mode}-back"
        reshard(str(out), str(back), 1)
        original = rank_state.load_rank_state(q_ckpts[mode], args, 0, 1)
        again = rank_state.load_rank_state(back, args, 0, 1)
        assert all(torch.equal(original[k], again[k]) for k in original)
        # the scales split with their weights: rank 1 of `shards` reads the same slice either way
        sliced = rank_state.load_rank_state(q_ckpts[mode], args, 1, shards)
        assert all(torch.equal(sliced[k], t) for k, t in checkpoint.load_shard(out / "consolidated.01.pth").items())


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the fix


def test_unknown_mode_is_a_one_line_error(fp_ckpt):
    with pytest.raises(ValueError, match="unknown quantize mode 'int3': use one of int8, int4, fp8"):
        build(fp_ckpt, "int3")


def test_group_size_not_dividing_the_input_or_a_shard_is_a_one_line_error(fp_ckpt):
    with pytest.raises(ValueError, match="int4 group size 48 is not supported: use one of"):
        build(fp_ckpt, "int4", group_size=48)
    with pytest.raises(ValueError, match="group size 32 does not divide the input dimension 80"):
        quant_formats.quantize_int4(torch.randn(16, 80), 32)
    with pytest.raises(ValueError, match="would straddle the split of .*w2.weight over 4 processes"):
        sharding.check_group_alignment(ModelArgs(**PARAMS), 4, 128, ["layers.0.feed_forward.w2.weight"])
    with pytest.raises(ValueError, match="would straddle the split"):
        rank_state.load_rank_state(fp_ckpt, ModelArgs(**PARAMS), 0, 4, quant=quant_formats.resolve("int4", 128))


def test_int4_and_fp8_on_a_device_without_a_kernel_are_one_line_errors(fp_ckpt, monkeypatch):
    with pytest.raises(ValueError, match="quantize='fp8' needs a CUDA GPU with float8 .* not cpu: use quantize='int8' or 'int4'"):
        build(fp_ckpt, "fp8")
    monkeypatch.delattr(torch, "_weight_int4pack_mm_for_cpu")
    with pytest.raises(ValueError, match="quantize='int4' has no kernel on cpu in this PyTorch: use quantize='int8'"):
        build(fp_ckpt, "int4")


def test_a_quantized_checkpoint_with_another_quantize_is_a_one_line_error(q_ckpts):
    with pytest.raises(ValueError, match=r"is quantized \(int8, .*\) but quantize='int4' .* build with quantize='int8'"):
        build(q_ckpts["int8"], "int4")
    with pytest.raises(ValueError, match="build with quantize='int4', group_size=32"):
        build(q_ckpts["int4"], "int4", group_size=64)


def test_a_quantized_checkpoint_to_hf_is_a_one_line_error(tmp_path, q_ckpts):
    with pytest.raises(hf.ConversionError, match=r"is quantized \(int8\): Hugging Face conversion needs full-precision"):
        convert.to_hf(str(q_ckpts["int8"]), str(tmp_path / "hf"))


def test_quantize_script_refusals_are_one_line_errors(tmp_path, fp_ckpt, q_ckpts):
    cases = (
        ([fp_ckpt, tmp_path / "a", "--mode", "int5"], "error: unknown mode 'int5'"),
        ([q_ckpts["int8"], tmp_path / "b", "--mode", "int4"], "is already quantized"),
        ([fp_ckpt, tmp_path / "c", "--mode", "int4", "--group_size", "256"], "does not divide the input dimension"),
    )
    procs = helpers.run_at_once([[sys.executable, "scripts/quantize.py", *map(str, args)] for args, _ in cases],
                                capture_output=True, text=True, cwd=helpers.REPO, env=helpers.child_env())
    for proc, (_, message) in zip(procs, cases):
        assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_cuda_quantized_linear_matches_dequantize(mode):
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    w = torch.randn(256, 512, device="cuda") / 512**0.5
    fn = {"int8": quant_formats.quantize_int8, "fp8": quant_formats.quantize_fp8}.get(mode)
    stored = fn(w) + (None,) if fn else quant_formats.quantize_int4(w, 32)
    lin = quant_modules.QuantizedLinear(mode, *stored, 32, torch.bfloat16)
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x.float(), quant_formats.dequantize(mode, *stored, group_size=32))
    tol = 0.1 if mode == "fp8" else 0.02  # fp8 also quantizes the activations
    assert (lin(x).float() - want).abs().max() <= tol * want.abs().max()


def test_scripts_take_quantize():
    """--quantize passes through to Llama.build (the bundled demo model, quantized on load):
    example_text_completion.py with int8 and scripts/chat.py with int4, side by side."""
    cases = [("example_text_completion.py", "int8"), ("scripts/chat.py", "int4")]
    procs = helpers.run_at_once(
        [[sys.executable, script, "--quantize", mode, "--max_gen_len", "4", "--device", "cpu"] for script, mode in cases],
        input="What does the len function do?\n", capture_output=True, text=True, cwd=helpers.REPO,
        env=helpers.child_env(), timeout=300,
    )
    for proc, (script, mode) in zip(procs, cases):
        assert proc.returncode == 0, (script, proc.stderr[-3000:])
        assert f"quantized ({mode}" in proc.stderr and proc.stdout.strip(), script


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_tied_checkpoint_quantizes_the_embedding_once_and_stays_tied(tmp_path, fp_ckpt, mode):
    sd = rank_state.load_rank_state(fp_ckpt, ModelArgs(**PARAMS), 0, 1)
    tied = tmp_path / "tied"
    save.save_checkpoint({k: v for k, v in sd.items() if k != "output.weight"}, PARAMS, tied)
    helpers.write_byte_tokenizer(tied / "tokenizer.model")
    quantize_checkpoint(str(tied), str(tmp_path / "q"), mode=mode)
    assert "output.weight" not in checkpoint.load_shard(tmp_path / "q" / "consolidated.00.pth")
    helpers.write_byte_tokenizer(tmp_path / "q" / "tokenizer.model")
    on_load, from_file = build(tied, mode), build(tmp_path / "q")
    assert torch.equal(logits_of(on_load), logits_of(from_file))
    m = on_load.model
    assert isinstance(m.tok_embeddings, quant_modules.QuantizedEmbedding) and isinstance(m.output, quant_modules.QuantizedLinear)
    if mode == "int8":  # one int8 matrix serves both
        assert m.output.weight.data_ptr() == m.tok_embeddings.weight.data_ptr()
    tokens = torch.tensor([[3, 70, 500]])
    stored = checkpoint.load_shard(tmp_path / "q" / "consolidated.00.pth")
    want = quant_formats.dequantize(
        mode, stored["tok_embeddings.weight"], stored["tok_embeddings.scales"], stored.get("tok_embeddings.zeros")
    )
    for model in (on_load.model, from_file.model):
        assert torch.equal(model.tok_embeddings(tokens), want[tokens[0]][None].to(model.tok_embeddings.act_dtype))


def test_int4_packed_in_place_is_the_packed_copy(monkeypatch):
    """A load's own int4 tensors are packed over themselves, block by block, to what a packed copy holds."""
    w = torch.randn(192, 128, generator=torch.Generator().manual_seed(0))
    q, scales, zeros = quant_formats.quantize_int4(w, 32)
    monkeypatch.setattr(quant_formats, "CHUNK_BYTES", 4 * 64 * 128)  # several blocks of 64 rows
    want = quant_modules._int4_kernel_layout(q)
    own = q.clone()
    got = quant_modules._int4_kernel_layout(own, in_place=True)
    assert got.data_ptr() == own.data_ptr() and torch.equal(got, want)


def _tied_int4_model(monkeypatch):
    distributed.setup(torch.device("cpu"))  # one process: fairscale's layers ask for their group
    params = {"dim": 128, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 192, "multiple_of": 64}
    config = quant_formats.resolve("int4", 32)
    with loader.skeleton():
        from llama.model import Transformer

        model = Transformer(ModelArgs(**params))
    state = quant_formats.state_to_quantized(helpers.random_state_dict(params, seed=1), config)
    for key in config.keys("output.weight"):  # tied: the output holds the embedding's tensors
        state[key] = state[key.replace("output.", "tok_embeddings.", 1)]
    want = quant_formats.dequantize("int4", *(state[k].clone() for k in config.keys("tok_embeddings.weight")))  # (vocab, dim)
    monkeypatch.setattr(quant_choice, "quantized_kernel", lambda mode, step, dt=None: ("pack", torch.float32))
    quant_modules.install(model, state, config, torch.float32, consume=True)
    return model, want


@pytest.mark.parametrize("layout", ["read", "unknown"])
def test_a_tied_int4_output_is_packed_over_the_embedding_which_reads_its_rows_there(monkeypatch, layout):
    """One copy of a tied vocabulary matrix: the output's kernel layout is written over the
    embedding's stored tensor and the embedding looks its rows up in it when the layout is one it
    reads (probed); otherwise the output packs a copy. Either way the lookups and the logits are
    those of the stored weights."""
    if layout == "unknown":
        monkeypatch.setattr(quant_kernels, "int4_kernel_block", lambda: None)
    elif quant_kernels.int4_kernel_block() is None:
        pytest.skip(f"the int4 kernel layout on {torch.backends.cpu.get_cpu_capability()} is not one the embedding reads")
    model, want = _tied_int4_model(monkeypatch)
    shared = model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert shared == (layout == "read")
    assert hasattr(model.tok_embeddings, "scales") != shared  # shared: the output's scales and zeros serve both
    tokens = torch.tensor([[0, 1, 31, 32, 63, 64, 100, 191], [5, 5, 150, 2, 96, 127, 128, 160]])
    assert torch.equal(model.tok_embeddings(tokens), want[tokens])
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model.output.matmul(x), F.linear(x, want), rtol=1e-5, atol=1e-4)


def test_the_int4_kernel_layout_probe_on_each_cpu_capability():
    """The probe reads PyTorch's layout on the capabilities whose layout it knows (AVX-512: blocks
    of 64 rows, AVX2: 32) and says None on the scalar build's (where the embedding keeps its own
    copy), each in a fresh process."""
    found = {}
    code = ("import torch; from llama.runtime import quant_kernels; "
            "print(torch.backends.cpu.get_cpu_capability(), quant_kernels.int4_kernel_block())")
    procs = helpers.run_at_once(
        [([sys.executable, "-c", code], {"env": {**helpers.child_env(), "ATEN_CPU_CAPABILITY": capability}})
         for capability in ("avx512", "avx2", "default")],
        capture_output=True, text=True, cwd=helpers.REPO, timeout=120,
    )
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-2000:]
        got, block = proc.stdout.split()
        found[got] = block
    assert found["DEFAULT"] == "None"
    assert found.get("AVX2", "32") == "32" and found.get("AVX512", "64") == "64"  # absent: a CPU without it
