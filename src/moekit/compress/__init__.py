"""Smaller and faster MoE models after training: expert pruning and merging, weight-only int8/int4
quantization of the experts, and QMoE-style sub-1-bit ternary experts with a dictionary code."""

from moekit.compress.merge import merge_model, prune_model
from moekit.compress.quantize import QuantSpec, load_quantized, quantize_model, save_quantized

__all__ = ["QuantSpec", "load_quantized", "merge_model", "prune_model", "quantize_model", "save_quantized"]
