"""Everything between a checkpoint on disk and a model in memory: the tensor-parallel rules
(sharding), the quantized formats and modules (quant_formats, quant_modules), reading, slicing,
writing and verifying Meta checkpoints (checkpoint, rank_state, save, checklist), the Hugging Face
layout and the converter (hf, convert), and the one load pipeline Llama.build runs (loader).
Imports llama.runtime and the layers below it, never the engine or the generator."""
