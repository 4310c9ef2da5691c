# This package's own CPU kernels (csrc/gemv.cpp): products of a few activation rows with int8 and int4
# weights that read each weight byte once, at the instruction set the CPU has (AVX-512,
# AVX2 + FMA, or plain C++), chosen at run time; (csrc/bf16.cpp) the same with bfloat16 weights and
# float32 or bfloat16 activations (AVX-512 BF16's bfloat16 products where present); and (csrc/q8.cpp) the int8 and int4 products with
# the activations rounded to int8 per block of 32 and integer dot products (AVX-512 VNNI, AVX-512BW,
# AVX2 or plain C++), whose results are those of the rounded activations ("a8": not weight-only). Compiled on first use with the machine's C++
# compiler (torch.utils.cpp_extension with ninja) into a build directory under the user's cache,
# one per PyTorch version and CPU, so later processes only load it. Where nothing can compile it,
# `kernels()` is None (logged once) and the quantized products keep PyTorch's own paths.
import functools
import logging
import os
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import torch

from llama.runtime import stored

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "gemv.cpp"
SOURCES = (SOURCE, CSRC / "q8.cpp", CSRC / "bf16.cpp", CSRC / "dequant.cpp")
ISAS = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3, "avx512vnni": 4, "avx512bf16": 5}
A8_BLOCK = 32  # the int8-activation kernels round each activation row in blocks of this many columns
NAMES = {v: k for k, v in ISAS.items()}
KERNELS_DIR_ENV = "LLAMA_KERNELS_DIR"
DISABLE_ENV = "LLAMA_NO_NATIVE"


def compiler() -> Optional[str]:
    """The C++ compiler a build would use ($CXX, else c++), if it exists."""
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


def build_dir() -> Path:
    """Where the extension is built: per PyTorch version and CPU (its model and flags) and source,
    under $LLAMA_KERNELS_DIR if set (the tests share one build), else the user's cache."""
    m = stored.machine()
    digest = stored.digest({**m, "source": "".join(p.read_text() for p in sorted(CSRC.iterdir()))})
    root = Path(os.environ[KERNELS_DIR_ENV]) if os.environ.get(KERNELS_DIR_ENV) else stored.cache_root() / "kernels"
    return root / f"torch{m['torch']}-{digest}"


def kernels() -> Optional[ModuleType]:
    """The compiled extension (built on first use, then loaded), or None where it cannot be built."""
    return _kernels()


@functools.lru_cache(maxsize=None)
def _kernels() -> Optional[ModuleType]:
    if os.environ.get(DISABLE_ENV):
        logger.info("CPU kernels: %s is set: PyTorch's own products run", DISABLE_ENV)
        return None
    if compiler() is None or shutil.which("ninja") is None and not _has_ninja_module():
        logger.info("CPU kernels: no C++ compiler (%s) or ninja here: PyTorch's own products run", os.environ.get("CXX", "c++"))
        return None
    from torch.utils import cpp_extension

    path = build_dir()
    path.mkdir(parents=True, exist_ok=True)
    if not any(path.glob("*.so")):  # the first use on this machine and PyTorch: say why it takes a while
        logger.info("CPU kernels: building %s into %s (once per machine and PyTorch version)", SOURCE.name, path)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name="llama_gemv", sources=[str(p) for p in SOURCES], build_directory=str(path),
            extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as e:  # a compiler that fails is as good as none: the products still run
        logger.info("CPU kernels: could not build %s (%s): PyTorch's own products run", SOURCE.name, str(e).splitlines()[0][:200])
        return None
    logger.debug("CPU kernels ready in %.1f s (%s, %s)", time.perf_counter() - start, path, NAMES[module.best_isa()])
    return module


def _has_ninja_module() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return is_ninja_available()
    except Exception:
        return False


def best_isa() -> str:
    """The widest instruction set the kernels use on this CPU ("avx512bf16", "avx512vnni", "avx512",
    "avx2" or "generic"; VNNI only the int8-activation kernels use, BF16 only the bfloat16 product
    with bfloat16 activations)."""
    return NAMES[kernels().best_isa()]


def available_isas(int8_activations: bool = False, bf16_activations: bool = False) -> list[str]:
    """Every instruction set this CPU can run the kernels at, narrowest first (tests force each):
    AVX-512 VNNI only for the kernels with int8 activations, AVX-512 BF16 only for the bfloat16
    product with bfloat16 activations (the others have no use for them)."""
    best = kernels().best_isa()
    extra = {ISAS["avx512vnni"]: int8_activations, ISAS["avx512bf16"]: bf16_activations}
    return [NAMES[i] for i in range(1, best + 1) if extra.get(i, True)]


def _check(x2: torch.Tensor, in_features: int, *tensors: tuple[torch.Tensor, torch.dtype, tuple],
           x_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x2 as contiguous `x_dtype` (rows, in_features); each (tensor, dtype, shape) checked: the kernels
    read raw memory, so a wrong dtype or layout must stop here."""
    x2 = x2.to(x_dtype).contiguous()
    if x2.dim() != 2 or x2.shape[1] != in_features:
        raise ValueError(f"activations {tuple(x2.shape)} do not match the weight's {in_features} inputs")
    _check_tensors(*tensors)
    return x2


def _check_tensors(*tensors: tuple[torch.Tensor, torch.dtype, tuple]) -> None:
    for t, dtype, shape in tensors:
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"kernel input {t.dtype} {tuple(t.shape)} is not contiguous {dtype} {shape} on the CPU")


def int8_mm(x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, isa: str = "auto") -> torch.Tensor:
    """x2 (rows, in) @ (q * scales[:, None])^T in float32, q int8 (out, in), scales float32 (out,)."""
    n, k = q.shape
    x2 = _check(x2, k, (q, torch.int8, (n, k)), (scales, torch.float32, (n,)))
    return _int8_call(kernels().int8_mm, x2, q, scales, ISAS[isa])


def _int8_call(kernel, x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, isa: int) -> torch.Tensor:
    """The extension's int8-weight `kernel` on inputs already in its forms (float32 contiguous x2)."""
    n, k = q.shape
    out = torch.empty(x2.shape[0], n)
    kernel(x2.data_ptr(), x2.shape[0], k, q.data_ptr(), scales.data_ptr(), out.data_ptr(), n, isa)
    return out


def int4_mm(x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
            isa: str = "auto") -> torch.Tensor:
    """x2 (rows, in) @ W^T in float32 for the stored int4 form (llama.runtime.quant_kernels): q uint8
    (out, in / 2), scales and zeros bfloat16 (out, in / group_size)."""
    n, k = q.shape[0], q.shape[1] * 2
    if group_size % 32 or k % group_size:
        raise ValueError(f"int4 group size {group_size} must divide {k} and be a multiple of 32")
    groups = (n, k // group_size)
    x2 = _check(x2, k, (q, torch.uint8, (n, k // 2)), (scales, torch.bfloat16, groups), (zeros, torch.bfloat16, groups))
    rows = x2.shape[0]
    pairs = x2.view(rows, k // 2, 2)
    xe, xo = pairs[..., 0].contiguous(), pairs[..., 1].contiguous()  # a byte holds one even and one odd column
    xs = x2.view(rows, groups[1], group_size).sum(2)
    out = torch.empty(rows, n)
    kernels().int4_mm(xe.data_ptr(), xo.data_ptr(), xs.data_ptr(), rows, k, q.data_ptr(), scales.data_ptr(),
                      zeros.data_ptr(), group_size, out.data_ptr(), n, ISAS[isa])
    return out


def bf16_mm(x2: torch.Tensor, w: torch.Tensor, isa: str = "auto", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x2 (rows, in) @ w^T for bfloat16 w (out, in), without a float32 copy of w: the products summed in
    float32, the result in `out_dtype` (float32 or bfloat16, rounded to nearest even). Bfloat16 x2 is
    read as it is (multiplied by AVX-512 BF16's vdpbf16ps where the CPU has it, else widened exactly),
    any other dtype as float32."""
    n, k = w.shape
    x_dtype = torch.bfloat16 if x2.dtype == torch.bfloat16 else torch.float32
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the bfloat16 product writes float32 or bfloat16, not {out_dtype}")
    x2 = _check(x2, k, (w, torch.bfloat16, (n, k)), x_dtype=x_dtype)
    out = torch.empty(x2.shape[0], n, dtype=out_dtype)
    kernels().bf16_mm(x2.data_ptr(), x2.shape[0], k, w.data_ptr(), out.data_ptr(), n, ISAS[isa],
                      x_dtype == torch.bfloat16, out_dtype == torch.bfloat16)
    return out


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for bfloat16 x (..., in) and a contiguous bfloat16 CPU w (out, in), by bf16_mm
    with bfloat16 results: the bfloat16 model's products, with the fewest checks per call (the
    caller, llama.runtime.compute.NativeLinear, has checked the weight)."""
    k, n = x.shape[-1], w.shape[0]
    if x.dtype != torch.bfloat16 or w.shape[1] != k:
        raise ValueError(f"bfloat16 activations (..., {w.shape[1]}) expected, not {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    kernels().bf16_mm(x.data_ptr(), x.numel() // k, k, w.data_ptr(), out.data_ptr(), n, 0, True, True)
    return out


def quantized_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                     group_size: int, int8_activations: bool) -> torch.Tensor:
    """x (..., in) @ W^T in x's dtype for int8 (`zeros` None: int8_mm / int8a_mm) or the stored int4
    form (int4_mm / int4a_mm), with no check of the weight's tensors: the caller
    (llama.weights.quant_modules.QuantizedLinear, whose decode makes ~100 of these products a
    token) made them in the kernels' forms, which the checked entries verify."""
    return quantized_products(x, [(q, scales, zeros)], group_size, int8_activations)[0]


def quantized_products(x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
                       group_size: int, int8_activations: bool) -> list[torch.Tensor]:
    """quantized_linear of x with each (q, scales, zeros) of `weights` (all int8 or all int4, with
    the same inputs): with int8 activations in one call of the extension, which rounds x once
    and splits all the weights' rows among the threads; bfloat16 or float32 x is read as it is
    and the results written in its dtype (no conversions around the call)."""
    k, lead = x.shape[-1], x.shape[:-1]
    if int8_activations:
        x2 = x.reshape(-1, k)
        x2 = (x2 if x2.dtype in (torch.float32, torch.bfloat16) else x2.float()).contiguous()
        outs = _a8_call(x2, weights, group_size, ISAS["auto"])
    else:
        x2 = x.reshape(-1, k).float().contiguous()
        outs = [_int8_call(kernels().int8_mm, x2, q, s, ISAS["auto"]) if z is None else int4_mm(x2, q, s, z, group_size)
                for q, s, z in weights]
    return [(o if o.dtype == x.dtype else o.to(x.dtype)).view(*lead, o.shape[1]) for o in outs]


def int8a_mm(x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, isa: str = "auto") -> torch.Tensor:
    """int8_mm with each row of x2 rounded to int8 per block of A8_BLOCK columns (scale max|x| / 127
    of the block) and integer dot products: x2's rounded values @ (q * scales[:, None])^T, float32."""
    n, k = q.shape
    x2 = _check(x2, k, (q, torch.int8, (n, k)), (scales, torch.float32, (n,)))
    return _a8_call(x2, [(q, scales, None)], 0, ISAS[isa])[0]


def int4a_mm(x2: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
             isa: str = "auto") -> torch.Tensor:
    """int4_mm with x2 rounded as int8a_mm rounds it and integer dot products."""
    n, k = q.shape[0], q.shape[1] * 2
    if group_size % A8_BLOCK or k % group_size or group_size & (group_size - 1):
        raise ValueError(f"int4 group size {group_size} must divide {k} and be a power of two of at least {A8_BLOCK}")
    groups = (n, k // group_size)
    x2 = _check(x2, k, (q, torch.uint8, (n, k // 2)), (scales, torch.bfloat16, groups), (zeros, torch.bfloat16, groups))
    return _a8_call(x2, [(q, scales, zeros)], group_size, ISAS[isa])[0]


def _a8_call(x2: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
             group_size: int, isa: int) -> list[torch.Tensor]:
    """The extension's int8a_mm (zeros None) or int4a_mm over `weights`, which all multiply x2
    (rows, in), contiguous float32 or bfloat16: the results (rows, out_i) in x2's dtype."""
    rows, k = x2.shape
    bf16 = x2.dtype == torch.bfloat16
    outs = [torch.empty(rows, q.shape[0], dtype=x2.dtype) for q, _, _ in weights]
    qs, scales = [q.data_ptr() for q, _, _ in weights], [s.data_ptr() for _, s, _ in weights]
    ptrs, ns = [o.data_ptr() for o in outs], [o.shape[1] for o in outs]
    if weights[0][2] is None:
        kernels().int8a_mm(x2.data_ptr(), rows, k, qs, scales, ptrs, ns, isa, bf16, bf16)
    else:
        zeros = [z.data_ptr() for _, _, z in weights]
        kernels().int4a_mm(x2.data_ptr(), rows, k, qs, scales, zeros, group_size, ptrs, ns, isa, bf16, bf16)
    return outs


def int4_into(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              isa: str = "auto") -> torch.Tensor:
    """The stored int4 weight (q uint8 (out, in / 2), scales and zeros bfloat16 (out, in / group))
    written into `w` (out, in), float32 or bfloat16, with the roundings of
    llama.weights.quant_blocks.int4_into's PyTorch form (the same values) in one pass."""
    n, k = w.shape
    groups = (n, k // group_size)
    _check_tensors((w, w.dtype if w.dtype in (torch.float32, torch.bfloat16) else torch.float32, (n, k)),
                   (q, torch.uint8, (n, k // 2)), (scales, torch.bfloat16, groups), (zeros, torch.bfloat16, groups))
    kernels().int4_into(q.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n, k, group_size, w.data_ptr(),
                        w.dtype == torch.bfloat16, ISAS[isa])
    return w
