"""The teaching notebook's own training loop, as the notebook wrote it: the baseline `cifar-cnn bench` times the
recipes against, in the same invocation, so that a ratio holds on a noisy machine.

What makes it the notebook's and not the package's `seed` recipe (same network, same hyper-parameters): each image
is converted to a tensor on its own when a `DataLoader` asks for it (torchvision's ToTensor and Normalize((0.5,)*3,
(0.5,)*3), written out here because torchvision cannot be imported), batches of 20 are collated from single images,
the 20% validation split is a shuffled index list fed to a `SubsetRandomSampler`, the loss is read back after every
step (`loss.item()`), the weights with the lowest validation loss are saved with `torch.save` and loaded again for
the test, in float32 with no autocast. The data come from the package's decode cache (the notebook read the pickled
batches); the clock starts before they are read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler

from .data.load import load_dataset
from .device import resolve_device
from .models import create_model

EPOCHS, BATCH_SIZE, LR, VALID_SIZE = 10, 20, 0.01, 0.2  # the notebook's settings


class PerImageTensors(Dataset):
    """uint8 (N, 3, H, W) images served one at a time as float tensors in [-1, 1], labels as ints."""

    def __init__(self, images: Any, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.array(self.images[i], dtype=np.float32)) / 255.0  # ToTensor
        return (x - 0.5) / 0.5, int(self.labels[i])  # Normalize((0.5,)*3, (0.5,)*3)


def _epoch(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device, optimizer: Any = None
) -> float:
    """One pass; trains when given an optimizer. Returns the summed loss over the images, as the notebook adds it."""
    total = 0.0
    for data, target in loader:
        data, target = data.to(device), target.to(device)  # the notebook's `if train_on_gpu: ... .cuda()`
        if optimizer is not None:
            optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        if optimizer is not None:
            loss.backward()
            optimizer.step()
        total += loss.item() * data.size(0)
    return total


def notebook_loop(
    data: str,
    out: Path,
    *,
    seed: int = 0,
    epochs: int = EPOCHS,
    device: str = "auto",
    home: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the notebook's network the notebook's way on `data` and test it; wall seconds from the call (the decode
    cache read included) to the test accuracy, the test accuracy and the per-epoch losses. `out` holds its
    model_cifar.pt. `device` "auto" is the notebook's choice: the GPU when there is one."""
    dev = resolve_device(device)
    started = time.perf_counter()
    ds = load_dataset(data, 32, home=home, log=lambda m: None)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_set = PerImageTensors(ds.train_images, ds.train_labels)
    indices = rng.permutation(len(train_set))
    split = int(np.floor(VALID_SIZE * len(train_set)))
    valid_idx, train_idx = indices[:split].tolist(), indices[split:].tolist()
    train_loader = DataLoader(train_set, batch_size=BATCH_SIZE, sampler=SubsetRandomSampler(train_idx))
    valid_loader = DataLoader(train_set, batch_size=BATCH_SIZE, sampler=SubsetRandomSampler(valid_idx))
    test_loader = DataLoader(PerImageTensors(ds.test_images, ds.test_labels), batch_size=BATCH_SIZE)

    model = create_model("seed_cnn", num_classes=len(ds.classes)).to(dev)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model_cifar.pt"
    valid_loss_min, history = np.inf, []
    for epoch in range(epochs):
        model.train()
        train_loss = _epoch(model, train_loader, criterion, dev, optimizer) / len(train_idx)
        model.eval()
        with torch.no_grad():
            valid_loss = _epoch(model, valid_loader, criterion, dev) / len(valid_idx)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": valid_loss})
        log(f"notebook loop seed {seed}: epoch {epoch + 1}/{epochs} train {train_loss:.4f} valid {valid_loss:.4f}")
        if valid_loss <= valid_loss_min:
            torch.save(model.state_dict(), weights)
            valid_loss_min = valid_loss

    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    correct = 0
    with torch.no_grad():
        for data_, target in test_loader:
            correct += int((model(data_.to(dev)).argmax(1).cpu() == target).sum())
    return {
        "seed": seed,
        "wall_s": time.perf_counter() - started,
        "accuracy": correct / len(ds.test_labels),
        "epochs": epochs,
        "history": history,
    }
