# Weight-only quantization (gpt-fast style): the model is built plain, then its projections are
# replaced by QuantizedLinear modules holding int8 or int4 weights (or fp8 on CUDA sm89+), and,
# with the output projection, the embedding by a QuantizedEmbedding (rows dequantized on lookup).
#
# The stored (canonical) form of a quantized projection `<m>` -- what scripts/quantize.py writes and
# what quantizing on load produces, bit for bit -- is, for an (out, in) weight W:
#   int8: <m>.weight int8 (out, in) and <m>.scales bfloat16 (out,):    W ~ weight * scales[:, None]
#         symmetric, one scale per output channel (amax / 127, rounded up to bfloat16)
#   int4: <m>.weight uint8 (out, in / 2), two 4-bit values q in [0, 15] per byte (column 2j in the
#         low nibble, 2j + 1 in the high one), <m>.scales and <m>.zeros bfloat16 (out, in / group):
#         W[:, j] ~ (q[:, j] - 8) * scales[:, j // group] + zeros[:, j // group]
#   fp8:  <m>.weight float8_e4m3fn (out, in) and <m>.scales float32 (out,) (in memory only)
# w8a8 is int8's stored form run differently: each block projection also quantizes its input rows
# (symmetric, one scale per row, at every product) and multiplies integers (fbgemm on x86 CPUs).
# Scales are computed in float32 from the weight as stored and rounded UP to bfloat16, so every
# weight is within half a step of its dequantized value.
#
# Each kind of step (a decode row, a prefill-size product) runs on the CPU kernel measured fastest
# for it at start-up (llama.kernels.quantized_kernel); CUDA uses tinygemm for int4,
# int8 dequantization inside the matmul (torch.compile fuses it), and torch._scaled_mm for fp8.
import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from llama import kernels, memory, sharding
from llama.distributed import gather_from_model_parallel_region, reduce_from_model_parallel_region

logger = logging.getLogger(__name__)

MODES = ("int8", "int4", "fp8", "w8a8")
FILE_MODES = ("int8", "int4")  # what scripts/quantize.py writes
GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 kernels take
BLOCK_MODULES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
VOCAB_MODULES = ("output", "tok_embeddings")
FP8_MAX = 448.0  # largest float8_e4m3fn
ReduceMax = Callable[[torch.Tensor], torch.Tensor]  # all-reduce MAX over the model-parallel group


@dataclass(frozen=True)
class QuantConfig:
    """How a model's weights are quantized: mode, int4 group size, and whether the output projection is."""

    mode: str  # the stored form: int8, int4 or fp8
    group_size: int = 32
    output: bool = True
    int8_activations: bool = False  # w8a8: int8 weights whose block projections also quantize their inputs

    @property
    def name(self) -> str:
        """The quantize= value this config stands for ("w8a8" for int8 with int8 activations)."""
        return "w8a8" if self.int8_activations else self.mode

    def stored_form(self) -> "QuantConfig":
        """How the weights are stored (what a checkpoint holds): w8a8 stores int8."""
        return QuantConfig(self.mode, self.group_size, self.output)

    def applies(self, key: str) -> bool:
        """Whether the weight of `key`'s module (a checkpoint key) is quantized: the block projections,
        and with `output` the two vocabulary matrices, the output projection and the embedding (one
        matrix in a tied model; rows are dequantized as they are looked up)."""
        module = sharding.module_of(key)
        return module in BLOCK_MODULES or (self.output and module in VOCAB_MODULES)

    def keys(self, weight_key: str) -> list[str]:
        """The stored keys of a quantized weight: <m>.weight, <m>.scales (and <m>.zeros for int4)."""
        base = weight_key.removesuffix(".weight")
        return [weight_key, base + ".scales"] + ([base + ".zeros"] if self.mode == "int4" else [])

    def to_params(self) -> dict:
        """The `quantization` block of params.json."""
        block = {"mode": self.mode, "output": self.output}
        if self.mode == "int4":
            block["group_size"] = self.group_size
        return block

    @staticmethod
    def from_params(params: dict) -> Optional["QuantConfig"]:
        """The quantization of a checkpoint from its params.json (None: full precision)."""
        block = params.get("quantization")
        if block is None:
            return None
        if not isinstance(block, dict) or block.get("mode") not in FILE_MODES:
            raise ValueError(f"params.json has an unknown quantization block {block!r}: mode must be one of {FILE_MODES}")
        return resolve(block["mode"], block.get("group_size", 32), block.get("output", True))

    def describe(self) -> str:
        extra = f", group size {self.group_size}" if self.mode == "int4" else ""
        if self.int8_activations:
            extra = " (int8 weights and, in the blocks, int8 activations)"
        return f"{self.name}{extra}, output and embedding {'quantized' if self.output else 'in full precision'}"


def resolve(quantize: Optional[str], group_size: int = 32, quantize_output: bool = True) -> Optional[QuantConfig]:
    """QuantConfig for Llama.build's `quantize`, `group_size`, `quantize_output`; None for None."""
    if quantize is None:
        return None
    if quantize not in MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}: use one of {', '.join(MODES)} (or None for full precision)")
    if quantize == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported: use one of {GROUP_SIZES}")
    if quantize == "w8a8":
        return QuantConfig("int8", 32, bool(quantize_output), int8_activations=True)
    return QuantConfig(quantize, int(group_size) if quantize == "int4" else 32, bool(quantize_output))


def check_device(mode: str, device: torch.device) -> None:
    """ValueError unless `device` has a kernel for `mode`."""
    device = torch.device(device)
    if mode == "fp8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(
                f"quantize='fp8' needs a CUDA GPU with float8 (compute capability 8.9+: L4, H100, ...), "
                f"not {device}: use quantize='int8' or 'int4'"
            )
    elif mode == "int4":
        has = {"cpu": hasattr(torch, "_weight_int4pack_mm_for_cpu"), "cuda": hasattr(torch, "_weight_int4pack_mm")}
        if not has.get(device.type, False) or device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            raise ValueError(
                f"quantize='int4' has no kernel on {device} in this PyTorch: use quantize='int8', "
                "or a CPU or an Ampere+ CUDA GPU"
            )
    elif mode == "int8" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantize='int8' has no kernel on {device}: use a CPU or CUDA device")
    elif mode == "w8a8" and (device.type != "cpu" or not kernels.w8a8_available()):
        raise ValueError(
            f"quantize='w8a8' runs on x86 CPUs (PyTorch's fbgemm), not on {device} here: use quantize='int8'"
        )


# ---------------------------------------------------------------------------------------------
# The weight transforms (plain math; the tests check them against dequantization)


def _bf16_up(s: torch.Tensor) -> torch.Tensor:
    # round-to-nearest moves by at most 2^-9 relative, so inflating by 2^-8 first never rounds down
    return (s * (1 + 2**-8)).to(torch.bfloat16)


def quantize_int8(w: torch.Tensor, amax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output channel: (q int8 (out, in), scales bfloat16 (out,)).
    `amax` (out,): the rows' absolute maxima, when `w` holds only some of the columns."""
    w = w.float()
    if amax is None:
        amax = w.abs().amax(dim=1)
    scales = _bf16_up(amax.float().clamp(min=1e-30) / 127)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of `group_size` along the input dimension:
    (q packed uint8 (out, in / 2), scales, zeros bfloat16 (out, in / group_size))."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {in_f}: use one that does")
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    zeros = (lo + 8 * (hi - lo) / 15).to(torch.bfloat16)
    z = zeros.float()
    # the 16 levels z + (q - 8) * s must reach within s/2 of both ends, whatever z's rounding did
    s = torch.maximum((hi - lo) / 15, torch.maximum((z - lo) / 8.5, (hi - z) / 7.5))
    scales = _bf16_up(s.clamp(min=1e-30))
    q = (torch.round((g - z[..., None]) / scales.float()[..., None]) + 8).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(out_f, in_f)), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values in [0, 15] -> (out, in / 2) uint8: column 2j low nibble, 2j + 1 high."""
    q = q.to(torch.uint8)
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (out, in / 2) uint8 -> (out, in) uint8 in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(1)


def quantize_fp8(w: torch.Tensor, amax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise float8_e4m3fn: (q (out, in), scales float32 (out,)), W ~ q * scales[:, None]."""
    w = w.float()
    if amax is None:
        amax = w.abs().amax(dim=1)
    scales = amax.float().clamp(min=1e-12) / FP8_MAX
    return (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def dequantize(
    mode: str, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None, group_size: int = 32
) -> torch.Tensor:
    """The float32 (out, in) weight a stored quantized weight stands for."""
    if mode in ("int8", "fp8"):
        return q.float() * scales.float()[:, None]
    return _dequantize_int4(unpack_int4(q), scales, zeros, group_size)


def _dequantize_int4(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    # values (rows, in) in [0, 15]; scales, zeros (rows, in / group_size)
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return (values.float() - 8) * s + z


def quantize_weight(
    key: str, w: torch.Tensor, config: QuantConfig, reduce_max: Optional[ReduceMax] = None
) -> dict[str, torch.Tensor]:
    """The stored tensors of weight `key` (a rank's slice or the full weight) quantized as `config`.

    A row-parallel slice holds only some input columns of each output channel; int8 and fp8 then
    need the whole row's maximum, which `reduce_max` gives (an all-reduce MAX over the model-parallel
    group), so every process count yields the same scales as the full weight. int4 groups never
    straddle a split (sharding.check_group_alignment), so they need nothing.
    """
    names = config.keys(key)
    if config.mode == "int4":
        return dict(zip(names, _by_rows(lambda rows: quantize_int4(rows, config.group_size), w)))
    amax = torch.cat([rows.float().abs().amax(dim=1) for rows in w.split(_chunk_rows(w), dim=0)])
    if reduce_max is not None and sharding.shard_dim(key) == 1:
        amax = reduce_max(amax)
    fn = quantize_int8 if config.mode == "int8" else quantize_fp8
    step = _chunk_rows(w)
    return dict(zip(names, _by_rows(lambda rows, i: fn(rows, amax[i : i + step]), w, with_start=True)))


CHUNK_BYTES = 8 << 20  # float32 temporaries of quantization stay within a few times this


def _chunk_rows(w: torch.Tensor, multiple: int = 64, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk of `w` for float32 work of about `budget` bytes, a multiple of `multiple`."""
    rows = max(1, budget // max(4 * w[0].numel(), 1)) // multiple * multiple
    return max(rows, multiple)


def _by_rows(fn: Callable, w: torch.Tensor, with_start: bool = False, step: Optional[int] = None) -> tuple[torch.Tensor, ...]:
    """fn applied to chunks of `step` rows of `w` (default _chunk_rows), its outputs written into
    tensors of all the rows: the float32 temporaries of a whole output projection (vocab x dim)
    would otherwise add gigabytes, and a list of chunks joined at the end holds the result twice."""
    step, outs = step or _chunk_rows(w), None
    for i in range(0, len(w), step):
        parts = fn(w[i : i + step], i) if with_start else fn(w[i : i + step])
        if outs is None:
            if len(w) <= step:
                return parts
            outs = tuple(torch.empty((len(w), *p.shape[1:]), dtype=p.dtype, device=p.device) for p in parts)
        for out, p in zip(outs, parts):
            out[i : i + step] = p
    return outs


# ---------------------------------------------------------------------------------------------
# Kernels: which one runs which kind of step

# Paths a QuantizedLinear can take on CPU (llama.kernels and scripts/bench_quant.py time each):
#   "pack":    torch._weight_int8pack_mm / torch._weight_int4pack_mm_for_cpu
#   "dequant": the weight dequantized to the compute dtype, then F.linear (int8 on CPU, eager: a block
#              of rows at a time, kernels.upcast_linear; the int8 scales multiply the product's columns)
#   "dynamic": w8a8's, fbgemm's int8 product with each input row rounded to int8 (not weight-only)
CPU_PATHS = kernels.QUANT_PATHS
PATH_MODES = {"pack": ("int8", "int4"), "dequant": ("int8", "int4")}

# A step is "decode" (at most DECODE_ROWS rows), "small" (at most kernels.SMALL_ROWS) or "prefill". Which path and compute dtype each
# (mode, step) takes on CPU is measured on the machine at hand, once per process, by llama.kernels
# (quantized_kernel); a forced dtype (dtype="float32") runs in that dtype, exactly.
DECODE_ROWS = 4
STEPS = kernels.QUANT_STEPS
INT4_INNER_K_TILES = {"cpu": 2, "cuda": 8}


def step_for(rows: int) -> str:
    """The kind of quantized product (a key of STEPS) for `rows` token rows."""
    return "decode" if rows <= DECODE_ROWS else "small" if rows <= kernels.SMALL_ROWS else "prefill"


class QuantizedLinear(nn.Module):
    """A (fairscale column- or row-parallel) linear layer with quantized weights.

    Holds this rank's slice in the kernels' own layout (buffers, not in the state dict: the stored
    form is what checkpoints hold), and runs each product on the kernel chosen for its kind of step.
    `parallel`: None, "column" (gathers its output when `gather_output`) or "row" (all-reduces it),
    as the fairscale layer it replaces. `compute_dtype`: the dtype products run in (None: the
    measured choice per step, llama.kernels.quantized_kernel); `path` forces one CPU path for every step, in
    `compute_dtype` or else the activations' dtype (benchmarks, tests).
    """

    def __init__(
        self,
        mode: str,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: Optional[torch.Tensor],
        group_size: int,
        act_dtype: torch.dtype,
        parallel: Optional[str] = None,
        gather_output: bool = False,
        path: Optional[str] = None,
        compute_dtype: Optional[torch.dtype] = None,
        consume: bool = False,
    ):
        """consume: `q` is this layer's alone (nothing else holds it), so int4 may be packed over it."""
        super().__init__()
        self.mode, self.group_size, self.act_dtype = mode, group_size, act_dtype
        self.parallel, self.gather_output = parallel, gather_output
        self.out_features = q.shape[0]
        self.packed_in_place = False  # int4: the kernel layout written over `q` itself
        self.in_features = q.shape[1] * (2 if mode == "int4" else 1)
        device = q.device
        if device.type == "cuda":
            self.kernels = {step: self._cuda_path() for step in STEPS}
        elif path == "dynamic":  # w8a8: float32 into fbgemm's int8 product
            self.kernels = {step: (path, torch.float32) for step in STEPS}
        elif path is not None:  # one path for every step (benchmarks, tests)
            self.kernels = {step: (path, compute_dtype or act_dtype) for step in STEPS}
        else:
            self.kernels = {step: kernels.quantized_kernel(mode, step, compute_dtype) for step in STEPS}
        if mode == "int4" and device.type == "cpu" and self.out_features % 16:
            # the CPU int4 kernel wants rows in blocks of 16 (a few tensor-parallel slices are not)
            self.kernels = {step: ("dequant", dt) for step, (_, dt) in self.kernels.items()}
        paths = {p for p, _ in self.kernels.values()}
        compute = {dt or act_dtype for _, dt in self.kernels.values()}
        if paths == {"dynamic"}:  # w8a8: only fbgemm's packed copy (a TorchScript object, not a buffer)
            self.packed, self.levels, self.packed_bytes = kernels.w8a8_prepack(q, scales), kernels.w8a8_levels(), q.nbytes
            self.row_max = model_parallel_max() if parallel == "row" else None
            self.register_buffer("scales", scales, persistent=False)
        elif mode == "int8":
            self.register_buffer("weight", q, persistent=False)
            for dt in compute:
                self.register_buffer(_name("scales", dt), scales.to(dt), persistent=False)
        elif mode == "fp8":
            self.register_buffer("weight", q, persistent=False)
            self.register_buffer("scales", scales.float()[None, :], persistent=False)  # (1, out)
        else:
            if "dequant" in paths:
                self.register_buffer("weight", q, persistent=False)
                self.register_buffer("scales", scales, persistent=False)
                self.register_buffer("zeros", zeros, persistent=False)
            if "pack" in paths:
                packed = _int4_kernel_layout(q, in_place=consume and "dequant" not in paths)
                self.packed_in_place = packed.data_ptr() == q.data_ptr()
                self.register_buffer("weight" if "dequant" not in paths else "packed", packed, persistent=False)
                for dt in compute:
                    sz = torch.stack((scales.t(), zeros.t()), dim=-1).to(dt).contiguous()  # (in/g, out, 2)
                    self.register_buffer(_name("scales_and_zeros", dt), sz, persistent=False)

    def _cuda_path(self) -> tuple[str, Optional[torch.dtype]]:
        if self.mode == "int4":  # tinygemm takes bfloat16 activations
            return "pack", torch.bfloat16
        return ("scaled_mm" if self.mode == "fp8" else "dequant"), None

    @classmethod
    def from_quantized(
        cls, mode: str, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
        act_dtype: torch.dtype, path: Optional[str] = None,
    ) -> "QuantizedLinear":
        return cls(mode, q, scales, zeros, group_size, act_dtype, path=path)

    def extra_repr(self) -> str:
        return f"{self.mode}, in={self.in_features}, out={self.out_features}, kernels={self.kernels}"

    def dequantize(self) -> torch.Tensor:
        """This rank's weight as float32 (out, in), from the held tensors (any path)."""
        if self.mode == "int4":
            if hasattr(self, "zeros"):
                return dequantize("int4", self.weight, self.scales, self.zeros, self.group_size)
            dt = next(dt for _, dt in self.kernels.values())
            # the packed layout is the kernel's own: read it back through the kernel, as identity @ W^T
            eye = torch.eye(self.in_features, dtype=dt or self.act_dtype, device=self.weight.device)
            return self._int4_pack(eye, dt or self.act_dtype).float().t()
        if hasattr(self, "packed"):
            q = torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()
            return q.float() * self.scales.float().reshape(-1, 1)
        name = "scales" if self.mode == "fp8" else _name("scales", next(iter(self.kernels.values()))[1] or self.act_dtype)
        return self.weight.float() * getattr(self, name).float().reshape(-1, 1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) @ W^T -> (..., out) on this rank's slice, in x's dtype; no communication."""
        rows = x.numel() // x.shape[-1]
        path, dt = self.kernels[step_for(rows)]
        dt = dt or x.dtype
        x2 = x.reshape(rows, x.shape[-1]).to(dt)  # (rows, in)
        if path == "pack":
            out = self._int8_pack(x2, dt) if self.mode == "int8" else self._int4_pack(x2, dt)
        elif path == "scaled_mm":
            out = self._fp8(x2)
        elif path == "dynamic":
            amax = x2.abs().amax(dim=1, keepdim=True)
            if self.row_max is not None:  # a row-parallel slice: this rank holds some of each row's columns
                amax = self.row_max(amax)  # round them as one process would: the same tokens on any count
            out = kernels.w8a8_matmul(x2, self.packed, self.levels, amax)
        elif self.mode == "int8":
            scales = getattr(self, _name("scales", dt))
            if x2.device.type == "cpu" and not torch.compiler.is_compiling():
                # a block of rows at a time into one reused buffer: a whole-weight temporary would be
                # page-faulted in at every product
                out = kernels.upcast_linear(x2, self.weight, kernels.upcast_scratch(dt, x2.device)) * scales
            else:  # CUDA's caching allocator reuses the temporary; compiled, inductor fuses it into the product
                out = F.linear(x2, self.weight.to(dt)) * scales
        else:
            w = dequantize("int4", self.weight, self.scales, self.zeros, self.group_size).to(dt)
            out = F.linear(x2, w)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _int8_pack(self, x2: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2, self.weight, getattr(self, _name("scales", dt)))

    def _int4_pack(self, x2: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        w = self.packed if hasattr(self, "packed") else self.weight
        sz = getattr(self, _name("scales_and_zeros", dt))
        if x2.device.type == "cuda":
            return torch._weight_int4pack_mm(x2, w, self.group_size, sz)
        return torch._weight_int4pack_mm_for_cpu(x2, w, self.group_size, sz)

    def _fp8(self, x2: torch.Tensor) -> torch.Tensor:
        # row-wise dynamic float8 activations, as Meta's own fp8 path quantizes them
        x_scale = x2.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # (rows, 1)
        xq = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.scales, out_dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        if self.parallel == "row":
            return reduce_from_model_parallel_region(out)
        if self.parallel == "column" and self.gather_output:
            return gather_from_model_parallel_region(out)
        return out


class QuantizedEmbedding(nn.Module):
    """fairscale's VocabParallelEmbedding over stored quantized rows (int8 or int4): each rank holds
    a range of the vocabulary, looks up the tokens in it, dequantizes just those rows to `act_dtype`,
    and the ranks' partial results are summed."""

    def __init__(
        self, mode: str, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
        act_dtype: torch.dtype, vocab_start: int = 0,
    ):
        super().__init__()
        self.mode, self.group_size, self.act_dtype = mode, group_size, act_dtype
        self.vocab_start, self.vocab_end = vocab_start, vocab_start + q.shape[0]
        self.kernel_block = None  # rows per block of the int4 kernel layout `weight` holds (read_kernel_layout)
        self.register_buffer("weight", q, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        if zeros is not None:
            self.register_buffer("zeros", zeros, persistent=False)

    def read_kernel_layout(self, output: "QuantizedLinear", block: int) -> None:
        """Look rows up in a tied output's int4 kernel layout, packed over this embedding's stored
        tensor (install), and in its scales and zeros: one copy of the vocabulary matrix for both."""
        self.kernel_block = block
        self.weight = output.weight
        del self.scales, self.zeros
        dt = next(dt or output.act_dtype for _, dt in output.kernels.values())
        self.register_buffer("scales_and_zeros", getattr(output, _name("scales_and_zeros", dt)), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        flat = local.reshape(-1)
        if self.kernel_block is not None:
            sz = self.scales_and_zeros[:, flat].transpose(0, 1)  # (tokens, in / group, 2)
            values = _kernel_layout_rows(self.weight, flat, self.kernel_block)
            rows = _dequantize_int4(values, sz[..., 0], sz[..., 1], self.group_size)
        else:
            rows = dequantize(
                self.mode, self.weight[flat], self.scales[flat], getattr(self, "zeros", None)[flat] if self.mode == "int4" else None,
                self.group_size,
            )  # (tokens, dim) float32
        out = rows.to(self.act_dtype).reshape(*tokens.shape, -1).masked_fill(outside[..., None], 0)
        return reduce_from_model_parallel_region(out)


def _name(base: str, dtype: torch.dtype) -> str:
    return f"{base}_{str(dtype).removeprefix('torch.')}"


def _int4_kernel_layout(q: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Stored int4 (out, in / 2) uint8 -> the layout of PyTorch's int4 kernel on q's device.
    `in_place` (CPU): written over q itself, block by block (the layout keeps each block of 64
    rows in its own bytes), so that packing the output projection, the last and largest tensor
    converted while the rest of the model is resident, holds no second copy of it."""
    if q.device.type == "cuda":  # tinygemm takes the even column in the HIGH nibble
        values = unpack_int4(q)
        swapped = (values[:, ::2] << 4) | values[:, 1::2]
        return torch._convert_weight_to_int4pack(swapped.contiguous(), INT4_INNER_K_TILES["cuda"])
    # in chunks of 64 rows (the kernel's blocks), so the int32 copy it takes stays small: packing
    # runs while the rest of the model is resident, so its temporaries are the load's peak
    step = _chunk_rows(unpack_int4(q[:1]), budget=CHUNK_BYTES // 4) if len(q) % 64 == 0 else len(q)
    pack = lambda rows: (torch._convert_weight_to_int4pack_for_cpu(unpack_int4(rows).to(torch.int32), INT4_INNER_K_TILES["cpu"]),)
    if in_place and len(q) % 64 == 0:
        for i in range(0, len(q), step):
            q[i : i + step] = pack(q[i : i + step])[0]  # the block is read whole before it is overwritten
        return q
    return _by_rows(pack, q, step=step)[0]


def _kernel_layout_rows(packed: torch.Tensor, rows: torch.Tensor, block: int) -> torch.Tensor:
    """Rows `rows` (n,) of the int4 values (n, in) in [0, 15] held in the CPU kernel's layout
    `packed` (out, in / 2), where each block of `block` rows is stored column by column, a byte
    holding row r of the block in its low nibble and row r + block / 2 in its high one."""
    half = block // 2
    by_block = packed.view(-1, packed.shape[1] * 2, half)  # (out / block, in, block / 2)
    picked = by_block[rows // block, :, rows % half]  # (n, in)
    return torch.where((rows % block >= half)[:, None], picked >> 4, picked & 15)


@functools.cache
def int4_kernel_block() -> Optional[int]:
    """The rows per block of the CPU int4 kernel's layout when _kernel_layout_rows reads it, else
    None. The layout is PyTorch's own (not documented, and it may differ by build and CPU), so it is
    probed once, on a small tensor, before a tied embedding is made to read from it."""
    values = torch.randint(0, 16, (128, 128), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), INT4_INNER_K_TILES["cpu"])
    if packed.shape != (128, 64) or packed.dtype != torch.uint8:
        return None
    rows = torch.arange(128)
    return next((b for b in (64, 32, 16) if torch.equal(_kernel_layout_rows(packed, rows, b), values)), None)


# ---------------------------------------------------------------------------------------------
# Putting quantized layers into a built model


def quantized_module_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """Names of the modules `config` quantizes ("layers.0.attention.wq", ..., "output")."""
    return [name for name, _ in model.named_modules() if name and config.applies(name + ".weight")]


def install(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    config: QuantConfig,
    act_dtype: torch.dtype,
    compute_dtype: Optional[torch.dtype] = None,
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """Replace each linear layer `config` quantizes by a QuantizedLinear built from its stored
    tensors in `state` (this rank's slices), which are taken out of it. Returns the rest of `state`
    (the full-precision weights: embedding, norms, an unquantized output) for load_state_dict.
    Takes them out of `state` itself, so each stored tensor is freed once it is in the kernels'
    layout: packing int4 then needs one tensor's room, not a second copy of the model.
    `consume`: nothing but `state` holds its tensors (a load's own), so int4 is packed over
    each stored tensor that no other layer shares. A tied output shares the embedding's: on CPU
    it is packed over it too when the kernel's layout is one the embedding can read rows from
    (int4_kernel_block), and the embedding then looks its rows up there; otherwise it is copied."""
    rest = state
    names = quantized_module_names(model, config)
    storages = Counter(t.untyped_storage().data_ptr() for t in state.values())  # twice: shared by two keys
    embedding = None
    for name in names:
        keys = config.keys(name + ".weight")
        missing = [k for k in keys if k not in rest]
        if missing:
            raise ValueError(f"quantized weights {missing} are missing: the checkpoint is not quantized as {config.describe()}")
        q, scales, *zeros = (rest.pop(k) for k in keys)
        old = model.get_submodule(name)
        if name == "tok_embeddings":
            new = embedding = QuantizedEmbedding(
                config.mode, q, scales, zeros[0] if zeros else None, config.group_size, act_dtype,
                vocab_start=getattr(old, "vocab_start_index", 0),
            )
        else:
            storage = q.untyped_storage().data_ptr()
            tied = embedding is not None and embedding.weight.untyped_storage().data_ptr() == storage
            share = tied and config.mode == "int4" and q.device.type == "cpu" and int4_kernel_block() is not None
            parallel = "row" if sharding.shard_dim(name + ".weight") == 1 else "column"
            # w8a8 rounds the inputs of the block projections only: the logits keep int8's weight-only product
            dynamic = config.int8_activations and sharding.module_of(name + ".weight") in BLOCK_MODULES
            new = QuantizedLinear(
                config.mode, q, scales, zeros[0] if zeros else None, config.group_size, act_dtype,
                parallel=parallel, gather_output=getattr(old, "gather_output", False),
                path="dynamic" if dynamic else None, compute_dtype=compute_dtype,
                consume=consume and (storages[storage] == 1 or (share and storages[storage] == 2)),
            )
            if tied and new.packed_in_place:
                embedding.read_kernel_layout(new, int4_kernel_block())  # packed over the embedding's
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        del q, scales, zeros, old
        memory.release_freed_memory()  # the stored int4 form just packed, and the packing's temporaries
    if names and model.__class__.__name__ == "Transformer":
        logger.debug("quantized %d projections (%s)", len(names), config.describe())
    return rest


def state_to_quantized(
    state: dict[str, torch.Tensor], config: QuantConfig, reduce_max: Optional[ReduceMax] = None
) -> dict[str, torch.Tensor]:
    """A state dict with every weight `config` quantizes replaced by its stored quantized tensors."""
    out = {}
    for key, t in state.items():
        if key.endswith(".weight") and config.applies(key):
            out.update(quantize_weight(key, t, config, reduce_max))
        else:
            out[key] = t
    return out


def model_parallel_max() -> Optional[ReduceMax]:
    """An all-reduce MAX over fairscale's model-parallel group, or None on one process."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    if not fs_init.model_parallel_is_initialized() or fs_init.get_model_parallel_world_size() == 1:
        return None
    group = fs_init.get_model_parallel_group()

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t

    return reduce


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and quantized buffers (the KV cache left out)."""
    seen = {}  # a tied model's output shares the embedding's tensors: count them once
    for t in list(model.parameters()) + [b for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for b in m.buffers(recurse=False)]:
        seen[t.data_ptr()] = t.nbytes
    return sum(seen.values()) + sum(getattr(m, "packed_bytes", 0) for m in model.modules())


