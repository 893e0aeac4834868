"""The teaching notebook's network, exactly: two 3x3 conv layers with max-pooling, then two linear layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class SeedCNN(nn.Module):
    """conv1 3->16, conv2 16->32 (3x3, stride 1, pad 1), 2x2 max-pool after each, fc1 32*8*8->512, fc2 512->classes."""

    head_name = "fc2"  # the classifier head (transfer learning, head_lr_factor)

    def __init__(self, num_classes: int = 10, dropout: float = 0.25) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * 8 * 8, 512)
        self.fc2 = nn.Linear(512, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = F.relu(self.fc1(x))
        x = self.dropout(x)
        return self.fc2(x)  # raw logits; softmax belongs to prediction and reporting


@register_model("seed_cnn", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # fc1 fixes the input at 32 px
def seed_cnn(num_classes: int = 10, dropout: float = 0.25) -> SeedCNN:
    """The notebook's small CNN (1.06 M parameters); inputs normalized to [-1, 1]."""
    return SeedCNN(num_classes=num_classes, dropout=dropout)
