#!/usr/bin/env python3
"""The PyTorch reference for `sdp bench step`: one CIFAR ResNet-18 training step (forward, cross-entropy,
backward, SGD momentum 0.9 / weight decay 5e-4) on random seeded input, timed after warm-up.

The model is kuangliu's pytorch-cifar ResNet-18 (3x3 stem, no max-pool, BasicBlocks, 1x1-conv + BN
projection shortcuts), the same architecture and parameter names as `sdp`'s `resnet18`. Prints the
step times and, as its LAST line, the same machine-readable figures as `sdp bench step`:

    step_s=<median seconds> img_s=<images per second> peak_mb=<MiB>

Peak memory: on the CPU, `resource.getrusage` maxrss minus the RSS before the model is built (the
torch import is not counted, as `sdp`'s binary is not); on CUDA, `torch.cuda.max_memory_allocated`.

    python scripts/pytorch_step.py --batch 128 [--device cpu|cuda:0] [--steps 7] [--warmup 2]
                                   [--widths 64,128,256,512] [--channels-last] [--threads N]
"""
import argparse
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in = widths[0]
        for s, (w, d) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(d):
                blocks.append(BasicBlock(c_in, w, 2 if s > 0 and j == 0 else 1))
                c_in = w
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.n_stages = len(widths)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        for s in range(self.n_stages):
            out = getattr(self, f"layer{s + 1}")(out)
        out = out.mean(dim=(2, 3))  # global average pool, as `sdp` does for any input size
        return self.linear(out)


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ints(s):
    return [int(v) for v in s.split(",")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["resnet", "swin_t", "llama_tiny", "llama_134m"], default="resnet",
                   help="resnet (kuangliu's CIFAR ResNet; --widths/--depths), swin_t (timm, 32x32 as `sdp`'s) or "
                        "llama_tiny (transformers' LlamaForCausalLM as `sdp`'s preset; --context, --classes = vocab)")
    p.add_argument("--context", type=int, default=128, help="llama_tiny: tokens per sequence")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--widths", type=ints, default=[64, 128, 256, 512])
    p.add_argument("--depths", type=ints, default=[2, 2, 2, 2])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2, this machine's cores)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.batch < 1 or a.steps < 1 or len(a.widths) != len(a.depths):
        sys.exit("error: --batch and --steps must be >= 1 and --widths/--depths of equal length")

    dev = torch.device(a.device)
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    else:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(a.seed)
    base_kib = rss_kib()
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    if a.model == "swin_t":
        import timm  # only needed here

        # docs/design.md §7's swin_t: patch 2, window 4, dims 96..768, depths 2/2/6/2, heads 3/6/12/24.
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=a.image_size,
                                  patch_size=2, window_size=4, num_classes=a.classes).to(dev)
    elif a.model.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM  # only needed here

        # src/models/llama.rs's presets: llama_tiny d 128, 8 layers, 4 heads, SwiGLU 352, tied head; llama_134m
        # d 768, 12 layers, 12 heads, SwiGLU 2048, untied; eager attention.
        d, layers, heads, ffn, tied = (128, 8, 4, 352, True) if a.model == "llama_tiny" else (768, 12, 12, 2048, False)
        cfg = LlamaConfig(vocab_size=a.classes, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=tied,
                          max_position_embeddings=max(a.context, 128), rms_norm_eps=1e-6, rope_theta=10000.0)
        cfg._attn_implementation = "eager"
        model = LlamaForCausalLM(cfg).to(dev)
    else:
        model = ResNet(a.widths, a.depths, a.classes).to(dev, memory_format=fmt)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(a.seed)
    if a.model.startswith("llama"):
        x = torch.randint(0, a.classes, (a.batch, a.context), generator=g).to(dev)
        y = torch.randint(0, a.classes, (a.batch, a.context), generator=g).to(dev)
    else:
        x = (torch.rand(a.batch, 3, a.image_size, a.image_size, generator=g) * 4 - 2).to(dev, memory_format=fmt)
        y = torch.randint(0, a.classes, (a.batch,), generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times = []
    for i in range(a.warmup + a.steps):
        sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if a.model.startswith("llama"):
            loss = F.cross_entropy(out.logits.reshape(-1, a.classes), y.reshape(-1))
        else:
            loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)

    if dev.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(dev) - base_cuda) / 2**20
    else:
        # ru_maxrss is in KiB on Linux.
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
    step_s = statistics.median(times)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pytorch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, "
          f"channels_last {a.channels_last}, batch {a.batch}, params {n_params}", file=sys.stderr)
    print("step times (ms): " + " ".join(f"{t * 1e3:.1f}" for t in times))
    print(f"step_s={step_s:.4f} img_s={a.batch / step_s:.1f} peak_mb={peak_mb:.1f}")


if __name__ == "__main__":
    main()
