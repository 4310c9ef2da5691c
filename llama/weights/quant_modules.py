# The quantized modules that replace a built model's layers (llama.weights.quant_formats gives the
# stored forms): QuantizedLinear runs each product on the kernel chosen for its kind of step
# (llama.runtime.quant_choice) through llama.runtime's kernels, QuantizedEmbedding dequantizes the
# rows it looks up, and `install` swaps them into a model from a state dict of stored tensors.
import logging
from collections import Counter
from typing import Optional, Sequence

import torch
from torch import nn

from llama import memory
from llama.distributed import gather_from_model_parallel_region, reduce_from_model_parallel_region
from llama.runtime import native, quant_choice, w8a8
from llama.runtime import quant_kernels as qk
from llama.runtime.policy import dtype_name
from llama.runtime.quant_choice import QUANT_COMPUTES, QUANT_PATHS, QUANT_STEPS, STORED_FORM, step_for
from llama.weights import quant_blocks, quant_formats, sharding
from llama.weights.quant_formats import BLOCK_MODULES, QuantConfig, by_rows, dequantize, model_parallel_max

logger = logging.getLogger(__name__)


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
    elif mode == "w8a8" and (device.type != "cpu" or not w8a8.w8a8_available()):
        raise ValueError(
            f"quantize='w8a8' cannot run here: {w8a8.why_unavailable(device)}; use quantize='int8' (the same "
            "int8 weights, activations not rounded)"
        )


# ---------------------------------------------------------------------------------------------
# The layers

# Paths a QuantizedLinear can take on CPU (llama.runtime.quant_choice and scripts/bench_quant.py
# time each; llama.runtime.quant_kernels describes them), and w8a8's "dynamic": fbgemm's int8
# product with each input row rounded to int8 (not weight-only). Which path and compute dtype each
# (mode, step) takes on CPU is measured on the machine at hand, once per process
# (quant_choice.quantized_kernel); a forced dtype (dtype="float32") runs in that dtype, exactly.
CPU_PATHS = QUANT_PATHS
PATH_MODES = {"pack": ("int8", "int4"), "dequant": ("int8", "int4"), "native": ("int8", "int4"), "native_a8": ("int8", "int4")}
NATIVE = ("native", "native_a8")  # this package's kernels: float32 activations (native_a8 rounds them to int8)
STEPS = QUANT_STEPS


class QuantizedLinear(nn.Module):
    """A (fairscale column- or row-parallel) linear layer with quantized weights.

    Holds this rank's slice in the kernels' own layout (buffers, not in the state dict: the stored
    form is what checkpoints hold), and runs each product on the kernel chosen for its kind of step.
    `parallel`: None, "column" (gathers its output when `gather_output`) or "row" (all-reduces it),
    as the fairscale layer it replaces. `compute_dtype`: the dtype products run in (None: the
    measured choice per step, llama.runtime.quant_choice.quantized_kernel); `path` forces one CPU path for every step, in
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
            dt = torch.float32 if path in NATIVE else compute_dtype or act_dtype  # native: float32 activations
            self.kernels = {step: (path, dt) for step in STEPS}
        else:
            self.kernels = {step: quant_choice.quantized_kernel(mode, step, compute_dtype) for step in STEPS}
        if mode == "int4" and device.type == "cpu" and self.out_features % 16:
            # the CPU int4 kernel wants rows in blocks of 16 (a few tensor-parallel slices are not)
            self.kernels = {step: ("dequant", dt) for step, (_, dt) in self.kernels.items()}
        paths = {p for p, _ in self.kernels.values()}
        compute = {dt or act_dtype for _, dt in self.kernels.values()}
        if paths == {"dynamic"}:  # w8a8: only fbgemm's packed copy (a TorchScript object, not a buffer)
            self.packed, self.levels, self.packed_bytes = w8a8.w8a8_prepack(q, scales), w8a8.w8a8_levels(), q.nbytes
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
            if set(STORED_FORM) & paths:  # the stored form
                self.register_buffer("weight", q, persistent=False)
                self.register_buffer("scales", scales, persistent=False)
                self.register_buffer("zeros", zeros, persistent=False)
            if "pack" in paths:
                packed = _int4_kernel_layout(q, in_place=consume and not set(STORED_FORM) & paths)
                self.packed_in_place = packed.data_ptr() == q.data_ptr()
                self.register_buffer("packed" if set(STORED_FORM) & paths else "weight", packed, persistent=False)
                for dt in compute:
                    sz = qk.scales_and_zeros(scales, zeros, dt)  # (in/g, out, 2)
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
        step = step_for(rows)
        path, dt = self.kernels[step]
        dt = dt or x.dtype
        if path in NATIVE:
            if not torch.compiler.is_compiling():  # decode's ~100 products a token: the fewest steps
                return self._native(x, int8_activations=path == "native_a8")
            path = "dequant"  # the native kernels read raw memory, which a traced graph cannot call
        x2 = x.reshape(rows, x.shape[-1]).to(dt)  # (rows, in)
        if step == "prefill" and path in ("pack", "dequant") and self._blocks_readable():
            out = self._dequant_blocks(x2, dt)
        elif path == "pack":
            out = self._int8_pack(x2, dt) if self.mode == "int8" else self._int4_pack(x2, dt)
        elif path == "scaled_mm":
            out = self._fp8(x2)
        elif path == "dynamic":
            amax = x2.abs().amax(dim=1, keepdim=True)
            if self.row_max is not None:  # a row-parallel slice: this rank holds some of each row's columns
                amax = self.row_max(amax)  # round them as one process would: the same tokens on any count
            out = w8a8.w8a8_matmul(x2, self.packed, self.levels, amax)
        elif self.mode == "int8":
            out = qk.int8_dequant_mm(x2, self.weight, getattr(self, _name("scales", dt)))
        else:
            out = qk.int4_dequant_mm(x2, self.weight, self.scales, self.zeros, self.group_size)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _blocks_readable(self) -> bool:
        """Whether a prefill can dequantize this layer block by block: on CPU, eager, int8 or int4 in
        its stored form (int4 in PyTorch's packed layout keeps the packed kernel: reading that
        layout back by rows costs more than the block product gains)."""
        if self.weight.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        return self.mode == "int8" or self.mode == "int4" and hasattr(self, "zeros")

    def _dequant_blocks(self, x2: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """x2 @ W^T for a prefill, block by block (llama.weights.quant_blocks)."""
        out = quant_blocks.blocks_mm(x2, self.out_features, self._dequantized_rows)
        if self.mode == "int8":  # q converts exactly; its scales multiply the product's columns, as int8_dequant_mm's
            scales = next(getattr(self, _name("scales", d)) for d in (dt, *QUANT_COMPUTES) if hasattr(self, _name("scales", d)))
            out.mul_(scales.to(dt))
        return out

    def _dequantized_rows(self, start: int, stop: int, w: torch.Tensor) -> torch.Tensor:
        """Rows start:stop of this weight written into `w` (int8: the values, unscaled)."""
        if self.mode == "int8":
            return w.copy_(self.weight[start:stop])
        if native.kernels() is not None and w.dtype in (torch.float32, torch.bfloat16):  # the same values, one pass
            return native.int4_into(w, self.weight[start:stop], self.scales[start:stop], self.zeros[start:stop], self.group_size)
        values, scales, zeros = qk.unpack_int4(self.weight[start:stop]), self.scales[start:stop], self.zeros[start:stop]
        return quant_blocks.int4_into(w, values, scales, zeros, self.group_size)

    def _int8_pack(self, x2: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return qk.int8_pack_mm(x2, self.weight, getattr(self, _name("scales", dt)))

    def _int4_pack(self, x2: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        w = self.packed if hasattr(self, "packed") else self.weight
        return qk.int4_pack_mm(x2, w, self.group_size, getattr(self, _name("scales_and_zeros", dt)))

    def _native(self, x: torch.Tensor, int8_activations: bool = False) -> torch.Tensor:
        """x (..., in) @ W^T in x's dtype through this package's kernels, on the buffers this module
        made in their forms (native.quantized_linear checks no weight)."""
        return native.quantized_linear(x, *self._native_tensors(), self.group_size, int8_activations)

    def _native_tensors(self) -> tuple:
        """(q, scales, zeros or None) in the native kernels' forms."""
        if self.mode == "int8":
            return self.weight, self.scales_float32, None
        return self.weight, self.scales, self.zeros

    def joint(self, x: torch.Tensor, layers: Sequence[nn.Module]) -> Optional[list[torch.Tensor]]:
        """Each of `layers`' outputs for x (this layer first; llama.parallel_layers.project) from one
        call of the int8-activation kernels, which round x once for all; None where those do not
        run this step for all of them alike, or a hook watches one (it would see no call)."""
        step = step_for(x.numel() // x.shape[-1])
        if torch.compiler.is_compiling() or not all(
            isinstance(m, QuantizedLinear) and m.kernels.get(step, ("",))[0] == "native_a8" and m.mode == self.mode
            and m.group_size == self.group_size and m.parallel != "row" and not m.gather_output
            and not (m._forward_hooks or m._forward_pre_hooks) for m in layers
        ):
            return None
        return native.quantized_products(x, [m._native_tensors() for m in layers], self.group_size, True)

    def _fp8(self, x2: torch.Tensor) -> torch.Tensor:
        return qk.fp8_mm(x2, self.weight, self.scales)

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
            values = qk.kernel_layout_rows(self.weight, flat, self.kernel_block)
            rows = qk.dequantize_int4(values, sz[..., 0], sz[..., 1], self.group_size)
        else:
            rows = dequantize(
                self.mode, self.weight[flat], self.scales[flat], getattr(self, "zeros", None)[flat] if self.mode == "int4" else None,
                self.group_size,
            )  # (tokens, dim) float32
        out = rows.to(self.act_dtype).reshape(*tokens.shape, -1).masked_fill(outside[..., None], 0)
        return reduce_from_model_parallel_region(out)


def _name(base: str, dtype: torch.dtype) -> str:
    return f"{base}_{dtype_name(dtype)}"


def _int4_kernel_layout(q: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Stored int4 (out, in / 2) uint8 -> the layout of PyTorch's int4 kernel on q's device.
    `in_place` (CPU): written over q itself, block by block (the layout keeps each block of 64
    rows in its own bytes), so that packing the output projection, the last and largest tensor
    converted while the rest of the model is resident, holds no second copy of it."""
    if q.device.type == "cuda":
        return qk.int4_kernel_layout(q)
    # in chunks of 64 rows (the kernel's blocks), so the int32 copy it takes stays small: packing
    # runs while the rest of the model is resident, so its temporaries are the load's peak
    budget = quant_formats.CHUNK_BYTES // 4
    step = quant_formats.chunk_rows(qk.unpack_int4(q[:1]), budget=budget) if len(q) % 64 == 0 else len(q)
    pack = lambda rows: (qk.int4_kernel_layout(rows),)
    if in_place and len(q) % 64 == 0:
        for i in range(0, len(q), step):
            q[i : i + step] = pack(q[i : i + step])[0]  # the block is read whole before it is overwritten
        return q
    return by_rows(pack, q, step=step)[0]


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
            share = tied and config.mode == "int4" and q.device.type == "cpu" and qk.int4_kernel_block() is not None
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
                embedding.read_kernel_layout(new, qk.int4_kernel_block())  # packed over the embedding's
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        del q, scales, zeros, old
        memory.release_freed_memory()  # the stored int4 form just packed, and the packing's temporaries
    if names and model.__class__.__name__ == "Transformer":
        logger.debug("quantized %d projections (%s)", len(names), config.describe())
    return rest


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and quantized buffers (the KV cache left out)."""
    seen = {}  # a tied model's output shares the embedding's tensors: count them once
    for t in list(model.parameters()) + [b for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for b in m.buffers(recurse=False)]:
        seen[t.data_ptr()] = t.nbytes
    return sum(seen.values()) + sum(getattr(m, "packed_bytes", 0) for m in model.modules())


