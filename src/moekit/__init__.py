"""moekit: Mixture-of-Experts transformers in PyTorch.

    import moekit
    moe = moekit.MoE(dim=512, hidden_dim=1408, num_experts=8, top_k=2)
    out = moe(x)            # MoEOutput(output, aux_loss, z_loss, stats, losses)
"""

from moekit.moe import MoE, MoEConfig, MoEOutput, MoEStats

__version__ = "0.1.0"
__all__ = ["MoE", "MoEConfig", "MoEOutput", "MoEStats", "__version__"]
