"""A LoRA adapter (llama.weights.lora) in PEFT's format, for the Hugging Face conversion of its base
(scripts/convert.py to_hf): `PeftModel.from_pretrained(model, OUT_DIR)` loads it.

    python scripts/convert.py adapter_to_peft ADAPTER_DIR OUT_DIR

The keys are the converted projections' (llama.weights.hf), `.lora_A.weight` (rank, in) and
`.lora_B.weight` (out, rank) under PEFT's `base_model.model.` prefix. A query or key projection's
rows are permuted for Hugging Face's rotary layout (hf.permute_to_hf), so its B's rows are
permuted the same way; A multiplies the unpermuted input and is copied as it is.
"""
import json

from llama import atomic
from llama.weights import hf, lora


def adapter_to_peft(adapter_dir: str, out_dir: str, overwrite: bool = False) -> None:
    """Write ADAPTER_DIR (a fine-tune's OUT_DIR/adapter) as a PEFT LoRA adapter in OUT_DIR
    (adapter_config.json, adapter_model.safetensors), whole or not at all.

    Args:
        adapter_dir: the adapter: adapter.json and adapter.pth.
        out_dir: the PEFT adapter directory to write.
        overwrite: replace an OUT_DIR that holds files.
    """
    from safetensors.torch import save_file

    meta, config, state = lora.read_adapter_files(adapter_dir)
    params = {k: meta["base"][k] for k in ("n_heads", "n_kv_heads")}
    tensors, modules = {}, set()
    for key, t in sorted(state.items()):
        name, part = key.rsplit(".lora.", 1)  # layers.0.attention.wq, A | B
        hf_key = hf.meta_to_hf_key(name + ".weight")
        if part == "B":  # the rows of the projection's output, permuted as its weight's
            hf_key, t = hf.tensor_to_hf(name + ".weight", t, params)
        prefix = hf_key.removesuffix(".weight")
        modules.add(prefix.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{prefix}.lora_{part}.weight"] = t.contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "use_rslora": config.rslora, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None,
    }
    with atomic.atomic_output_dir(out_dir, overwrite, inputs=[adapter_dir]) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
    print(f"wrote {out_dir}: a PEFT LoRA adapter (rank {config.rank}; {', '.join(sorted(modules))})")
