"""Post-training on Meta-format checkpoints: SFT and DPO, full or LoRA, on one process or many
(docs/finetuning.md). The adapters themselves live in llama.weights.lora, where the loader applies them."""
