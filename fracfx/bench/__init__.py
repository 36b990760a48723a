"""Benchmarks behind `fracfx bench`: each measures a candidate against its baseline in the same
process, interleaved, and reports medians and ratios (timing.py)."""
