# Weight-only quantization (gpt-fast style), its formats: the model is built plain, then its projections
# are replaced by QuantizedLinear modules holding int8 or int4 weights (or fp8 on CUDA sm89+), and,
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
# The modules that hold and run these forms are in llama.weights.quant_modules, the kernels they
# run in llama.runtime.quant_kernels.
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from llama import memory
# the stored int4 form is also the kernels' input: its reading lives with them, the runtime layer
from llama.runtime.quant_kernels import FP8_MAX, dequantize_int4, unpack_int4  # noqa: F401 (re-exported)
from llama.weights import sharding

MODES = ("int8", "int4", "fp8", "w8a8")
FILE_MODES = ("int8", "int4")  # what scripts/quantize.py writes
GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 kernels take
BLOCK_MODULES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
VOCAB_MODULES = ("output", "tok_embeddings")
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


# ---------------------------------------------------------------------------------------------
# The weight transforms (plain math; the tests check them against dequantization)


def _bf16_up(s: torch.Tensor) -> torch.Tensor:
    # round-to-nearest moves by at most 2^-9 relative, so inflating by 2^-8 first never rounds down
    return (s * (1 + 2**-8)).to(torch.bfloat16)


def quantize_int8(w: torch.Tensor, amax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output channel: (q int8 (out, in), scales bfloat16 (out,)).
    `amax` (out,): the rows' absolute maxima, when `w` holds only some of the columns."""
    w = w.to(torch.float32, copy=True)  # one temporary, worked on in place: it is a load's peak
    if amax is None:
        amax = w.abs().amax(dim=1)
    scales = _int8_scales(amax)
    return _int8_levels_(w, scales).to(torch.int8), scales


def _int8_scales(amax: torch.Tensor) -> torch.Tensor:
    """Each row's scale (bfloat16, rounded up so that its maximum stays within 127 steps)."""
    return _bf16_up(amax.float().clamp(min=1e-30) / 127)


def _int8_levels_(w32: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 rows -> their int8 levels (still float32), in place."""
    return w32.div_(scales.float()[:, None]).round_().clamp_(-127, 127)


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
    return dequantize_int4(unpack_int4(q), scales, zeros, group_size)


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
        return dict(zip(names, by_rows(lambda rows: quantize_int4(rows, config.group_size), w)))
    step = chunk_rows(w)
    # the one float32 temporary, reused by every chunk: a fresh one per chunk leaves the allocator's
    # heap holding up to twice the tensor's size by the end, depending on what ran before
    buf = torch.empty(min(step, len(w)), w.shape[1], device=w.device)
    amax = torch.cat([buf[: len(rows)].copy_(rows).abs_().amax(dim=1) for rows in w.split(step, dim=0)])
    if reduce_max is not None and sharding.shard_dim(key) == 1:
        amax = reduce_max(amax)
    if config.mode == "int8":  # quantize_int8's arithmetic, in place in the buffer
        scales = _int8_scales(amax)
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        for i in range(0, len(w), step):
            q[i : i + step] = _int8_levels_(buf[: len(w[i : i + step])].copy_(w[i : i + step]), scales[i : i + step])
        return dict(zip(names, (q, scales)))
    return dict(zip(names, by_rows(lambda rows, i: quantize_fp8(rows, amax[i : i + step]), w, with_start=True)))


CHUNK_BYTES = 8 << 20  # float32 temporaries of quantization stay within a few times this


def chunk_rows(w: torch.Tensor, multiple: int = 64, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk of `w` for float32 work of about `budget` bytes, a multiple of `multiple`."""
    rows = max(1, budget // max(4 * w[0].numel(), 1)) // multiple * multiple
    return max(rows, multiple)


def by_rows(fn: Callable, w: torch.Tensor, with_start: bool = False, step: Optional[int] = None) -> tuple[torch.Tensor, ...]:
    """fn applied to chunks of `step` rows of `w` (default _chunk_rows), its outputs written into
    tensors of all the rows: the float32 temporaries of a whole output projection (vocab x dim)
    would otherwise add gigabytes, and a list of chunks joined at the end holds the result twice."""
    step, outs = step or chunk_rows(w), None
    for i in range(0, len(w), step):
        parts = fn(w[i : i + step], i) if with_start else fn(w[i : i + step])
        if outs is None:
            if len(w) <= step:
                return parts
            outs = tuple(torch.empty((len(w), *p.shape[1:]), dtype=p.dtype, device=p.device) for p in parts)
        for out, p in zip(outs, parts):
            out[i : i + step] = p
        del parts
        # glibc keeps each chunk's freed temporaries in its heap: over the hundred chunks of a
        # vocabulary matrix they add more than its bfloat16 size to the peak of a quantizing load
        memory.release_freed_memory()
    return outs


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
