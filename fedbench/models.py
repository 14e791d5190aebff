"""Model architectures: the FL-WBC paper's CNNs (table 3, as reference section 6 pins them down) and a
small MLP for the embedded ``digits`` dataset.

Every model here is built from layers the stacked trainer understands (conv, linear, pooling, ReLU,
flatten), so all clients of a round can be trained together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from fedbench.components import AT_LEAST_ONE, Model, param
from fedbench.errors import SpecError


def _expect(name: str, input_shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(input_shape) != expected:
        raise SpecError(f"model '{name}' expects inputs of shape {expected}, the dataset gives {tuple(input_shape)}")


@dataclass(kw_only=True)
class FmnistCNN(Model):
    """The paper's Fashion-MNIST CNN: two 5x5 convs (16, 32 channels) with 2x2 pooling, FC 1568->10 (28,938 params)."""

    name: ClassVar[str] = "fmnist-cnn"

    def build(self, input_shape, num_classes):
        _expect(self.name, input_shape, (1, 28, 28))
        return nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, num_classes),
        )


@dataclass(kw_only=True)
class CifarCNN(Model):
    """The paper's CIFAR-10 CNN (LeNet-5 style: convs 6 and 16 channels, FC 400-120-84-10; 62,006 params)."""

    name: ClassVar[str] = "cifar-cnn"

    def build(self, input_shape, num_classes):
        _expect(self.name, input_shape, (3, 32, 32))
        return nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
        )


@dataclass(kw_only=True)
class MLP(Model):
    """A one-hidden-layer perceptron on flattened inputs; the default for the 8x8 ``digits`` images."""

    name: ClassVar[str] = "mlp"
    hidden: int = param(64, "width of the hidden layer", check=AT_LEAST_ONE)

    def build(self, input_shape, num_classes):
        size = 1
        for dim in input_shape:
            size *= dim
        return nn.Sequential(nn.Flatten(), nn.Linear(size, self.hidden), nn.ReLU(), nn.Linear(self.hidden, num_classes))
