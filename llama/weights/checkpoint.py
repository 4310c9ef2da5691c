# Reading a Meta-format checkpoint directory (params.json + consolidated.NN.pth): its params, its
# shards (memory-mapped, weights_only, one-line errors for damaged or unsafe files), and a cheap
# pass over every shard's header that checks keys and shapes against params.json (Layout).
#
# A checkpoint of N shards loads on M model-parallel processes whenever one count divides the other
# (llama.weights.rank_state assembles each rank's slice); the model knows nothing of this.
import json
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from llama import validation
from llama.args import ModelArgs
from llama.weights import sharding
from llama.weights.quant_formats import QuantConfig

PathLike = Union[str, Path]
IGNORED_KEYS = ("rope.freqs",)  # older checkpoints carry the RoPE table; it is recomputed
TIED_KEY = "output.weight"  # may be absent (converted 3.2 checkpoints): the output then shares the embedding


def read_params(ckpt_dir: PathLike) -> dict:
    """params.json of a checkpoint directory, with clear errors for a missing dir or file."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist: give the directory holding params.json and consolidated.NN.pth")
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a Meta checkpoint directory holds params.json")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    validation.check_params(params, str(path), required=True)
    return params


def shard_paths(ckpt_dir: PathLike) -> list[Path]:
    """The consolidated.NN.pth shards, sorted: shard k belongs to model-parallel rank k.

    Raises ValueError when the numbering has gaps (a shard is missing) or other .pth files lie
    beside Meta's shards (two checkpoints mixed in one directory)."""
    paths = sorted(Path(ckpt_dir).glob("*.pth"))
    if not paths:
        raise FileNotFoundError(f"no checkpoint files (*.pth) in {ckpt_dir}")
    numbered = {int(m.group(1)): p for p in paths if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", p.name))}
    if numbered:
        others = [p.name for p in paths if p not in numbered.values()]
        if others:
            raise ValueError(f"{ckpt_dir} holds {others[:3]} beside its consolidated.NN.pth shards: remove them or use another directory")
        gaps = sorted(set(range(max(numbered) + 1)) - set(numbered))
        if gaps:
            missing = [f"consolidated.{k:02d}.pth" for k in gaps]
            raise ValueError(
                f"{ckpt_dir} has shards up to consolidated.{max(numbered):02d}.pth but {missing[:4]} "
                f"{'is' if len(missing) == 1 else 'are'} missing: download or copy the checkpoint again"
            )
        paths = [numbered[k] for k in sorted(numbered)]
    return paths


def expected_keys(n_layers: int, quant: Optional[QuantConfig] = None) -> set[str]:
    """Every state-dict key of an `n_layers`-layer Llama 3 checkpoint (output.weight included),
    quantized as `quant` says (each quantized weight with its scales, and zeros for int4)."""
    keys = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(n_layers):
        keys |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        keys |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        keys |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    if quant is not None:
        keys = {k for key in keys for k in (quant.keys(key) if quant.applies(key) else [key])}
    return keys


def check_keys(
    state_dict: dict, n_layers: int, source: str, allow_tied: bool = False, quant: Optional[QuantConfig] = None
) -> None:
    """Strict key check: only IGNORED_KEYS may be extra, and with `allow_tied` output.weight may be
    missing. Names the missing and unexpected keys."""
    want = expected_keys(n_layers, quant)
    have = set(state_dict) - set(IGNORED_KEYS)
    if allow_tied and TIED_KEY not in have:
        want -= set(quant.keys(TIED_KEY) if quant is not None and quant.applies(TIED_KEY) else [TIED_KEY])
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match a {n_layers}-layer Llama 3 model: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def load_shard(path: PathLike) -> dict:
    """One .pth shard, memory-mapped and with weights_only (no code runs on load).

    Raises ValueError naming the file when it is empty, truncated or not a PyTorch zip checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: the download or copy did not finish; fetch it again")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # what weights_only refused to construct
        if found is None:
            _damaged(path, e)
        name = found.group(1)
        if _names_real_object(name):  # intact, but holds something that is not a tensor
            raise ValueError(
                f"{path} holds Python objects other than tensors ({name}: code could run on loading it) and was "
                "refused for safety: use a checkpoint from a source you trust, saved as a plain state dict"
            ) from None
        raise ValueError(  # a name that exists nowhere: more likely damage than a payload
            f"{path} is corrupt or holds Python objects other than tensors (it names {name}) and was refused for "
            "safety: download or copy it again from a source you trust"
        ) from None
    except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged files
        _damaged(path, e)


def _names_real_object(dotted: str) -> bool:
    """Whether `module.attr` names an object of an already imported module (nothing is imported)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest imported module prefix
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is None:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj is not None
    return False


def _damaged(path: Path, e: Exception) -> None:
    """Raise the ValueError for a shard that could not be read, naming what it looks like."""
    reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    what = "is truncated or corrupt" if is_zip else "is not a PyTorch zip checkpoint (corrupt, or legacy format)"
    raise ValueError(f"{path} {what} ({reason}): download or copy it again") from None


# ---------------------------------------------------------------------------------------------
# A cheap pass over every shard's header


@dataclass
class Layout:
    """What a checkpoint's shards hold, checked against params.json: keys, shapes, dtypes."""

    paths: list[Path]
    shapes: dict[str, torch.Size]  # of one shard (all shards have the same)
    dtypes: dict[str, torch.dtype]
    tied: bool  # output.weight absent: the output layer shares the embedding
    quant: Optional[QuantConfig] = None  # params.json's quantization block: how the shards are stored

    @property
    def n_shards(self) -> int:
        return len(self.paths)

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)


def inspect_dir(ckpt_dir: PathLike) -> Layout:
    """inspect_checkpoint against the directory's own params.json: does it read as a whole checkpoint?"""
    return inspect_checkpoint(ckpt_dir, ModelArgs(**read_params(ckpt_dir)))


def inspect_checkpoint(ckpt_dir: PathLike, args: ModelArgs) -> Layout:
    """Read the shards' headers (no weights: they are memory-mapped and not touched) and check that
    their keys agree with a Llama 3 model, that all shards have the same shapes, and that those are
    the shapes params.json implies. Raises ValueError naming the first problem."""
    paths = shard_paths(ckpt_dir)
    n = len(paths)
    quant = QuantConfig.from_params(read_params(ckpt_dir))
    try:
        args.validate(n)
    except ValueError as e:
        raise ValueError(f"{ckpt_dir} has {n} shard(s), which does not fit its params.json: {e}") from None
    first: Optional[dict] = None
    for path in paths:
        shard = load_shard(path)
        check_keys(shard, args.n_layers, str(path), allow_tied=True, quant=quant)
        meta = {k: (v.shape, v.dtype) for k, v in shard.items() if k not in IGNORED_KEYS}
        del shard  # unmaps the file
        if first is None:
            first, first_path = meta, path
            continue
        for key, (shape, _) in meta.items():
            if key not in first:
                raise ValueError(f"{key} is in {path.name} but not in {first_path.name}: the shards do not match")
            if shape != first[key][0]:
                raise ValueError(
                    f"{key} has shape {tuple(shape)} in {path.name} but {tuple(first[key][0])} in "
                    f"{first_path.name}: the shards of {ckpt_dir} do not belong to one checkpoint"
                )
        if TIED_KEY in first and TIED_KEY not in meta:
            raise ValueError(f"{TIED_KEY} is in {first_path.name} but not in {path.name}: the shards do not match")
    for key in first:  # the shard's own order (Meta's: embedding, layers, norm, output)
        want = sharding.piece_shape(key, args, 0, n, quant)
        if first[key][0] != want:
            raise ValueError(
                f"params.json does not match the weights: {key} is {tuple(first[key][0])} in {first_path.name} "
                f"but params.json implies {tuple(want)} for {n} shard(s); use the params.json of this checkpoint"
            )
    return Layout(
        paths,
        {k: first[k][0] for k in first},
        {k: first[k][1] for k in first},
        tied=TIED_KEY not in first,
        quant=quant,
    )
