"""Training speed as images/s, tokens/s and, on CUDA, model FLOPs utilisation (MFU).

Model FLOPs of one training image (forward and backward, the PaLM paper's count, appendix B)::

    tokens * (6 * P + 12 * L * D * N)     P parameters of the network, L blocks, D width, N tokens

(matmuls 2 FLOPs per multiply-add, the backward twice the forward; attention's scores and
weighted sum 12 L D N per token). Activation checkpointing's recomputation is not counted: MFU
measures the model's work, not the hardware's. The peak is the GPU's dense bf16/fp16 tensor
rate (half of it for fp32 runs on TF32), from its name; an unknown GPU logs no MFU.
"""

from __future__ import annotations

import torch

# dense bf16/fp16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
              "RTX 4090": 165e12, "V100": 125e12, "T4": 65e12}


def train_flops_per_image(model) -> float:
    """The model FLOPs of one training image (formula above)."""
    params = sum(p.numel() for p in model.parameters())
    depth = len(getattr(model, "blocks", ()))
    width = int(getattr(model, "hidden_size", 0))
    tokens = int(model.grid_size) ** 2
    return tokens * (6.0 * params + 12.0 * depth * width * tokens)


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    return peak if precision in ("bf16", "fp16") else peak / 2


class Throughput:
    """``rates(images_per_s)`` -> the record's speed keys for this model, device and world size."""

    def __init__(self, model, device: torch.device, precision: str, world_size: int):
        self.tokens = int(model.grid_size) ** 2
        self.flops = train_flops_per_image(model)
        peak = peak_flops(device, precision)
        self.peak = None if peak is None else peak * world_size

    def rates(self, images_per_s: float) -> dict:
        out = {"img_per_s": images_per_s, "tokens_per_s": images_per_s * self.tokens}
        if self.peak is not None:
            out["mfu"] = images_per_s * self.flops / self.peak
        return out
