"""Benchmarks behind `fracfx bench`: each measures a candidate against its baseline in the same
process (or the same onnxruntime session setup), interleaved, and reports medians and ratios.

    step.py    training step: FP32, 8/8/8 and DFQ eager, FP32 and 8/8/8 compiled, quantizers' share
    export.py  onnxruntime latency of the exported formats against the FP32 file and ORT's own quantizer
    timing.py  interleaved timing, the data-parallel throughput run, free ports
"""
