"""moekit: Mixture-of-Experts transformers in PyTorch.

Usage:
    import moekit
    moe = moekit.MoE(dim=512, hidden_dim=1408, num_experts=8, top_k=2)
    out = moe(x)            # MoEOutput: output, aux_loss, z_loss, stats, losses, router_logits
    model = moekit.from_pretrained("hf-folder")   # Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS
"""

from moekit.hf import from_pretrained
from moekit.moe import MoE, MoEConfig, MoEOutput, MoEStats

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "MoEOutput", "MoEStats", "__version__", "from_pretrained"]
