"""Random LoRA weights for a model's projections (tests of the adapters and the self-speculative loops)."""
import torch

from tidar_kernels.model import adapters

ALL_TARGETS = tuple(adapters.LORA_TARGETS)  # Hugging Face names: q_proj ... down_proj


def random_lora(model, targets=ALL_TARGETS, rank=4, scale=1e3, seed=1, layers=None) -> adapters.LoraWeights:
    """A :class:`LoraWeights` on ``targets`` (Hugging Face names) of ``layers`` (default all), ``alpha/rank = scale``."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name in targets:
        path = adapters.LORA_TARGETS[name]
        weights[path] = {}
        for layer in (range(len(model.layers)) if layers is None else layers):
            linear = adapters.projection(model, layer, path)
            weights[path][layer] = (torch.randn(rank, linear.in_features, generator=gen),
                                    torch.randn(linear.out_features, rank, generator=gen))
    return adapters.LoraWeights(rank, scale * rank, weights)
