"""Benchmark CNNs of the zoo, and tiny `test-*` versions registered the same way for the test suite.

Every model takes its data set's input tensor as is and returns logits (N, 10). Recipes are the
ones the shipped checkpoints were trained with (`allot zoo train NAME` reproduces them).
"""

from __future__ import annotations

from torch import Tensor, nn

from allot.zoo.registry import TrainRecipe, register_model

NUM_CLASSES = 10


@register_model(
    "digits-cnn",
    dataset="digits",
    description="3-conv + linear CNN for 8x8 digits (8.4k params)",
    recipe=TrainRecipe(epochs=30, lr=3e-3, batch_size=64, optimizer="adam", seed=0),
)
def digits_cnn() -> nn.Module:
    """Conv 1->16 -> conv 16->16 -> pool (4x4) -> conv 16->32 -> pool (2x2) -> linear 128->10."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, NUM_CLASSES),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, or a 1x1 conv-BN projection shortcut when
    the block changes resolution or width."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 for 1-channel 28x28 images: a 3x3 stem conv, three stages of three
    basic blocks (16, 32, 64 channels at 28x28, 14x14, 7x7), global average pooling, linear head.

    The two down-sampling blocks use 1x1 conv projection shortcuts (He et al.'s option B) rather
    than zero-padded identities, so every layer is an ordinary conv or linear module (272k params).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        in_width = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(3):
                blocks.append(BasicBlock(in_width, width, stride if index == 0 else 1))
                in_width = width
        self.layer1 = nn.Sequential(*blocks[0:3])
        self.layer2 = nn.Sequential(*blocks[3:6])
        self.layer3 = nn.Sequential(*blocks[6:9])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@register_model(
    "mnist-resnet20",
    dataset="mnist5k",
    description="CIFAR-style ResNet-20 with 1x1 projection shortcuts (272k params)",
    recipe=TrainRecipe(epochs=10, lr=2e-3, batch_size=64, optimizer="adam", seed=0),
)
def mnist_resnet20() -> nn.Module:
    return ResNet20()


@register_model(
    "mnist1d-cnn",
    dataset="mnist1d",
    description="3-conv1d (32 channels, stride 2) + linear CNN for MNIST-1D (8.0k params)",
    recipe=TrainRecipe(epochs=60, lr=1e-2, batch_size=100, optimizer="adam", seed=0),
)
def mnist1d_cnn() -> nn.Module:
    """Length 40 -> 19 -> 10 -> 5 through three strided Conv1d layers, then linear 160->10."""
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 5, NUM_CLASSES),
    )


@register_model(
    "test-cnn",
    dataset="digits",
    description="tiny conv + BatchNorm + linear model for tests",
    recipe=TrainRecipe(epochs=3, lr=1e-2, batch_size=64, seed=0),
)
def test_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, NUM_CLASSES),
    )


@register_model(
    "test-conv1d",
    dataset="mnist1d",
    description="tiny conv1d + linear model for tests",
    recipe=TrainRecipe(epochs=6, lr=3e-2, batch_size=100, seed=0),
)
def test_conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 8, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 10, NUM_CLASSES),
    )


@register_model(
    "test-mlp",
    dataset="digits",
    description="tiny linear-only model for tests (flattens its 8x8 input)",
    recipe=TrainRecipe(epochs=3, lr=1e-2, batch_size=64, seed=0),
)
def test_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, NUM_CLASSES),
    )
