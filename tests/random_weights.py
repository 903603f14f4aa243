"""Random weights for the small Llamas the decoding tests build."""
import torch


def random_weights(model, generator, std):
    """model with every weight drawn from generator: norms 1 + N(0, 0.1), the rest N(0, std)
    (logits spread by about std * sqrt(dim), so greedy argmax has few near-ties); in eval
    mode, without gradients."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)
    return model.eval().requires_grad_(False)
