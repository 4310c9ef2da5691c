# Loading a model, straight down: params.json -> ModelArgs -> the kernel policy -> an empty model
# (meta device, no master weights) -> this rank's state, read memory-mapped into tensors on the
# device -> quantized modules built from their stored tensors and swapped in -> the rest assigned. `load` is the whole pipeline Llama.build runs (the
# draft of speculative decoding included); `load_model` the checkpoint-to-model part of it.
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch

from llama import distributed, memory, registry
from llama.args import ModelArgs
from llama.model import Transformer
from llama.runtime import policy as policies
from llama.runtime import probes, quant_choice
from llama.tokenizer import Tokenizer
from llama.weights import lora, sharding
from llama.weights.checklist import verify_checklist
from llama.weights.checkpoint import TIED_KEY, PathLike, inspect_checkpoint, read_params, shard_paths
from llama.weights.quant_formats import QuantConfig, model_parallel_max, resolve
from llama.weights.quant_modules import check_device, install
from llama.weights.rank_state import check_quantization, load_rank_state

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What `load` gives Llama.build: the model, its tokenizer, the kernel policy it runs under,
    and the draft model with its policy (the measured one: a draft is never quantized) and the
    context its passes run in (None without one)."""

    model: Transformer
    tokenizer: Tokenizer
    policy: policies.Policy
    device: torch.device
    draft: Optional[Transformer] = None
    draft_policy: Optional[policies.Policy] = None
    draft_context: Callable[[], ContextManager] = contextlib.nullcontext


def load(
    ckpt_dir: PathLike,
    tokenizer_path: PathLike,
    max_seq_len: int,
    max_batch_size: int,
    model_parallel_size: Optional[int] = None,
    seed: int = 1,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    rope_scale_factor: Optional[float] = None,
    verify: bool = False,
    quantize: Optional[str] = None,
    group_size: int = 32,
    quantize_output: bool = True,
    draft_ckpt_dir: Optional[PathLike] = None,
    draft_sharded: bool = False,
    adapter: Optional[PathLike] = None,
) -> Loaded:
    """Set up the device and the model-parallel group and load the checkpoint, its tokenizer and
    (with `draft_ckpt_dir`) a draft model, and an `adapter` (LoRA, unmerged); the arguments are Llama.build's (`draft_sharded`: its
    draft_parallel is "sharded"). Raises ValueError / FileNotFoundError with one line saying what
    is wrong."""
    device = distributed.resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # a bad name fails before any process group is set up; quantized products then run in it too
    forced_dtype = None if dtype is None else policies.parse_dtype(dtype)
    mp_size = distributed.setup(device, model_parallel_size)
    torch.manual_seed(seed)

    if verify:
        verify_checklist(ckpt_dir)
    params = read_params(ckpt_dir)
    tokenizer = Tokenizer(model_path=str(tokenizer_path))
    args = model_args(params, max_seq_len, max_batch_size, rope_scale_factor)
    if tokenizer.n_words != args.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but {ckpt_dir}/params.json says "
            f"vocab_size {args.vocab_size}: pass the tokenizer.model that belongs to this checkpoint"
        )
    quant = resolve(quantize, group_size, quantize_output)
    # the same on every rank (rank 0's), timed from memory or cache as this rank's weights will be read
    policy = probes.policy_for(
        device, forced_dtype, weight_bytes=torch.bfloat16.itemsize * args.decode_weights // mp_size,
        shape=(args.ffn_hidden_dim // mp_size, args.dim),
    )
    draft, draft_context = None, contextlib.nullcontext
    if draft_ckpt_dir is not None:  # in the measured policy: the draft is never quantized
        draft, draft_context = load_draft(draft_ckpt_dir, args, tokenizer_path, device, policy.weights, forced_dtype, draft_sharded)
    model = load_model(
        ckpt_dir, args, distributed.model_parallel_rank(), mp_size, device, policy.weights, quant, compute_dtype=forced_dtype
    )
    if adapter is not None:
        lora.apply_adapter(model, adapter, distributed.model_parallel_rank(), mp_size)
    # quantized products pick their own kernel and compute dtype (llama.runtime.quant_choice)
    reason = f"{quant.name} weights: quant_choice.quantized_kernel picks theirs" if quant is not None else ""
    model_policy = policy if quant is None else policies.uniform(policy.weights, reason=reason)
    return Loaded(model, tokenizer, model_policy, device, draft, policy if draft is not None else None, draft_context)


def load_draft(
    draft_dir: PathLike,
    target: ModelArgs,
    tokenizer_path: PathLike,
    device: torch.device,
    dtype: torch.dtype,
    compute_dtype: Optional[torch.dtype],
    sharded: bool = False,
) -> tuple[Transformer, Callable[[], ContextManager]]:
    """The draft model of speculative decoding, checked against the model (`target`), and the
    context its passes run in: loaded whole on every rank (fairscale's layers on a group of one,
    llama.distributed.replicated; its steps need no communication), or, `sharded`, split over the
    model-parallel ranks like the model."""
    params = read_params(draft_dir)
    if params.get("vocab_size") != target.vocab_size:
        raise ValueError(
            f"the draft {draft_dir} has vocab_size {params.get('vocab_size')} but the model has {target.vocab_size}: "
            "pass a draft trained with the model's tokenizer (--draft_ckpt_dir)"
        )
    own = Path(draft_dir) / "tokenizer.model"
    if own.is_file() and own.read_bytes() != Path(tokenizer_path).read_bytes():
        raise ValueError(
            f"the draft's tokenizer {own} differs from the model's {tokenizer_path}: "
            "pass a draft trained with the model's tokenizer (--draft_ckpt_dir)"
        )
    args = model_args(params, target.max_seq_len, target.max_batch_size)
    mp_size = distributed.model_parallel_size()
    if sharded or mp_size == 1:
        rank = distributed.model_parallel_rank()
        return load_model(draft_dir, args, rank, mp_size, device, dtype, compute_dtype=compute_dtype), contextlib.nullcontext
    distributed.setup_replicated()
    with distributed.replicated():
        draft = load_model(draft_dir, args, 0, 1, device, dtype, compute_dtype=compute_dtype)
    return draft, distributed.replicated


def model_args(params: dict, max_seq_len: int, max_batch_size: int, rope_scale_factor: Optional[float] = None) -> ModelArgs:
    """The shape of params.json with this run's sequence and batch limits, and its RoPE scaling."""
    args = ModelArgs(**{**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
    if args.use_scaled_rope:
        args.rope_scale_factor = _rope_scale_factor(params, rope_scale_factor)
    return args


def _rope_scale_factor(params: dict, override: Optional[float]) -> float:
    if override is not None:
        factor, why = float(override), "as asked"
    elif "rope_scale_factor" in params:
        factor, why = float(params["rope_scale_factor"]), "from params.json"
    else:
        factor, why = registry.default_rope_scale_factor(params), "the published default for this shape"
    if distributed.is_rank0():
        logger.info("RoPE scaling factor %g (%s)", factor, why)
    return factor


# ---------------------------------------------------------------------------------------------
# From a checkpoint to a model


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Construct modules without materialising weights: every one is loaded afterwards.

    fairscale's parallel layers build a full-size master weight on every rank and copy a slice out
    of it (_initialize_affine_weight) when the model-parallel size is above 1: a no-op here. They
    allocate with torch.Tensor(sizes), which ignores the default device, but leave it untouched
    (no resident memory); everything else goes to the meta device.
    """
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        with torch.device("meta"):
            yield
    finally:
        fs_layers._initialize_affine_weight = original


def load_model(
    ckpt_dir: PathLike,
    args: ModelArgs,
    mp_rank: int,
    mp_size: int,
    device: torch.device,
    dtype: torch.dtype,
    quant: Optional[QuantConfig] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Transformer:
    """Build the Transformer for model-parallel rank `mp_rank` of `mp_size` and fill it from the
    checkpoint, whatever its shard count N, provided N and mp_size divide one another.

    Weights are read memory-mapped and converted to `device`/`dtype` tensor by tensor; a checkpoint
    without output.weight gets an output layer tied to the embedding. Logs progress and the load time
    on rank 0. Raises ValueError / FileNotFoundError with one line saying what is wrong.

    `quant` quantizes the projections on load (llama.weights.quant_formats; activations stay in
    `dtype`); a checkpoint written quantized (scripts/quantize.py) loads quantized as stored, and
    `quant`, when given, must match it. `compute_dtype`: the dtype quantized products run in (None:
    the measured choice per step, llama.runtime.quant_choice.quantized_kernel).
    """
    start = time.perf_counter()
    n_shards = len(shard_paths(ckpt_dir))
    sharding.check_process_count(args, n_shards, mp_size, str(ckpt_dir))
    _check_model_parallel_group(mp_size)
    layout = inspect_checkpoint(ckpt_dir, args)
    check_quantization(layout.quant, quant, ckpt_dir)
    active = quant or layout.quant  # the same stored form; quant says how to run it (w8a8)
    if active is not None:
        check_device(active.name, device)
        if device.type == "cpu" and active.name in quant_choice.QUANT_MODES:
            # measured now, while no weight is resident: the probes' buffers would add to the load's peak
            quant_choice.quantized_kernel(active.name, "decode", compute_dtype)
            memory.release_freed_memory()
    with skeleton():
        model = Transformer(args)
    reduce_max = model_parallel_max() if quant is not None and layout.quant is None else None
    state = load_rank_state(ckpt_dir, args, mp_rank, mp_size, device, dtype, layout, quant, reduce_max)
    tied_output = layout.tied and not (active is not None and active.applies(TIED_KEY))
    if layout.tied and not tied_output:  # the embedding's quantized tensors serve the output too
        for key in active.keys(TIED_KEY):
            state[key] = state[key.replace("output.", "tok_embeddings.", 1)]
    if tied_output:
        state[TIED_KEY] = state["tok_embeddings.weight"]
    if active is not None:
        state = install(model, state, active, dtype, compute_dtype, consume=True)  # the state is this load's own
    model.load_state_dict(state, strict=True, assign=True)
    if tied_output:
        model.output.weight = model.tok_embeddings.weight  # one tensor, as in a tied model
    if distributed.is_rank0():
        logger.info(
            "loaded %s (%d shard(s)) on %d process(es)%s%s in %.2fs",
            ckpt_dir, n_shards, mp_size, ", output tied to the embedding" if tied_output else "",
            f", quantized ({active.describe()})" if active is not None else "",
            time.perf_counter() - start,
        )
    return model.eval()


def _check_model_parallel_group(mp_size: int) -> None:
    # the parallel layers take their shapes from fairscale's groups, not from our arguments
    have = fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else None
    if have != mp_size:
        raise ValueError(
            f"load_model was asked for {mp_size} model-parallel rank(s) but fairscale's model-parallel "
            f"size is {have}: call llama.distributed.setup(device, {mp_size}) first"
        )
