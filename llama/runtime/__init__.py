"""What runs the model on this machine: the dtype and kernel policy and its start-up measurements
(policy, probes, cpu), how a step applies it (compute), the quantized kernels and the choice among
them (quant_kernels, quant_choice), fbgemm's int8 product (w8a8), and compiled graphs (graphs,
compiled). Nothing here imports llama.weights or anything above it."""
