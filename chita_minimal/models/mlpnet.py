"""MLPNet 784-40-20-10 for MNIST, the small network of the CHITA paper's MNIST experiments."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPNet(nn.Module):
    """Fully connected 784 → 40 → 20 → 10, no biases, ReLU between layers.

    Takes images (B, 1, 28, 28) (or anything with 784 features per sample, flattened
    here) and returns logits (B, 10). The shared checkpoint was trained with
    ``log_softmax`` + NLL loss, which equals cross-entropy on these logits.
    32,360 weights, all prunable.
    """

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 40, bias=False)
        self.fc2 = nn.Linear(40, 20, bias=False)
        self.fc3 = nn.Linear(20, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 784)
        x = F.relu(self.fc1(x))  # (B, 40)
        x = F.relu(self.fc2(x))  # (B, 20)
        return self.fc3(x)  # (B, 10) logits
