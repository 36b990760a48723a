"""The modules that passes insert into graphs and the runtime drives.

    quant.py       the FracTrain quantizer as functions and autograd functions (docs/method.md section 1)
    quantizers.py  ActQuant / WeightQuant / GradQuant: bits in buffers, set without retracing
    mixed.py       DFQ's per-sample mixed-precision quantizers inside a gated block
    gates.py       the DFQ gate network: embeddings and the shared LSTM controller
    attention.py   multi-head attention written in the ops fracfx quantizes
    frozen.py      fixed-precision quantizers that freeze puts in place for export
    precision.py   set_bits / seed_rounding: change every quantizer of a graph at once
    exported.py    modules standing in for ATen ops of a torch.export capture (mode-aware BatchNorm)
    kernels/       fused C++ quantizer ops (torch.library, built once, eager fallback); docs/kernels.md
"""
