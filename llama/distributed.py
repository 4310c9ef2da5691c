# Process groups: devices per rank, setup, ranks, broadcast. (Dtypes and kernels: llama/runtime/.)
import atexit
import contextlib
import logging
import os
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

logger = logging.getLogger(__name__)


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """`None`: this process's CUDA device when CUDA is available (LOCAL_RANK under torchrun), else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available: use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: torch.device, model_parallel_size: Optional[int] = None) -> int:
    """Join (or create) the process group and fairscale's model-parallel groups; return the
    model-parallel size.

    Under torchrun (or any launcher that sets RANK and WORLD_SIZE) the default env:// rendezvous is
    used. A plain `python` call gets a process group of one held in memory: no port, so any number
    of such runs can share a machine.
    """
    if not dist.is_initialized():
        backend = backend_for(device)
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(shutdown)
    world_size = dist.get_world_size()
    if model_parallel_size is None:
        model_parallel_size = world_size
    if not fs_init.model_parallel_is_initialized():
        if world_size % model_parallel_size:
            raise ValueError(
                f"model_parallel_size {model_parallel_size} does not divide the {world_size} processes"
            )
        _quietly(fs_init.initialize_model_parallel, model_parallel_size)
    elif fs_init.get_model_parallel_world_size() != model_parallel_size:
        raise ValueError(
            f"model parallel is already set up with size {fs_init.get_model_parallel_world_size()}, "
            f"not {model_parallel_size}"
        )
    return model_parallel_size


def _quietly(fn, *args):
    # fairscale prints its group layout from every rank; keep stdout for rank 0's results
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def model_parallel_rank() -> int:
    return fs_init.get_model_parallel_rank()


def model_parallel_size() -> int:
    return fs_init.get_model_parallel_world_size()


def rank_from_env() -> int:
    """This process's global rank as the launcher set it (0 without a launcher), before any setup."""
    return int(os.environ.get("RANK", 0))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def broadcast_object(obj=None, src: int = 0, group: Optional[dist.ProcessGroup] = None):
    """Send a picklable object from rank `src` to every rank of `group` (default: all; identity
    with one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


_SOLO_GROUP: Optional[dist.ProcessGroup] = None  # this process alone, for `replicated`


def setup_replicated() -> None:
    """Create the one-process groups `replicated` needs. Collective: every rank calls it, at the
    same point (each rank takes part in creating every group); then `replicated` needs no one."""
    global _SOLO_GROUP
    if _SOLO_GROUP is None and model_parallel_size() > 1:
        groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
        _SOLO_GROUP = groups[dist.get_rank()]


@contextlib.contextmanager
def replicated() -> Iterator[None]:
    """fairscale's model-parallel group is this process alone inside: parallel layers built inside
    hold whole weights (a model replicated on every rank), and their forward passes talk to no
    one. Identity on one model-parallel rank; call `setup_replicated` first on more."""
    if model_parallel_size() == 1:
        yield
        return
    if _SOLO_GROUP is None:
        raise RuntimeError("llama.distributed.setup_replicated() was not called on every rank first")
    saved = fs_init._MODEL_PARALLEL_GROUP  # the layers read it on every call, not once
    fs_init._MODEL_PARALLEL_GROUP = _SOLO_GROUP
    try:
        yield
    finally:
        fs_init._MODEL_PARALLEL_GROUP = saved


# ---------------------------------------------------------------------------------------------
# fairscale's two collectives of a forward pass as ops a compiled graph can hold. Dynamo cannot
# trace fairscale's own under torchrun (its process group has no __eq__ to guard on), so compiled
# passes on more than one process fell back to eager. Inference only: these have no backward.


@torch.library.custom_op("llama::model_parallel_all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    dist.all_reduce(out, group=fs_init.get_model_parallel_group())
    return out


@_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("llama::model_parallel_all_gather", mutates_args=())
def _all_gather(x: torch.Tensor) -> torch.Tensor:
    group = fs_init.get_model_parallel_group()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


@_all_gather.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] * model_parallel_size())


def reduce_from_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """fairscale's: the sum over the model-parallel ranks (x itself on one)."""
    return x if model_parallel_size() == 1 else _all_reduce(x)


def gather_from_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """fairscale's: the ranks' x joined along the last dimension (x itself on one)."""
    return x if model_parallel_size() == 1 else _all_gather(x)


def traceable_collectives() -> None:
    """Point fairscale's parallel layers at the collectives above (the same sums and joins), for
    torch.compile; the layers look the names up at every call, eager ones too."""
    from fairscale.nn.model_parallel import layers

    layers.reduce_from_model_parallel_region = reduce_from_model_parallel_region
    layers.gather_from_model_parallel_region = gather_from_model_parallel_region


def shutdown() -> None:
    """Tear the process groups down (gloo aborts at interpreter exit otherwise). Safe to call twice."""
    global _SOLO_GROUP
    _SOLO_GROUP = None
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
