#!/usr/bin/env python3
"""The PyTorch twin of an `sdp` data-parallel (DP) training run: the same model, data subset, normalisation,
augmentation, optimizer, schedule and K x batch, trained by PyTorch, so that sdp's DP baseline can be checked
against the field's reference implementation.

    python3 scripts/pytorch_train.py --data datasets/cifar10-jpeg-q75 --train-samples 8000 --test-samples 2000 \\
        --widths 16,32,64,128 --depths 2,2,2,2 --workers 4 --batch 64 --epochs 5 --lr 0.2 --warmup 0.5 \\
        --eval-every 2 --pad-mode reflect --seed 0 --csv /tmp/twin-seed0.csv
    python3 scripts/pytorch_train.py --spec experiments/mini/sdp_forward.toml --data-dir datasets --seed 1 --csv /tmp/twin-seed1.csv

With --spec, the spec's scalar fields set the defaults of the flags below (a `seeds` list gives its first
seed; a `method.kind` list must contain "dp", which is the run trained here; any other grid axis must be
fixed with its flag), and fields this twin cannot train (another optimizer, schedule, method, model or
norm) are errors.

Prints one line per evaluation and, as its LAST line, `final_test_acc=<fraction>`; writes the evaluations
to a CSV with the columns of sdp's metrics.csv (epoch, step, train_loss, test_loss, test_acc, lr, img_per_s,
wall_s).

Flags and the spec fields they mirror (a flag given on the command line wins over --spec; every default is
sdp's default for that field):

    --data ROOT           workload.dataset = "folder:ROOT": an ImageFolder tree ROOT/{train,test}/<class>/*.jpg
                          (a relative ROOT from --spec is looked up under --data-dir, as `sdp run` does)
    --train-samples N     workload.train_samples (default: all)
    --test-samples N      workload.test_samples (default: all)
    --data-seed S         workload.data_seed (default 0): the seed of the class-stratified subset
    --widths W,..         workload.widths (default resnet18's 64,128,256,512)
    --depths D,..         workload.depths (default 2,2,2,2)
    --epochs E            workload.epochs (required, as in a spec)
    --batch B             workload.batch_size, per worker (required, as in a spec)
    --eval-every N        workload.eval_every (default 1; the last epoch is always evaluated)
    --eval-batch N        workload.eval_batch_size (default 500)
    --crop-pad P          workload.augment.crop_pad (default 4; 0 disables the crop)
    --pad-mode M          workload.augment.pad_mode: zero (default) or reflect
    --no-flip             workload.augment.flip = false
    --workers K           method.workers with method.kind = "dp" (default 1)
    --lr, --momentum, --weight-decay, --warmup
                          optim.lr (0.1), optim.momentum (0.9), optim.weight_decay (5e-4),
                          optim.warmup_epochs (0); optim.name = "sgd", nesterov = false, schedule = "cosine"
    --seed S              seed (the run seed; here it seeds PyTorch's initialisation, data order and crops)

What is the same as sdp, by construction:
- Model: the CIFAR ResNet family of src/models/resnet.rs (3x3 stem conv + BN + ReLU, no max-pool, BasicBlocks
  whose first block of every stage after the first has stride 2, 1x1-conv + BN projection shortcuts where the
  shape changes, global average pool, linear head), `ResNet` of scripts/pytorch_step.py. Initialisation has the
  same distributions (PyTorch's defaults: conv and linear weights and the linear bias U(+-1/sqrt(fan_in)), BN
  weight 1 and bias 0) but other draws.
- Data: the files of each split in sdp's order (classes sorted by name, files by name), and the SAME subset:
  `ImageSet::subset` (each class's indices shuffled by rand 0.9's Fisher-Yates with a ChaCha8 stream
  `seed::rng(data_seed, Data, u64::MAX, 0)`, classes taken round-robin, kept indices sorted) is reproduced
  here bit for bit (ChaCha8, SHA-256 stream seeding and rand's `IncreasingUniform` below). Checked against
  indices dumped from sdp's `ImageSet::subset` on the cifar10-jpeg-q75 tree: identical for train 10,000 (data seed 0),
  train 1,000 (data seed 1) and test 2,000 (data seed 0), and the first 70 ChaCha8 words agree.
  `--print-subset OUT` writes the selection as JSON for such a comparison.
- Normalisation: per-channel mean and std of the WHOLE training split (before the subset is taken), as
  `data::folder::load_folder` computes them with `data::channel_stats` (population std over all pixels),
  applied as v * 1/(255 std) - mean/std in float32.
- Augmentation: a random crop with offsets uniform in [-pad, pad] reading zero pixels (pad-mode zero, pixel
  value 0 before normalisation, as torchvision) or the image mirrored about its border without repeating it
  (reflect, as torchvision's `padding_mode="reflect"`), and a horizontal flip with probability 1/2.
- DP step: each of the K workers runs forward and backward on its own batch of B images in train mode, so
  BatchNorm normalises with the statistics of that worker's B images; the K gradients are averaged; every
  worker starts from the same BN running statistics and the new running statistics are the mean of the
  K workers' updated ones (what sdp's `train::dp_step` computes); one SGD step (momentum 0.9, dampening 0,
  nesterov false, weight decay 5e-4 on every parameter, PyTorch's rule, which sdp's optimizer implements).
  An epoch is floor(train / (K B)) steps (the remainder is dropped, as sdp's loader does).
- Learning rate: set before every step by `lr_at` of src/optim.rs: linear warm-up (step+1)/warmup_steps * lr
  over warmup_epochs * steps_per_epoch steps, then a cosine from lr to 0 over the remaining steps.
- Evaluation: the test subset without augmentation, normalised with the training constants, eval mode,
  batches of --eval-batch; test_loss is the mean cross-entropy, test_acc a fraction.

What differs:
- Random draws: PyTorch's generator (seeded by --seed) initialises the weights and draws the epoch
  permutations, crops and flips; sdp draws them from its ChaCha8 streams. Runs agree in distribution, not
  bit for bit, so compare means over seeds.
- JPEG decoding: Pillow (libjpeg-turbo) here, the `image` crate (zune-jpeg) in sdp. On 200 images of
  the cifar10-jpeg-q75 tree (every 250th training file) 22 % of the decoded bytes differ, by at most 4 levels (mean
  absolute difference 0.31 levels): the two runs see very slightly different pixels, and the normalisation
  constants computed from them differ accordingly: on the 50,000 training images of the cifar10-jpeg-q75 tree, mean
  0.4913 0.4821 0.4465 and std 0.2452 0.2428 0.2606 here against sdp's 0.4923 0.4813 0.4479 and 0.2452 0.2428
  0.2606 (`sdp data info folder:cifar10-jpeg-q75`), a shift of at most 0.006 standard deviations.
- Worker batches: sdp's worker k takes entries k, K+k, 2K+k, ... of the epoch's permutation; here worker
  k takes the k-th contiguous slice of B. Both are uniformly random disjoint batches.
- Floating point: PyTorch's kernels and summation orders.

PyTorch uses --threads CPU threads (default 2, torch.set_num_threads).
"""
import argparse
import csv
import hashlib
import math
import os
import struct
import sys
import time

# OpenMP threads that spin while they wait for work are what makes PyTorch 5x slower here when other processes
# share the cores (a DP step of 4 x 64 images at width 16: ~10 s spinning, ~2 s passive, measured on 2 loaded
# cores); set before torch is imported, and only if the caller did not choose.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the working tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_step import ResNet  # noqa: E402  (the same architecture and parameter names as sdp's)

M32 = 0xFFFFFFFF

# ---------------------------------------------------------------------------------------------------------
# sdp's random streams: src/seed.rs (SHA-256 of the stream name -> ChaCha8Rng::from_seed), rand_chacha 0.9.


def stream_seed(seed, stream, a, b):
    h = hashlib.sha256()
    h.update(b"sdp-stream-v1")
    h.update(struct.pack("<Q", seed))
    h.update(stream.encode())
    h.update(struct.pack("<Q", a))
    h.update(struct.pack("<Q", b))
    return h.digest()


def _rotl(v, n):
    return ((v << n) & M32) | (v >> (32 - n))


def _chacha8_block(key, counter):
    # "expand 32-byte k", the 8 key words, a 64-bit block counter, a 64-bit stream id (0).
    s = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *key, counter & M32, counter >> 32, 0, 0]
    x = list(s)

    def qr(a, b, c, d):
        x[a] = (x[a] + x[b]) & M32
        x[d] = _rotl(x[d] ^ x[a], 16)
        x[c] = (x[c] + x[d]) & M32
        x[b] = _rotl(x[b] ^ x[c], 12)
        x[a] = (x[a] + x[b]) & M32
        x[d] = _rotl(x[d] ^ x[a], 8)
        x[c] = (x[c] + x[d]) & M32
        x[b] = _rotl(x[b] ^ x[c], 7)

    for _ in range(4):  # 8 rounds = 4 double rounds
        qr(0, 4, 8, 12)
        qr(1, 5, 9, 13)
        qr(2, 6, 10, 14)
        qr(3, 7, 11, 15)
        qr(0, 5, 10, 15)
        qr(1, 6, 11, 12)
        qr(2, 7, 8, 13)
        qr(3, 4, 9, 14)
    return [(x[i] + s[i]) & M32 for i in range(16)]


class ChaCha8:
    """rand_chacha's ChaCha8Rng: a buffer of 4 blocks (64 words) read word by word."""

    def __init__(self, seed32):
        self.key = list(struct.unpack("<8I", seed32))
        self.counter = 0
        self.buf = []
        self.idx = 0

    def next_u32(self):
        if self.idx >= len(self.buf):
            self.buf = []
            for i in range(4):
                self.buf += _chacha8_block(self.key, self.counter + i)
            self.counter += 4
            self.idx = 0
        v = self.buf[self.idx]
        self.idx += 1
        return v


def _range_u32(rng, bound):
    """rand 0.9's `random_range(..bound)` for u32 (Canon's method, the default non-`unbiased` variant)."""
    hi, lo = divmod(rng.next_u32() * bound, 1 << 32)
    if lo > ((-bound) & M32):
        new_hi = (rng.next_u32() * bound) >> 32
        if lo + new_hi > M32:
            hi += 1
    return hi


def _bound_u32(m):
    product, current = m, m + 1
    while product * current <= M32:
        product *= current
        current += 1
    return product, current - m


def shuffle(v, rng):
    """rand 0.9's `SliceRandom::shuffle` (Fisher-Yates driven by `IncreasingUniform`)."""
    if len(v) <= 1:
        return
    n, chunk, remaining = 0, 0, 1  # IncreasingUniform::new(rng, 0)
    for i in range(len(v)):
        next_n = n + 1
        if remaining == 0:
            bound, count = _bound_u32(next_n)
            chunk = _range_u32(rng, bound)
            next_rem = count - 1
        else:
            next_rem = remaining - 1
        if next_rem == 0:
            j = chunk
        else:
            j = chunk % next_n
            chunk //= next_n
        remaining, n = next_rem, next_n
        v[i], v[j] = v[j], v[i]


def subset_indices(labels, n, data_seed):
    """The indices `ImageSet::subset(n, data_seed)` keeps (src/data/mod.rs), in ascending order."""
    if n >= len(labels):
        return list(range(len(labels)))
    by_class = [[] for _ in range(max(labels) + 1)]
    for i, label in enumerate(labels):
        by_class[label].append(i)
    rng = ChaCha8(stream_seed(data_seed, "data", 2**64 - 1, 0))
    for c in by_class:
        shuffle(c, rng)
    keep, r = [], 0
    while len(keep) < n:
        for c in by_class:
            if r < len(c) and len(keep) < n:
                keep.append(c[r])
        r += 1
    return sorted(keep)


# ---------------------------------------------------------------------------------------------------------
# Data: src/data/folder.rs's listing and decoding, data::channel_stats, data::augment.


def list_split(root, split, classes=None):
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        sys.exit(f"error: missing split: {d} is not a directory (expected ROOT/train/<class>/ and ROOT/test/<class>/)")
    names = sorted(e for e in os.listdir(d) if not e.startswith(".") and os.path.isdir(os.path.join(d, e)))
    if classes is not None and names != classes:
        sys.exit(f"error: {root}: class folders of train and test differ")
    files = []
    for label, c in enumerate(names):
        for f in sorted(os.listdir(os.path.join(d, c))):
            if not f.startswith("."):
                files.append((os.path.join(d, c, f), label))
    return names, files


def decode(files):
    from PIL import Image

    first = np.asarray(Image.open(files[0][0]).convert("RGB"))
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        out[i] = np.asarray(Image.open(path).convert("RGB"))
    return out


def load_decoded(root, train_files, test_files):
    """Both splits decoded, from `<root>/.pytorch-twin-v1.npz` when it matches the files (paths, sizes and
    modification times), else decoded now and saved there: the split is decoded once, not once per run."""
    h = hashlib.sha256()
    for path, label in train_files + test_files:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = h.hexdigest()
    cache = os.path.join(root, ".pytorch-twin-v1.npz")
    try:
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return z["train"], z["test"]
    except (OSError, KeyError, ValueError):
        pass
    train, test = decode(train_files), decode(test_files)
    try:
        tmp = cache + ".tmp.npz"
        np.savez(tmp, key=np.array(key), train=train, test=test)
        os.replace(tmp, cache)
    except OSError as e:
        print(f"warning: could not write the decode cache {cache}: {e}", file=sys.stderr)
    return train, test


def channel_stats(images):
    """Per-channel mean and population std in [0, 1] units over every pixel (f64 sums, then f32)."""
    v = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    mean = v.mean(axis=0)
    std = np.sqrt(np.maximum((v * v).mean(axis=0) - mean * mean, 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)


class Augmenter:
    """Random crop (offsets in [-pad, pad], zero or reflection padding) + flip, then normalisation."""

    def __init__(self, images_nhwc, pad, pad_mode, flip, mean, std):
        x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
        self.h, self.w = x.shape[2], x.shape[3]
        self.pad, self.flip = pad, flip
        if pad > 0:
            mode = "constant" if pad_mode == "zero" else "reflect"
            # (N, C, H, W) -> (N, C, H+2p, W+2p); reflect needs a float tensor, the values stay integers.
            x = F.pad(x.float(), (pad, pad, pad, pad), mode=mode).to(torch.uint8)
        self.padded = x
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, -1, 1, 1)

    def normalise(self, x_uint8):
        return x_uint8.float() * self.scale + self.shift

    def batch(self, idx, gen):
        idx = torch.as_tensor(idx)
        n, p = len(idx), self.pad
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        flip = (torch.rand(n, generator=gen) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        ar_h, ar_w = torch.arange(self.h), torch.arange(self.w)
        rows = oy[:, None] + ar_h[None, :]  # (n, H)
        cols_src = torch.where(flip[:, None], (self.w - 1 - ar_w)[None, :], ar_w[None, :])
        cols = ox[:, None] + cols_src  # (n, W): a flip mirrors the crop window, as sdp's loader does
        c = torch.arange(self.padded.shape[1])
        x = self.padded[idx[:, None, None, None], c[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        return self.normalise(x)

    def plain(self, idx):
        p = self.pad
        x = self.padded[torch.as_tensor(idx)][:, :, p : p + self.h, p : p + self.w]
        return self.normalise(x)


# ---------------------------------------------------------------------------------------------------------
# Training: src/optim.rs::lr_at and src/train/dp.rs::dp_step.


def lr_at(lr, warmup_epochs, step, total, per_epoch):
    per_epoch = max(per_epoch, 1)
    warmup = warmup_epochs * per_epoch
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1.0)
    t = min(max((step - warmup) / span, 0.0), 1.0)
    return 0.5 * lr * (1.0 + math.cos(math.pi * t))


def bn_buffers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def dp_step(model, opt, batches, lr):
    """K workers' forward/backward on their own batches, gradients and BN running statistics averaged, one SGD
    step. Returns the mean loss over the workers."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    k = len(batches)
    bns = bn_buffers(model)
    start = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    sums = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in start]
    loss_sum = 0.0
    for x, y in batches:
        with torch.no_grad():
            for m, (a, b) in zip(bns, start):
                m.running_mean.copy_(a)
                m.running_var.copy_(b)
        loss = F.cross_entropy(model(x), y)
        (loss / k).backward()
        loss_sum += loss.item()
        for m, (sa, sb) in zip(bns, sums):
            sa += m.running_mean
            sb += m.running_var
    with torch.no_grad():
        for m, (sa, sb) in zip(bns, sums):
            m.running_mean.copy_(sa / k)
            m.running_var.copy_(sb / k)
    opt.step()
    return loss_sum / k


@torch.no_grad()
def evaluate(model, aug, n, batch):
    model.eval()
    loss_sum, correct = 0.0, 0
    for s in range(0, n, batch):
        idx = list(range(s, min(s + batch, n)))
        x, y = aug.plain(idx), aug.labels[idx]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y).item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return loss_sum / n, correct / n


# ---------------------------------------------------------------------------------------------------------
# Command line.

DEFAULTS = {
    "train_samples": None,
    "test_samples": None,
    "data_seed": 0,
    "widths": [64, 128, 256, 512],
    "depths": [2, 2, 2, 2],
    "eval_every": 1,
    "eval_batch": 500,
    "crop_pad": 4,
    "pad_mode": "zero",
    "flip": True,
    "workers": 1,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup": 0.0,
    "seed": 0,
}

# (section, key in an sdp spec) -> flag destination.
SPEC_FIELDS = {
    ("workload", "train_samples"): "train_samples",
    ("workload", "test_samples"): "test_samples",
    ("workload", "data_seed"): "data_seed",
    ("workload", "widths"): "widths",
    ("workload", "depths"): "depths",
    ("workload", "epochs"): "epochs",
    ("workload", "batch_size"): "batch",
    ("workload", "eval_every"): "eval_every",
    ("workload", "eval_batch_size"): "eval_batch",
    ("optim", "lr"): "lr",
    ("optim", "momentum"): "momentum",
    ("optim", "weight_decay"): "weight_decay",
    ("optim", "warmup_epochs"): "warmup",
    ("method", "workers"): "workers",
}


def from_spec(path, data_dir):
    """Scalar fields of an sdp spec as flag values; a grid (a list where a scalar belongs) is an error unless
    it is overridden on the command line, so it is returned as such and checked after parsing."""
    import tomllib

    with open(path, "rb") as f:
        spec = tomllib.load(f)
    out = {}
    for (sec, key), dest in SPEC_FIELDS.items():
        if key in spec.get(sec, {}):
            out[dest] = spec[sec][key]
    aug = spec.get("workload", {}).get("augment", {})
    for key, dest in [("crop_pad", "crop_pad"), ("pad_mode", "pad_mode"), ("flip", "flip")]:
        if key in aug:
            out[dest] = aug[key]
    ds = spec.get("workload", {}).get("dataset", "")
    if isinstance(ds, str) and ds.startswith("folder:"):
        out["data"] = os.path.join(data_dir, ds[len("folder:"):])
    seeds = spec.get("seeds", spec.get("seed"))
    if isinstance(seeds, list) and seeds:
        out["seed"] = seeds[0]
    elif isinstance(seeds, int):
        out["seed"] = seeds
    opt, method = spec.get("optim", {}), spec.get("method", {})
    work = spec.get("workload", {})
    if work.get("model") == "wrn18" and "widths" not in work:
        out["widths"] = [128, 256, 512, 1024]  # ResNetConfig::wrn18: resnet18 at twice the width
    for sec, key, want in [("optim", "name", "sgd"), ("optim", "schedule", "cosine"), ("optim", "nesterov", False),
                           ("method", "kind", "dp"), ("workload", "norm", "batch")]:
        v = {"optim": opt, "method": method, "workload": work}[sec].get(key, want)
        if v != want and not (isinstance(v, list) and want in v):
            sys.exit(f"error: {path}: {sec}.{key} = {v!r}; this twin trains {sec}.{key} = {want!r} only")
    if work.get("model") not in ("resnet", "resnet18", "wrn18"):
        sys.exit(f"error: {path}: workload.model = {work.get('model')!r}; this twin trains the ResNet family only")
    return out


def ints(s):
    return [int(v) for v in s.split(",")]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", help="an sdp spec whose scalar fields give the defaults of the flags below")
    p.add_argument("--data-dir", default="datasets", help="where a relative folder of --spec is looked up")
    p.add_argument("--data", help="ImageFolder root with train/ and test/ (workload.dataset = folder:ROOT)")
    p.add_argument("--train-samples", type=int)
    p.add_argument("--test-samples", type=int)
    p.add_argument("--data-seed", type=int)
    p.add_argument("--widths", type=ints)
    p.add_argument("--depths", type=ints)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch", type=int, help="per-worker batch (workload.batch_size)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batch", type=int)
    p.add_argument("--crop-pad", type=int)
    p.add_argument("--pad-mode", choices=["zero", "reflect"])
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None)
    p.add_argument("--workers", type=int, help="K (method.workers)")
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup", type=float, help="warm-up epochs (optim.warmup_epochs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--csv", help="where to write the evaluations (default: pytorch_train_seed<S>.csv)")
    p.add_argument("--print-subset", metavar="OUT",
                   help="write the train and test subset indices (JSON) and stop: compare with sdp's")
    a = p.parse_args(argv)
    vals = dict(DEFAULTS)
    if a.spec:
        vals.update(from_spec(a.spec, a.data_dir))
    for k, v in vars(a).items():
        if v is not None or k not in vals:  # a flag given wins; an absent one leaves the spec's or the default
            vals[k] = v
    for k in ["data", "epochs", "batch"]:
        if vals.get(k) is None:
            p.error(f"--{k} is required (or a --spec that sets it)")
    for k, v in vals.items():
        grid = isinstance(v, list) and (k not in ("widths", "depths") or any(isinstance(e, list) for e in v))
        if grid:
            p.error(f"--spec gives a grid for {k} ({v}): pass one value with --{k.replace('_', '-')}")
    for k in ["epochs", "batch", "workers", "eval_every", "eval_batch"]:
        if vals[k] < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {vals[k]}")
    if len(vals["widths"]) != len(vals["depths"]):
        p.error(f"--widths has {len(vals['widths'])} stages but --depths has {len(vals['depths'])}")
    if not 0 <= vals["warmup"] <= vals["epochs"]:
        p.error(f"--warmup must be in [0, --epochs], got {vals['warmup']}")
    return argparse.Namespace(**vals)


def main(argv=None):
    a = parse_args(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(a.threads)
    t0 = time.time()
    classes, train_files = list_split(a.data, "train")
    _, test_files = list_split(a.data, "test", classes)
    train_keep = subset_indices([l for _, l in train_files], a.train_samples or len(train_files), a.data_seed)
    test_keep = subset_indices([l for _, l in test_files], a.test_samples or len(test_files), a.data_seed)
    if a.print_subset:
        import json

        with open(a.print_subset, "w") as f:
            json.dump({"train": train_keep, "test": test_keep}, f)
        print(f"subset indices: {len(train_keep)} train, {len(test_keep)} test -> {a.print_subset}")
        return
    train_all, test_all = load_decoded(a.data, train_files, test_files)
    mean, std = channel_stats(train_all)  # over the whole training split, as sdp's folder reader does
    train_x, test_x = train_all[train_keep], test_all[test_keep]
    del train_all, test_all
    train_y = torch.tensor([train_files[i][1] for i in train_keep])
    test_y = torch.tensor([test_files[i][1] for i in test_keep])
    print(f"data {a.data}: {len(train_keep)} train / {len(test_keep)} test images, {len(classes)} classes, "
          f"mean {' '.join(f'{v:.4f}' for v in mean)} std {' '.join(f'{v:.4f}' for v in std)} "
          f"({time.time() - t0:.1f} s)",
          file=sys.stderr)
    train_aug = Augmenter(train_x, a.crop_pad, a.pad_mode, a.flip, mean, std)
    test_aug = Augmenter(test_x, 0, "zero", False, mean, std)
    test_aug.labels = test_y

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed + 1_000_003)
    model = ResNet(a.widths, a.depths, len(classes))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                          nesterov=False)
    k, b = a.workers, a.batch
    n = len(train_keep)
    per_epoch = n // (k * b)
    if per_epoch == 0:
        sys.exit(f"error: {n} training samples are fewer than one step of {k} workers x batch {b}")
    total = per_epoch * a.epochs
    print(f"pytorch {torch.__version__}, {torch.get_num_threads()} threads; DP K={k} x batch {b}, "
          f"{per_epoch} steps/epoch x {a.epochs} epochs, lr {a.lr} warm-up {a.warmup} epochs, pad {a.crop_pad} "
          f"{a.pad_mode}, flip {a.flip}, seed {a.seed}, params {sum(p.numel() for p in model.parameters())}",
          file=sys.stderr)
    rows, step, start = [], 0, time.time()
    for epoch in range(1, a.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        loss_sum, t_epoch, lr = 0.0, time.time(), 0.0
        for s in range(per_epoch):
            lr = lr_at(a.lr, a.warmup, step, total, per_epoch)
            chunk = perm[s * k * b:(s + 1) * k * b]
            batches = []
            for w in range(k):
                idx = chunk[w * b:(w + 1) * b]
                batches.append((train_aug.batch(idx, gen), train_y[idx]))
            loss = dp_step(model, opt, batches, lr)
            if not math.isfinite(loss):
                sys.exit(f"error: training loss is {loss} at step {step + 1}: the run diverged")
            loss_sum += loss
            step += 1
        img_per_s = per_epoch * k * b / max(time.time() - t_epoch, 1e-9)
        if epoch % a.eval_every == 0 or epoch == a.epochs:
            test_loss, test_acc = evaluate(model, test_aug, len(test_keep), a.eval_batch)
            row = {"epoch": epoch, "step": step, "train_loss": loss_sum / per_epoch, "test_loss": test_loss,
                   "test_acc": test_acc, "lr": lr, "img_per_s": img_per_s, "wall_s": time.time() - start}
            rows.append(row)
            print(f"epoch {epoch} step {step} train_loss {row['train_loss']:.4f} test_loss {test_loss:.4f} "
                  f"test_acc {test_acc:.4f} {img_per_s:.0f} img/s {row['wall_s']:.1f} s", flush=True)
    out = a.csv or f"pytorch_train_seed{a.seed}.csv"
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"csv: {out}", file=sys.stderr)
    print(f"final_test_acc={rows[-1]['test_acc']:.4f}")


if __name__ == "__main__":
    main()
