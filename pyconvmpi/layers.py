"""Named layer sets of well-known networks, shared by the benchmark and the tuner.

Shapes follow the published architectures (ResNet, VGG, MobileNet v1) at the batch sizes
given; ``seed`` contains the image-filtering workloads the project started from.
"""

import re
from typing import NamedTuple


class Layer(NamedTuple):
    """One convolution: input (n, c, h, w), k output channels, an r x s kernel and options."""

    name: str
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int = 1
    padding: object = 0
    dilation: int = 1
    groups: int = 1

    @property
    def input_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def weight_shape(self):
        return (self.k, self.c // self.groups, self.r, self.s)

    def options(self):
        """Return the keyword options of conv2d for this layer."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def flops(self, op="forward"):
        """Return the floating-point operations (2 per multiply-add) of the forward pass, or of
        backward data plus backward weights for any other op."""
        eff_r = self.dilation * (self.r - 1) + 1
        eff_s = self.dilation * (self.s - 1) + 1
        pad = self.padding
        if pad == "same":
            out_h, out_w = self.h, self.w
        else:
            p = 0 if pad == "valid" else pad
            out_h = (self.h + 2 * p - eff_r) // self.stride + 1
            out_w = (self.w + 2 * p - eff_s) // self.stride + 1
        forward = 2 * self.n * self.k * out_h * out_w * (self.c // self.groups) * self.r * self.s
        return forward if op == "forward" else 2 * forward


def _resnet_basic(n):
    return [
        Layer("conv1", n, 3, 224, 224, 64, 7, 7, 2, 3),
        Layer("layer1.3x3", n, 64, 56, 56, 64, 3, 3, 1, 1),
        Layer("layer2.3x3s2", n, 64, 56, 56, 128, 3, 3, 2, 1),
        Layer("layer2.3x3", n, 128, 28, 28, 128, 3, 3, 1, 1),
        Layer("layer2.down", n, 64, 56, 56, 128, 1, 1, 2, 0),
        Layer("layer3.3x3", n, 256, 14, 14, 256, 3, 3, 1, 1),
        Layer("layer4.3x3", n, 512, 7, 7, 512, 3, 3, 1, 1),
    ]


def _resnet50(n):
    return [
        Layer("conv1", n, 3, 224, 224, 64, 7, 7, 2, 3),
        Layer("layer1.1x1a", n, 64, 56, 56, 64, 1, 1),
        Layer("layer1.3x3", n, 64, 56, 56, 64, 3, 3, 1, 1),
        Layer("layer1.1x1b", n, 64, 56, 56, 256, 1, 1),
        Layer("layer2.3x3", n, 128, 28, 28, 128, 3, 3, 1, 1),
        Layer("layer2.1x1", n, 512, 28, 28, 128, 1, 1),
        Layer("layer3.3x3", n, 256, 14, 14, 256, 3, 3, 1, 1),
        Layer("layer3.1x1", n, 1024, 14, 14, 256, 1, 1),
        Layer("layer4.3x3", n, 512, 7, 7, 512, 3, 3, 1, 1),
        Layer("layer4.1x1", n, 2048, 7, 7, 512, 1, 1),
    ]


def _vgg16(n):
    return [
        Layer("conv1_2", n, 64, 224, 224, 64, 3, 3, 1, 1),
        Layer("conv2_2", n, 128, 112, 112, 128, 3, 3, 1, 1),
        Layer("conv3_2", n, 256, 56, 56, 256, 3, 3, 1, 1),
        Layer("conv4_2", n, 512, 28, 28, 512, 3, 3, 1, 1),
        Layer("conv5_2", n, 512, 14, 14, 512, 3, 3, 1, 1),
    ]


def _mobilenet(n):
    return [
        Layer("dw1", n, 32, 112, 112, 32, 3, 3, 1, 1, groups=32),
        Layer("dw2s2", n, 64, 112, 112, 64, 3, 3, 2, 1, groups=64),
        Layer("dw4", n, 128, 56, 56, 128, 3, 3, 1, 1, groups=128),
        Layer("dw6", n, 256, 28, 28, 256, 3, 3, 1, 1, groups=256),
        Layer("dw8", n, 512, 14, 14, 512, 3, 3, 1, 1, groups=512),
        Layer("pw8", n, 512, 14, 14, 512, 1, 1),
    ]


LAYER_SETS = {
    "resnet18": lambda: _resnet_basic(8),
    "resnet50": lambda: _resnet50(8),
    "vgg16": lambda: _vgg16(2),
    "mobilenet": lambda: _mobilenet(8),
    "seed": lambda: [
        Layer("rgb1024", 80, 3, 1024, 1024, 3, 3, 3, 1, 1),
        Layer("grey32x160k", 160000, 1, 32, 32, 1, 3, 3, 1, 1),
        Layer("grey32x10k", 10000, 1, 32, 32, 1, 3, 3, 1, 1),
    ],
    "mnist": lambda: [
        Layer("conv1", 64, 1, 28, 28, 32, 3, 3),
        Layer("conv2", 64, 32, 26, 26, 64, 3, 3),
    ],
}

# NxCxHxW:KxRxS[:s<stride>][:p<padding>][:d<dilation>][:g<groups>], e.g. 8x64x56x56:64x3x3:p1
_SHAPE = re.compile(
    r"^(\d+)x(\d+)x(\d+)x(\d+):(\d+)x(\d+)x(\d+)((?::[spdg](?:\d+|same|valid))*)$"
)
SHAPE_FORMAT = "NxCxHxW:KxRxS[:s<stride>][:p<padding>|:psame|:pvalid][:d<dilation>][:g<groups>]"


def parse_shape(text):
    """Parse a layer given as text in SHAPE_FORMAT; raises ValueError naming the format."""
    match = _SHAPE.match(text.strip())
    if match is None:
        raise ValueError(f"layer shape must look like {SHAPE_FORMAT}; got {text!r}")
    n, c, h, w, k, r, s = (int(v) for v in match.groups()[:7])
    options = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    keys = {"s": "stride", "p": "padding", "d": "dilation", "g": "groups"}
    for item in filter(None, match.group(8).split(":")):
        value = item[1:]
        options[keys[item[0]]] = value if value in ("same", "valid") else int(value)
    if options["groups"] < 1 or c % options["groups"] != 0:
        raise ValueError(f"layer shape {text!r}: groups must divide the {c} input channels")
    return Layer(text.strip(), n, c, h, w, k, r, s, **options)


def layer_set(name):
    """Return the layers of a named set; raises ValueError listing the known names."""
    if name not in LAYER_SETS:
        raise ValueError(f"layer set must be one of {', '.join(map(repr, LAYER_SETS))}; got {name!r}")
    return LAYER_SETS[name]()
