"""Smaller and faster MoE models after training: expert pruning and merging, weight-only int8/int4
quantization of the experts, and QMoE-style sub-1-bit ternary experts with a dictionary code."""
