"""Parameter sets the harness steps: lists of shapes, no models, no data.

Each set is a list of tensor shapes shaped like a real model's parameters, so an
optimizer step sees the same mix of tensor sizes it would in training. Shapes only: the
harness fills them with random values and random gradients.
"""
from __future__ import annotations

import math

Shape = tuple[int, ...]


def gpt2(d: int, layers: int, vocab: int, ctx: int) -> list[Shape]:
    """GPT-2 parameters in the order of the HF model: wte, wpe, blocks, ln_f (tied head).

    Per block: ln_1 (w, b), attn.c_attn (w [3d, d], b), attn.c_proj (w [d, d], b), ln_2
    (w, b), mlp.c_fc (w [4d, d], b), mlp.c_proj (w [d, 4d], b): 12 tensors.
    """
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def resnet(blocks: tuple[int, ...], bottleneck: bool, classes: int = 1000) -> list[Shape]:
    """ResNet parameters (torchvision layout): conv weights, BN weight+bias, fc.

    Many small tensors: BN vectors of 64..2048 elements next to conv kernels of up to
    2.4M elements (ResNet-50: 161 tensors, 25.6M parameters; ResNet-18: 62, 11.7M).
    """
    def conv_bn(cin, cout, k):
        return [(cout, cin, k, k), (cout,), (cout,)]

    shapes = conv_bn(3, 64, 7)
    cin = 64
    expansion = 4 if bottleneck else 1
    for stage, n in enumerate(blocks):
        width = 64 * 2 ** stage
        cout = width * expansion
        for b in range(n):
            if bottleneck:
                shapes += conv_bn(cin, width, 1) + conv_bn(width, width, 3) \
                    + conv_bn(width, cout, 1)
            else:
                shapes += conv_bn(cin, width, 3) + conv_bn(width, width, 3)
            if b == 0 and (stage > 0 or cin != cout):
                shapes += conv_bn(cin, cout, 1)  # downsample shortcut
            cin = cout
    return shapes + [(classes, cin), (classes,)]


# name -> shapes. The large GPT-2s and single-268m are in the --full sweep on CUDA only;
# on CPU, name them with --sets (rows that would not fit in memory are skipped, saying so).
SETS: dict[str, list[Shape]] = {
    "gpt2-tiny": gpt2(d=128, layers=2, vocab=2048, ctx=256),  # smoke tests, micro-benchmarks
    "gpt2-11m": gpt2(d=256, layers=12, vocab=8192, ctx=1024),
    "gpt2-124m": gpt2(d=768, layers=12, vocab=50257, ctx=1024),
    "gpt2-medium": gpt2(d=1024, layers=24, vocab=50257, ctx=1024),
    "gpt2-large": gpt2(d=1280, layers=36, vocab=50257, ctx=1024),
    "resnet18": resnet((2, 2, 2, 2), bottleneck=False),
    "resnet50": resnet((3, 4, 6, 3), bottleneck=True),
    "single-16m": [(4096, 4096)],
    "single-268m": [(16384, 16384)],
}

# The default run (python bench/run.py): a couple of minutes on 2 CPU cores.
QUICK = {"cpu": ["gpt2-11m", "resnet18"], "cuda": ["gpt2-11m", "gpt2-124m", "resnet18"]}
FULL = {"cpu": ["gpt2-11m", "gpt2-124m", "resnet18", "resnet50", "single-16m"],
        "cuda": ["gpt2-11m", "gpt2-124m", "gpt2-medium", "gpt2-large", "resnet18",
                 "resnet50", "single-16m", "single-268m"]}


def numel(name: str) -> int:
    return sum(math.prod(s) for s in SETS[name])


def describe(name: str) -> str:
    shapes = SETS[name]
    biggest = max(math.prod(s) for s in shapes)
    return f"{name}: {len(shapes)} tensors, {numel(name) / 1e6:.1f}M params, largest {biggest / 1e6:.2f}M"


if __name__ == "__main__":
    for n in SETS:
        print(describe(n))
