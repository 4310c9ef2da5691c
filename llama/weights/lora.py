# Low-rank adapters (LoRA, Hu et al. 2021): y = W x + scale * B (A dropout(x)), with A (rank, in),
# B (out, rank) and scale alpha / rank (alpha / sqrt(rank) with rsLoRA, Kalajdzievski 2023).
#
# An adapter is a `lora` submodule attached to an existing projection plus a forward hook that adds
# its output, so the projection keeps its own class (fairscale's parallel layers, a quantized
# module) and its checkpoint key (`layers.0.attention.wq.weight`); the adapter's keys sit beside it
# (`layers.0.attention.wq.lora.A`). On several model-parallel ranks the adapter is split the way
# its projection is (llama.weights.sharding): a column-parallel projection's B holds this rank's
# output rows, a row-parallel one's A this rank's input columns (its partial products are summed
# over the ranks, as the projection's are).
#
# An adapter directory holds adapter.pth (full, unsharded A and B of every target) and
# adapter.json (rank, alpha, rslora, targets and the shape of the base it was trained on).
import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.mappings as fs_mappings
import torch
import torch.nn.functional as F
from torch import nn

from llama.args import ModelArgs
from llama.atomic import atomic_output_dir
from llama.weights import sharding
from llama.weights.checkpoint import PathLike

BLOCK_TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                 "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
TARGETS = (*BLOCK_TARGETS, "output")
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")
CONFIG_FILE, WEIGHTS_FILE = "adapter.json", "adapter.pth"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim")


@dataclass
class LoRAConfig:
    """What an adapter is: its rank, alpha, rsLoRA scaling, dropout (training only) and targets."""

    rank: int
    alpha: float
    targets: tuple = DEFAULT_TARGETS
    dropout: float = 0.0
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def parse_targets(targets: Sequence[str]) -> tuple:
    """The projections named (wq..w3, output), checked; duplicates dropped, order kept."""
    out = tuple(dict.fromkeys(str(t).strip() for t in targets if str(t).strip()))
    unknown = [t for t in out if t not in TARGETS]
    if unknown or not out:
        raise ValueError(f"unknown LoRA target(s) {', '.join(unknown) or '(none given)'}: choose among {', '.join(TARGETS)}")
    return out


class LoRA(nn.Module):
    """The low-rank update of one projection: scale * B (A dropout(x)). B starts at zero (PEFT's
    and the paper's initialisation), so a new adapter leaves the model as it was. `kind` is the
    projection's tensor-parallel split: "column", "row" or "gather" (a column-parallel output
    gathered, as the model's `output` is)."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, kind: str = "column"):
        super().__init__()
        self.A = nn.Parameter(torch.empty(config.rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, config.rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default, as PEFT's A
        self.scale, self.kind, self.enabled = config.scale, kind, True
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.A.dtype)
        if self.kind == "row":  # this rank's input columns: partial sums, added over the ranks
            return fs_mappings.reduce_from_model_parallel_region(F.linear(F.linear(x, self.A), self.B) * self.scale)
        x = fs_mappings.copy_to_model_parallel_region(x)  # the input's gradient summed over the ranks
        y = F.linear(F.linear(x, self.A), self.B) * self.scale
        return fs_mappings.gather_from_model_parallel_region(y) if self.kind == "gather" else y


def _add_lora(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    lora = module.lora
    return out + lora(args[0]).to(out.dtype) if lora.enabled else out


def projections(model: nn.Module, targets: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """(checkpoint key prefix, module) of each targeted projection of a Transformer."""
    for i, layer in enumerate(model.layers):
        for t in targets:
            if t in BLOCK_TARGETS:
                yield f"layers.{i}.{BLOCK_TARGETS[t]}.{t}", getattr(getattr(layer, BLOCK_TARGETS[t]), t)
    if "output" in targets:
        yield "output", model.output


def _kind(name: str) -> str:
    if name == "output":
        return "gather"
    return "row" if sharding.module_of(name + ".weight") in sharding.ROW_PARALLEL else "column"


def attach(model: nn.Module, config: LoRAConfig) -> dict[str, LoRA]:
    """Give each target projection of `model` a new adapter (on the projection's device, float32):
    {key prefix: LoRA}. A rank above the projection's smaller side is refused."""
    out = {}
    mp = fs_init.get_model_parallel_world_size()
    for name, proj in projections(model, config.targets):
        out_f, in_f = _features(proj)  # this rank's slice
        kind = _kind(name)
        full = (out_f * (mp if kind != "row" else 1), in_f * (mp if kind == "row" else 1))
        if config.rank > min(full):
            raise ValueError(
                f"LoRA rank {config.rank} exceeds {name}'s smaller side ({min(full)}): pass a smaller --lora_rank"
            )
        out[name] = add_adapter(proj, config, kind)
    return out


def add_adapter(proj: nn.Module, config: LoRAConfig, kind: str = "column") -> LoRA:
    """Attach a new adapter to one projection (a module with a (out, in) `weight`): its output
    becomes proj(x) + lora(x)."""
    out_f, in_f = _features(proj)
    lora = LoRA(in_f, out_f, config, kind).to(proj.weight.device)
    proj.lora = lora
    proj.register_forward_hook(_add_lora)
    return lora


def _float_dtype(proj: nn.Module) -> torch.dtype:
    """The floating dtype of a projection's arithmetic: its weight's, or a quantized one's activations'."""
    return proj.weight.dtype if proj.weight.dtype in FLOAT_DTYPES else proj.act_dtype


def _features(proj: nn.Module) -> tuple[int, int]:
    """(out, in) of a projection's weight (this rank's slice); a quantized one's stored form packs its columns."""
    if proj.weight.dtype in FLOAT_DTYPES:
        return tuple(proj.weight.shape)
    return proj.out_features, proj.in_features


def adapters(model: nn.Module) -> dict[str, LoRA]:
    """{key prefix: LoRA} of the adapters attached to `model`."""
    return {name[: -len(".lora")]: m for name, m in model.named_modules() if isinstance(m, LoRA)}


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """The model without its adapters (DPO's frozen reference)."""
    found = list(adapters(model).values())
    for lora in found:
        lora.enabled = False
    try:
        yield
    finally:
        for lora in found:
            lora.enabled = True


def merge(state: dict, scale: float) -> dict:
    """A state dict holding adapters (full or one rank's) with each folded into its projection's
    weight (W + scale B A, added in float32, stored in the weight's dtype) and the adapter keys left out."""
    out = {k: v for k, v in state.items() if ".lora." not in k}
    for name in {k.rsplit(".lora.", 1)[0] for k in state if ".lora." in k}:
        w = out[name + ".weight"]
        delta = (state[name + ".lora.B"].float() @ state[name + ".lora.A"].float()) * scale
        out[name + ".weight"] = (w.float() + delta.to(w.device)).to(w.dtype)
    return out


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict:
    """The model's state dict with its adapters merged (`merge`)."""
    found = list(adapters(model).values())
    return merge(model.state_dict(), found[0].scale if found else 1.0)


def base_shape(args: ModelArgs) -> dict:
    """The shape of the base model an adapter fits (SHAPE_KEYS)."""
    return {k: getattr(args, k) for k in SHAPE_KEYS}


def save_adapter(state: dict, config: LoRAConfig, args: ModelArgs, out_dir: PathLike, overwrite: bool = True) -> None:
    """Write an adapter directory (full A and B tensors `state`, float32) through the atomic writer."""
    meta = {**asdict(config), "targets": list(config.targets), "base": base_shape(args)}
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        torch.save({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, tmp / WEIGHTS_FILE)


def read_adapter_files(adapter_dir: PathLike) -> tuple[dict, LoRAConfig, dict]:
    """(adapter.json as written, config, full state) of an adapter directory, unchecked."""
    path = Path(adapter_dir)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an adapter directory ({CONFIG_FILE} and {WEIGHTS_FILE}): pass the adapter/ a fine-tune wrote")
    meta = json.loads((path / CONFIG_FILE).read_text())
    config = LoRAConfig(int(meta["rank"]), float(meta["alpha"]), parse_targets(meta["targets"]), 0.0, bool(meta.get("rslora", False)))
    return meta, config, torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)


def read_adapter(adapter_dir: PathLike, args: ModelArgs) -> tuple[LoRAConfig, dict]:
    """(config, full state) of an adapter directory, checked against the base's shape `args`."""
    meta, config, state = read_adapter_files(adapter_dir)
    want, have = base_shape(args), meta.get("base", {})
    if have != want:
        diff = ", ".join(f"{k} {have.get(k)} (model: {want[k]})" for k in want if have.get(k) != want[k])
        raise ValueError(f"the adapter {adapter_dir} was made for another model shape ({diff}): pass the checkpoint it was trained on")
    return config, state


def apply_adapter(model: nn.Module, adapter_dir: PathLike, mp_rank: int = 0, mp_size: int = 1) -> LoRAConfig:
    """Attach the adapter of `adapter_dir` to a loaded model, unmerged, this rank's slice of it, in
    the dtype of the model's weights (over quantized projections: of their activations); frozen and
    in eval mode."""
    args = model.params
    config, state = read_adapter(adapter_dir, args)
    dtype = next(_float_dtype(p) for _, p in projections(model, config.targets))
    for name, lora in attach(model, config).items():
        a, b = state[name + ".lora.A"], state[name + ".lora.B"]
        if lora.kind == "row":
            a = sharding.shard_tensor(name + ".weight", a, args, mp_rank, mp_size)
        else:
            b = sharding.shard_tensor(name + ".weight", b, args, mp_rank, mp_size)
        lora.A.data, lora.B.data = a.to(lora.A.device, dtype), b.to(lora.B.device, dtype)
        lora.requires_grad_(False)
    return config
