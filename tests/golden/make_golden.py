#!/usr/bin/env python3
"""Golden fixtures for tests/models.rs: tiny CIFAR ResNet and tiny Swin, PyTorch reference logits.

How the files were made (and how to regenerate them, from the repository root):

    python3 -m venv ~/.cache/sdp-torch
    ~/.cache/sdp-torch/bin/pip install torch safetensors numpy timm
    ~/.cache/sdp-torch/bin/python tests/golden/make_golden.py

(made with torch 2.15.0, timm 1.0.31, safetensors 0.8.0, numpy 2.4.6, on the CPU). It writes, under
tests/fixtures/golden/:

- resnet_tiny.safetensors     state of a kuangliu-style CIFAR ResNet (BasicBlocks, 3x3 stem, no max-pool),
                              widths [4, 8, 16, 16], depths [2, 1, 1, 1], 10 classes: every parameter and
                              BN running statistic under its state_dict name (num_batches_tracked dropped:
                              sdp does not keep it). The Rust checkpoint loader reads it strictly.
- resnet_tiny_io.safetensors  `input` (2, 3, 32, 32); `logits_eval` (BN with running statistics);
                              `logits_train` (BN with batch statistics); `after_train.<buffer>`: the running
                              statistics after that one training forward (momentum 0.1, unbiased variance).
- swin_tiny.safetensors       timm SwinTransformer with patch 2, img 32, embed dim 4 (stage dims 4, 8, 16,
                              32: timm doubles per stage), depths [2, 2, 2, 2], heads [2, 2, 2, 2],
                              window 4, MLP ratio 4, 10 classes:
                              its state_dict (relative_position_index and attn_mask are non-persistent
                              buffers in timm 1.0.x, so they are not in it). Stages run at 16, 8, 4 and 2
                              tokens per side: shifted windows with masks in the first two, one unshifted
                              4x4 window in the third, a 2x2 window (clamped) in the last.
- swin_tiny_io.safetensors    `input` (2, 3, 32, 32); `logits` (eval; Swin has no batch statistics).

The weights are random, then perturbed away from the init (norm scales/shifts, BN running statistics and
the relative-position bias tables far from their trivial values) so that every part of the forward pass moves
the logits. Weights are rounded to f32 and the reference forward pass runs in float64 on those same values, so
the Rust f32 forward is compared with the exact result (tests/models.rs: max |diff| <= 1e-4).
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "golden")


# --- kuangliu/pytorch-cifar ResNet (models/resnet.py), with configurable widths and depths ---------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    def __init__(self, widths, depths, num_classes):
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        for s, (w, d) in enumerate(zip(widths, depths)):
            setattr(self, f"layer{s + 1}", self._make_layer(w, d, 1 if s == 0 else 2))
        self.num_stages = len(widths)
        self.linear = nn.Linear(widths[-1], num_classes)

    def _make_layer(self, planes, num_blocks, stride):
        layers = []
        for st in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, st))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for s in range(self.num_stages):
            out = getattr(self, f"layer{s + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # = kuangliu's avg_pool2d(out, 4) at 32x32
        return self.linear(out)


def perturb(model, g):
    """Moves every parameter and BN statistic away from its trivial init (deterministically)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 1 and ("norm" in name or "bn" in name or "shortcut.1" in name):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # linear/conv biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def f32_state(model):
    """state_dict as contiguous f32 tensors, without BN's num_batches_tracked."""
    return {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(20250711)

    # ResNet ----------------------------------------------------------------------------------------------
    net = ResNet([4, 8, 16, 16], [2, 1, 1, 1], 10)
    perturb(net, g)
    state = f32_state(net)
    net = net.double()
    net.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    x = torch.randn(2, 3, 32, 32, generator=g).to(torch.float32)
    net.eval()
    with torch.no_grad():
        logits_eval = net(x.double())
    net.train()
    with torch.no_grad():
        logits_train = net(x.double())
    io = {"input": x, "logits_eval": logits_eval.float(), "logits_train": logits_train.float()}
    for k, v in net.state_dict().items():
        if k.endswith("running_mean") or k.endswith("running_var"):
            io[f"after_train.{k}"] = v.float().contiguous()
    save_file(state, os.path.join(OUT, "resnet_tiny.safetensors"))
    save_file(io, os.path.join(OUT, "resnet_tiny_io.safetensors"))

    # Swin ------------------------------------------------------------------------------------------------
    import timm

    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        patch_size=2,
        embed_dim=4,
        depths=(2, 2, 2, 2),
        num_heads=(2, 2, 2, 2),
        window_size=4,
        num_classes=10,
    )
    perturb(swin, g)
    state = f32_state(swin)
    swin = swin.double().eval()
    swin.load_state_dict({k: v.double() for k, v in state.items()})
    x = torch.randn(2, 3, 32, 32, generator=g).to(torch.float32)
    with torch.no_grad():
        logits = swin(x.double())
    save_file(state, os.path.join(OUT, "swin_tiny.safetensors"))
    save_file({"input": x, "logits": logits.float()}, os.path.join(OUT, "swin_tiny_io.safetensors"))

    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)), "bytes")
    print("resnet logits_eval", np.round(logits_eval.numpy(), 4))
    print("swin logits", np.round(logits.numpy(), 4))


if __name__ == "__main__":
    main()
