"""ResNet-18 (CIFAR variant: 3x3 stem, stride 1, no max-pool) and PreAct-ResNet-18
(He et al. 2016; the BackdoorBench model). Module names follow the usual
``conv1 / layer1..layer4 / fc`` layout so BCU's ResNet schedule maps onto them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unbackdoor.models.base import Classifier, default_stats
from unbackdoor.models.registry import register


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class ResNetBackbone(nn.Module):
    def __init__(self, block, num_blocks=(2, 2, 2, 2), in_channels: int = 3, width: int = 64, preact: bool = False,
                 stem: str = "cifar", final_bn: bool = True):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown ResNet stem {stem!r}; valid: cifar, imagenet")
        self.preact = preact
        # stem="imagenet" (7x7/2 conv + 3x3/2 max-pool) is torchvision's layout, which
        # BackdoorBench's "resnet18" uses; "cifar" (3x3/1, no pool) is the usual CIFAR one.
        big = stem == "imagenet"
        self.conv1 = nn.Conv2d(in_channels, width, 7 if big else 3, 2 if big else 1, 3 if big else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width) if not preact else None
        self.maxpool = nn.MaxPool2d(3, 2, 1) if big else None
        cin = width
        layers = []
        for i, nb in enumerate(num_blocks):
            cout = width * 2**i
            blocks = []
            for j in range(nb):
                blocks.append(block(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        # BackdoorBench's PreAct-ResNet-18 has no final BN + ReLU before pooling (final_bn=False).
        self.bn_final = nn.BatchNorm2d(cin) if preact and final_bn else None
        self.out_dim = cin

    def forward(self, x):
        out = self.conv1(x)
        if self.bn1 is not None:
            out = F.relu(self.bn1(out))
        if self.maxpool is not None:
            out = self.maxpool(out)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn_final is not None:
            out = F.relu(self.bn_final(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, mean=None, std=None, width: int = 64,
             stem: str = "cifar") -> Classifier:
    bb = ResNetBackbone(BasicBlock, (2, 2, 2, 2), in_channels, width, stem=stem)
    m, s = default_stats(in_channels)
    return Classifier(bb, bb.out_dim, num_classes, mean or m, std or s)


@register("preact-resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, mean=None, std=None, width: int = 64,
                    final_bn: bool = True) -> Classifier:
    bb = ResNetBackbone(PreActBlock, (2, 2, 2, 2), in_channels, width, preact=True, final_bn=final_bn)
    m, s = default_stats(in_channels)
    return Classifier(bb, bb.out_dim, num_classes, mean or m, std or s)
