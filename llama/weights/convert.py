#!/usr/bin/env python
"""Convert Llama 3 checkpoints between Meta's format and Hugging Face's (safetensors).

  python scripts/convert.py to_hf CKPT_DIR OUT_DIR [--max_shard_size 5GB] [--dtype bfloat16] [--overwrite]
  python scripts/convert.py from_hf HF_DIR OUT_DIR [--shards N] [--dtype bfloat16] [--overwrite]

OUT_DIR appears whole or not at all (llama/atomic.py): the files are written beside it, read back,
then renamed into place. An OUT_DIR that holds files is refused unless --overwrite, which replaces
it whole; an OUT_DIR inside CKPT_DIR/HF_DIR is refused.

Both directions stream: one tensor (merged from its Meta shards) or one output file at a time, so
memory stays near one output file (to_hf) or one output shard (from_hf), never the whole model
twice. safetensors is the optional `convert` extra: pip install 'llama3-ref[convert]'.
"""
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Union

import torch

from llama import atomic
from llama.args import ModelArgs
from llama.runtime.policy import parse_dtype
from llama.weights import checkpoint, hf, sharding

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _safetensors():
    try:
        import safetensors.torch
        from safetensors import safe_open
    except ImportError:
        raise hf.ConversionError(
            "safetensors is not installed: pip install safetensors (or the 'convert' extra)"
        ) from None
    return safetensors.torch, safe_open


def parse_size(size: Union[int, str]) -> int:
    """Bytes in `size`: an int, or a string such as '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * SIZE_UNITS[unit])
    try:
        return int(text)
    except ValueError:
        raise hf.ConversionError(f"cannot read size {size!r}: use e.g. 5GB, 500MB or a byte count") from None


def _human(n_bytes: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{n_bytes} B"


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    try:
        return parse_dtype(name)
    except ValueError as e:
        raise hf.ConversionError(str(e)) from None


def _n_base_tokens(tokenizer: Path) -> Optional[int]:
    """Number of BPE ranks in a tiktoken file (special tokens follow them), or None without one."""
    if not tokenizer.is_file():
        return None
    with open(tokenizer, "rb") as f:
        return sum(1 for line in f if line.strip())


def _copy_tokenizer(candidates: list[Path], out_dir: Path) -> None:
    for path in candidates:
        if path.is_file():
            shutil.copyfile(path, out_dir / "tokenizer.model")
            print(f"copied {path}")
            return
    print("no tokenizer.model to copy")


def _write_hf_tokenizer(tokenizer: Path, out_dir: Path) -> None:
    """tokenizer.json and its config for AutoTokenizer, when transformers is installed."""
    if not tokenizer.is_file():
        return
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("tokenizer.json not written: it needs transformers (pip install transformers)")
        return
    written = hf.write_hf_tokenizer(str(tokenizer), str(out_dir))
    print(f"wrote {', '.join(Path(p).name for p in written)}")


class MetaShards:
    """The shards of a Meta checkpoint, memory-mapped; merges one key at a time."""

    def __init__(self, ckpt_dir: Path):
        self.params = checkpoint.read_params(ckpt_dir)
        if "quantization" in self.params:
            raise hf.ConversionError(
                f"{ckpt_dir} is quantized ({self.params['quantization'].get('mode')}): Hugging Face conversion "
                "needs full-precision weights; convert the checkpoint it was quantized from"
            )
        self.paths = checkpoint.shard_paths(ckpt_dir)
        self.args = ModelArgs(**self.params)
        self.args.validate(len(self.paths))
        self.shards = [checkpoint.load_shard(p) for p in self.paths]
        for path, shard in zip(self.paths, self.shards):  # output.weight may be left out (tied), as the loader allows
            checkpoint.check_keys(shard, self.args.n_layers, str(path), allow_tied=True)
        self.keys = [k for k in self.shards[0] if k not in hf.META_IGNORED]

    def _pieces(self, key: str) -> list[torch.Tensor]:
        return [s[key] for s in self.shards]

    def shape(self, key: str) -> torch.Size:
        return sharding.merged_shape(key, self._pieces(key), self.args)

    def merged(self, key: str) -> torch.Tensor:
        return sharding.merge_pieces(key, self._pieces(key), self.args)

    def tied(self) -> bool:
        """Whether the output layer is the embedding: output.weight absent, or equal to it."""
        if checkpoint.TIED_KEY not in self.shards[0]:
            return True
        # both are split on dim 0 the same way, so shard-wise equality is full equality
        return all(torch.equal(s["tok_embeddings.weight"], s[checkpoint.TIED_KEY]) for s in self.shards)


def _plan_files(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy grouping of keys (in order) into files of at most max_bytes (a bigger tensor gets its own)."""
    files, current, used = [], [], 0
    for key, size in sizes.items():
        if current and used + size > max_bytes:
            files.append(current)
            current, used = [], 0
        current.append(key)
        used += size
    if current:
        files.append(current)
    return files


def to_hf(
    ckpt_dir: str,
    out_dir: str,
    max_shard_size: Union[int, str] = "5GB",
    dtype: Optional[str] = None,
    tie_word_embeddings: Optional[bool] = None,
    rope_scale_factor: Optional[float] = None,
    overwrite: bool = False,
) -> None:
    """Meta checkpoint (params.json + consolidated.NN.pth, any shard count) -> Hugging Face directory.

    Writes config.json, generation_config.json, safetensors files of at most max_shard_size with
    model.safetensors.index.json when there are several, and tokenizer.model when present, with
    tokenizer.json and tokenizer_config.json (chat template included) when transformers is installed.
    dtype: output dtype (default: the checkpoint's). tie_word_embeddings: default detects equal
    tok_embeddings/output weights (3.2 1B/3B). rope_scale_factor: default from params.json, else
    32 for the 3.2 1B/3B shapes and 8 otherwise. overwrite: replace an OUT_DIR that holds files.
    """
    st, _ = _safetensors()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    atomic.check_destination(out_dir, overwrite, inputs=[ckpt_dir])  # refuse before reading anything
    src = MetaShards(ckpt_dir)
    out_dtype = _dtype(dtype) or src.shards[0]["tok_embeddings.weight"].dtype
    tied = src.tied() if tie_word_embeddings is None else bool(tie_word_embeddings)
    if not tied and checkpoint.TIED_KEY not in src.keys:
        raise hf.ConversionError(f"{ckpt_dir} has no {checkpoint.TIED_KEY} (its output layer is the embedding): "
                                 "convert it with tie_word_embeddings left at its default (tied)")
    config = hf.config_from_params(
        src.params,
        tie_word_embeddings=tied,
        rope_scale_factor=rope_scale_factor,
        n_base_tokens=_n_base_tokens(ckpt_dir / "tokenizer.model"),
        torch_dtype=hf.dtype_name(out_dtype),
    )
    # a tied HF model has no lm_head tensor: it reads the embedding
    keys = [k for k in src.keys if not (tied and k == "output.weight")]
    sizes = {k: src.shape(k).numel() * out_dtype.itemsize for k in keys}
    files = _plan_files(sizes, parse_size(max_shard_size))
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    print(f"{ckpt_dir}: {len(src.paths)} shard(s), {len(keys)} tensors -> {len(files)} safetensors file(s) in {out_dir}")
    with atomic.atomic_output_dir(out_dir, overwrite, inputs=[ckpt_dir], verify=_verify_hf) as tmp:
        _write_hf(src, tmp, ckpt_dir, files, names, sizes, out_dtype, config, st)
    print(f"done: {out_dir} (tie_word_embeddings={tied}, rope_scaling={config['rope_scaling']})")


def _write_hf(
    src: MetaShards, out_dir: Path, ckpt_dir: Path, files: list[list[str]], names: list[str],
    sizes: dict[str, int], out_dtype: torch.dtype, config: dict, st,
) -> None:
    keys = [k for group in files for k in group]
    start, done, weight_map = time.perf_counter(), 0, {}
    for name, group in zip(names, files):
        tensors = {}
        for key in group:
            hf_key, t = hf.tensor_to_hf(key, src.merged(key), src.params)
            # a fresh contiguous copy: safetensors refuses views sharing storage with the mmap'd source
            tensors[hf_key] = t.to(dtype=out_dtype, copy=True).contiguous()
            weight_map[hf_key] = name
        st.save_file(tensors, out_dir / name, metadata={"format": "pt"})
        done += len(group)
        print(f"[{done}/{len(keys)}] wrote {name} ({_human(sum(sizes[k] for k in group))}, "
              f"{time.perf_counter() - start:.1f}s)")
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = hf.generation_config_from(config)
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _copy_tokenizer([ckpt_dir / "tokenizer.model"], out_dir)
    _write_hf_tokenizer(ckpt_dir / "tokenizer.model", out_dir)


def _verify_hf(out_dir: Path) -> None:
    """The written directory reads back: config, index and files agree, every tensor's header reads."""
    config = json.loads((out_dir / "config.json").read_text())
    weights = HFWeights(out_dir)
    _meta_key_sources(weights, config, config["num_hidden_layers"])
    print(f"read back {len(weights.where)} tensors in {len(weights.handles)} file(s)")


class HFWeights:
    """The safetensors weights of a Hugging Face directory (single file or indexed), read lazily."""

    def __init__(self, hf_dir: Path):
        _, safe_open = _safetensors()
        index = hf_dir / "model.safetensors.index.json"
        present = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        weight_map = None
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise hf.ConversionError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
            files = sorted(set(weight_map.values()))
            unnamed = [f for f in present if f not in files]
            if unnamed:
                raise hf.ConversionError(
                    f"{hf_dir}: safetensors file(s) {unnamed[:3]} are not named in {index.name}: the directory mixes "
                    "two conversions; convert again into a new directory"
                )
        else:
            files = present
        if not files:
            other = [p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
            raise hf.ConversionError(
                f"no safetensors weights in {hf_dir}"
                + (f" (found {other[:3]}: only safetensors converts; re-save with save_pretrained)" if other else "")
            )
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{hf_dir}: weight file(s) {missing[:3]} named in the index are missing")
        self.handles = {f: safe_open(str(hf_dir / f), framework="pt") for f in files}
        self.where = {k: h for h in self.handles.values() for k in h.keys()}
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if k not in self.handles[f].keys()]
            if wrong:
                raise hf.ConversionError(f"{hf_dir}: tensors {wrong[:3]} are not in the files the index names for them")

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def _meta_key_sources(weights: HFWeights, config: dict, n_layers: int) -> dict[str, str]:
    """Meta key -> HF key to read it from, checking that exactly the Llama weights are there."""
    sources, unexpected = {}, []
    for key in weights.where:
        if hf.HF_IGNORED.search(key):
            continue
        try:
            sources[hf.hf_to_meta_key(key)] = key
        except hf.ConversionError:
            unexpected.append(key)
    if config.get("tie_word_embeddings"):
        sources["output.weight"] = "model.embed_tokens.weight"  # tied: the output layer is the embedding
    want = checkpoint.expected_keys(n_layers)
    missing, unexpected = sorted(want - set(sources)), sorted(unexpected + list(set(sources) - want))
    if missing or unexpected:
        raise hf.ConversionError(
            f"weights do not match a {n_layers}-layer Llama: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    # Meta's own key order: embedding, layers, final norm, output
    order = ["tok_embeddings.weight"]
    for i in range(n_layers):
        order += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        order += [f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
        order += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    return {k: sources[k] for k in order + ["norm.weight", "output.weight"]}


def from_hf(hf_dir: str, out_dir: str, shards: int = 1, dtype: Optional[str] = None, overwrite: bool = False) -> None:
    """Hugging Face Llama directory (config.json + safetensors) -> Meta checkpoint of `shards` shards.

    Writes params.json and consolidated.NN.pth; a tied model gets output.weight from the embedding;
    tokenizer.model (or original/tokenizer.model) is copied when present. dtype: output dtype
    (default: the stored one). overwrite: replace an OUT_DIR that holds files.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    atomic.check_destination(out_dir, overwrite, inputs=[hf_dir])  # refuse before reading anything
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a Hugging Face model directory")
    config = json.loads(config_path.read_text())
    params = hf.params_from_config(config)
    args = ModelArgs(**params)
    args.validate(shards)
    weights = HFWeights(hf_dir)
    sources = _meta_key_sources(weights, config, args.n_layers)
    out_dtype = _dtype(dtype)
    print(f"{hf_dir}: {len(sources)} tensors in {len(weights.handles)} file(s) -> {shards} shard(s) in {out_dir}")
    with atomic.atomic_output_dir(out_dir, overwrite, inputs=[hf_dir], verify=checkpoint.inspect_dir) as tmp:
        _write_meta(weights, sources, config, params, args, shards, out_dtype, tmp, hf_dir)
    print(f"done: {out_dir} ({args.n_layers} layers, dim {args.dim}, use_scaled_rope={args.use_scaled_rope})")


def _write_meta(
    weights: "HFWeights", sources: dict[str, str], config: dict, params: dict, args: ModelArgs, shards: int,
    out_dtype: Optional[torch.dtype], out_dir: Path, hf_dir: Path,
) -> None:
    start = time.perf_counter()
    # one output shard at a time keeps memory at 1/shards of the model (the mmap'd input is re-read)
    for k in range(shards):
        shard = {}
        for meta_key, hf_key in sources.items():
            _, t = hf.tensor_from_hf(hf_key, weights.get(hf_key), config)
            t = sharding.shard_tensor(meta_key, t, args, k, shards)
            shard[meta_key] = t.to(dtype=out_dtype or t.dtype, copy=True).contiguous()  # no shared storage
        name = f"consolidated.{k:02d}.pth"
        torch.save(shard, out_dir / name)
        print(f"[{k + 1}/{shards}] wrote {name} ({time.perf_counter() - start:.1f}s)")
        del shard
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    _copy_tokenizer([hf_dir / "tokenizer.model", hf_dir / "original" / "tokenizer.model"], out_dir)


def main() -> None:
    """Console entry point (llama-convert)."""
    from llama.cli import run

    from llama.weights.adapter_hf import adapter_to_peft

    run({"to_hf": to_hf, "from_hf": from_hf, "adapter_to_peft": adapter_to_peft}, errors=(KeyError,))


if __name__ == "__main__":
    main()
