"""The training loss as a module (what DistributedDataParallel wraps), and the modules it never reaches."""

from __future__ import annotations

from torch import Tensor, nn

from pi0.model.observation import Observation


class LossModule(nn.Module):
    """The model's training loss as a forward pass (what DistributedDataParallel wraps)."""

    def __init__(self, model: nn.Module, action_dim: int):
        super().__init__()
        self.model, self.action_dim = model, action_dim

    def forward(self, obs: Observation, actions: Tensor, noise: Tensor, time: Tensor) -> Tensor:
        loss = self.model.compute_loss(obs, actions, noise=noise, time=time)
        return loss[:, :, : self.action_dim].mean()  # LeRobot's reduction: the real action dims only


def unreachable_modules(model: nn.Module) -> list[str]:
    """Modules the loss never reaches: the suffix reads each VLM layer's keys and values, made from the layer's
    input, so the last VLM layer's attention output, post-attention norm and MLP, and the VLM's final norm,
    shape nothing the actions see."""
    if not hasattr(model, "expert"):  # π0-FAST: the answer's logits read every layer and the final norm
        return []
    last = f"vlm.layers.{len(model.vlm.layers) - 1}"
    return [f"{last}.self_attn.o_proj", f"{last}.post_attention_layernorm", f"{last}.mlp", "vlm.norm"]
