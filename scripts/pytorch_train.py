#!/usr/bin/env python3
"""The PyTorch twin of an `sdp` training run, data parallelism (DP) or SDP with block masking in the forward
regime: the same model, data subset, normalisation, augmentation, optimizer, schedule, K x batch, and for SDP
the same holder assignment, averaging and evaluation modes, trained by PyTorch, so that sdp's runs can be
checked against the field's reference implementation.

    python3 scripts/pytorch_train.py --data datasets/cifar10-jpeg-q75 --train-samples 8000 --test-samples 2000 \\
        --widths 16,32,64,128 --depths 2,2,2,2 --workers 4 --batch 64 --epochs 5 --lr 0.2 --warmup 0.5 \\
        --eval-every 2 --pad-mode reflect --seed 0 --csv /tmp/twin-seed0.csv
    python3 scripts/pytorch_train.py --spec experiments/mini/sdp_forward.toml --data-dir datasets --seed 1 --csv /tmp/twin-seed1.csv
    python3 scripts/pytorch_train.py --spec experiments/mini/sdp_forward.toml --data-dir datasets --kind sdp \
        --masking block --coverage 0.75 --seed 0 --csv /tmp/twin-sdp-c0.75-seed0.csv

With --spec, the spec's scalar fields set the defaults of the flags below (a `seeds` list gives its first
seed; a `method.kind` list trains its "dp" run unless --kind picks the other; any other grid axis must be
fixed with its flag; the SDP-only fields are ignored for DP, as sdp ignores them), and fields this twin
cannot train are errors: another optimizer, schedule, Nesterov, gradient clipping, norm, precision, model
family or method kind; for SDP another masking than block, the backward regime, and any of sync, sync_every,
bn_stats, rescale, resample_every, budget, eval_mode or align_every away from sdp's default.

Prints one line per evaluation and, as its LAST line, `final_test_acc=<fraction>`; writes the evaluations
to a CSV with the columns of sdp's metrics.csv without its run_id (epoch, step, train_loss, test_loss,
test_acc, lr, img_per_s, wall_s; for SDP also test_acc_ensemble, test_acc_full, test_acc_recal,
test_acc_scaled, test_acc_subnet_mean, and test_loss / test_acc are the `full` mode's, sdp's default
headline).

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
    --workers K           method.workers (default 1)
    --kind dp|sdp         method.kind (default dp)
    --masking block       method.masking (SDP; block only, sdp's default)
    --regime forward      method.regime (SDP; forward only, sdp's default)
    --coverage C          method.coverage (SDP; default 1): every block is held by m = round(C K) workers
    --lr, --momentum, --weight-decay, --warmup
                          optim.lr (0.1), optim.momentum (0.9), optim.weight_decay (5e-4),
                          optim.warmup_epochs (0); optim.name = "sgd", nesterov = false, schedule = "cosine"
    --seed S              seed (the run seed; here it seeds PyTorch's initialisation, data order and crops,
                          and, as in sdp, SDP's holder assignment and BN recalibration batches)

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

SDP (method.kind = "sdp", masking block, regime forward, sync params every step; src/train/sdp.rs,
sdp_state.rs, src/comm/local.rs), the same as sdp by construction besides the above:
- Units and holders: a Block unit is a BasicBlock's residual branch (conv1, bn1, conv2, bn2); the stem,
  the projection shortcuts and the head are shared. m = round(C K) clamped to [1, K]. The assignment is
  RECOMPUTED here, not read from sdp's workers.csv (which gives only each worker's unit count and bytes):
  `block`'s greedy byte balancing (units shuffled by the ChaCha8 stream `seed::rng(seed, Mask, 0, 0)`, stably
  sorted by decreasing size, each given to the m workers smallest by (load, a fresh u64 draw, index)).
  Checked against the same code compiled with rand 0.9.5 / rand_chacha 0.9.0: identical for seeds 0-2 and
  m = 1..4 at the mini recipe's block sizes, and it agrees with the units_held and param_bytes of the
  committed mini runs' workers.csv. The workers' held blocks are printed at the start.
- A dropped block: relu(shortcut(x)), the shared 1x1-conv + BN projection where the block has one, else
  relu(x) = x (src/models/resnet.rs, `BasicBlock::forward_t`).
- A step: each worker's forward and backward on its own batch of B images in train mode (its own BN batch
  statistics, its own running-statistics update starting from the averaged values), its local SGD step
  (momentum buffers on its held parameters only, never averaged; weight decay by PyTorch's rule), then every
  parameter and BN running mean / variance is set to the mean over the workers that hold it (the sum of the
  holders' values times 1/count, as `LocalAverager`), in the global model and in every holder. A worker is
  simulated by a full-size copy whose dropped branches are never run, stepped or averaged, which is the
  same arithmetic as sdp's physically smaller subnetwork.
- Data: worker k's step-s batch is perm[k + K (s B + j)], j < B (sdp's `worker_indices`).
- Evaluation (src/train/eval.rs `evaluate_sdp`), after every evaluated epoch: `full` (the global model, each
  coordinate its holders' mean, averaged BN statistics), `recal` (a copy of it whose BN statistics are the
  mean of the batch statistics, mean and unbiased variance, of 10 training batches in train mode without
  gradient: the first 10 runs of --eval-batch indices of sdp's `permutation(seed, usize::MAX, n)`,
  reproduced bit for bit, not augmented; the same images as sdp's up to JPEG decoding), `scaled` (the global
  model with every residual branch multiplied by m/K before the addition), `ensemble` (accuracy of the mean
  softmax of the K worker subnetworks), `subnet_mean` (the mean of the K subnetworks' accuracies). Checked
  by evaluating sdp's own saved final model (`sdp run --save-model`, block C = 0.75 seed 0) with this code:
  every mode within 0.002 of sdp's figures, test_loss within 0.001 (JPEG decoding differs); on sdp's own
  decoded pixels every mode is identical, and a training step redone from sdp's checkpoint matches sdp's
  next checkpoint to float rounding (scripts/pytorch_sdp_check.py).

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
- DP worker batches: sdp's worker k takes entries k, K+k, 2K+k, ... of the epoch's permutation; here DP's
  worker k takes the k-th contiguous slice of B (SDP's take sdp's rule). Both are uniformly random disjoint
  batches.
- Floating point: PyTorch's kernels and summation orders.

PyTorch uses --threads CPU threads (default 2, torch.set_num_threads).
"""
import argparse
import copy
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

    def next_u64(self):
        """rand_core 0.9's `BlockRng::next_u64`: two words, low first (across a refill: the last word of the
        old buffer is the low half, the first of the new one the high half)."""
        if self.idx < len(self.buf) - 1:
            lo, hi = self.buf[self.idx], self.buf[self.idx + 1]
            self.idx += 2
        else:
            lo = self.buf[-1] if self.idx == len(self.buf) - 1 else None
            self.buf = []
            for i in range(4):
                self.buf += _chacha8_block(self.key, self.counter + i)
            self.counter += 4
            if lo is None:
                lo, hi, self.idx = self.buf[0], self.buf[1], 2
            else:
                hi, self.idx = self.buf[0], 1
        return (hi << 32) | lo


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


def permutation(seed, epoch, n):
    """src/data/loader.rs's `permutation(seed, epoch, n)`: 0..n shuffled by the ChaCha8 stream
    `seed::rng(seed, Data, epoch, 0)` (epoch = usize::MAX: the BN recalibration batches)."""
    perm = list(range(n))
    shuffle(perm, ChaCha8(stream_seed(seed, "data", epoch, 0)))
    return perm


def holders(coverage, workers):
    """src/masking/mod.rs's `holders`: m = round(C K) (half away from zero) clamped to [1, K]."""
    return min(max(int(math.floor(coverage * workers + 0.5)), 1), workers)


def block_selection(sizes, workers, m, seed):
    """`holds[k][u]` of sdp's `block` masking (src/masking/block.rs, `greedy_balance` and `least_loaded` of
    src/masking/mod.rs) with its generator `seed::rng(seed, Mask, 0, 0)`: units shuffled, then stably sorted
    by decreasing parameter count; each unit goes to the m workers smallest by (load, a fresh u64 draw,
    index), one draw per worker per unit whatever the loads."""
    rng = ChaCha8(stream_seed(seed, "mask", 0, 0))
    order = list(range(len(sizes)))
    shuffle(order, rng)
    order.sort(key=lambda u: -sizes[u])  # Python's sort is stable, as Rust's sort_by
    loads = [0] * workers
    holds = [[False] * len(sizes) for _ in range(workers)]
    for u in order:
        keys = sorted((loads[k], rng.next_u64(), k) for k in range(workers))
        for _, _, k in keys[:m]:
            loads[k] += sizes[u]
            holds[k][u] = True
    return holds


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
# SDP, block masking, forward regime: src/train/sdp.rs, src/train/sdp_state.rs, src/comm/local.rs,
# src/models/resnet.rs (a dropped block), src/train/eval.rs (the evaluation modes).


def blocks_of(model):
    """(name, BasicBlock) in forward order: layer1.0, layer1.1, ... (sdp's `ResNetConfig::blocks`)."""
    return [(f"layer{s + 1}.{j}", blk) for s in range(model.n_stages)
            for j, blk in enumerate(getattr(model, f"layer{s + 1}"))]


def branch_size(blk):
    """Parameters of a block's residual branch (conv1, bn1, conv2, bn2; not the shared shortcut): the size
    of its Block unit (`ResNetConfig::maskable`)."""
    return sum(p.numel() for m in (blk.conv1, blk.bn1, blk.conv2, blk.bn2) for p in m.parameters())


def forward_plan(model, x, keep, scale=1.0):
    """`ResNet::forward_t` of src/models/resnet.rs for a plan: a held block is relu(scale * bn2(conv2(relu(
    bn1(conv1(x))))) + shortcut(x)); a dropped block is relu(shortcut(x)), its projection (1x1 conv + BN) where
    it has one, else the identity. `scale` multiplies every held branch (the `scaled` evaluation)."""
    out = F.relu(model.bn1(model.conv1(x)))
    for (_, blk), held in zip(blocks_of(model), keep):
        sc = blk.shortcut(out)
        if held:
            r = blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(out)))))
            out = F.relu((r * scale if scale != 1.0 else r) + sc)
        else:
            out = F.relu(sc)
    return model.linear(out.mean(dim=(2, 3)))


def synced_tensors(model):
    """Parameters and BN running statistics by name (what `SdpState::sync` averages; PyTorch's
    num_batches_tracked counter is not used with momentum 0.1 and is left alone)."""
    out = dict(model.named_parameters())
    out.update((n, b) for n, b in model.named_buffers() if not n.endswith("num_batches_tracked"))
    return out


class SdpWorker:
    """Worker k: its subnetwork (a copy of the global model whose dropped branches are never run, stepped
    or averaged: they take no part in anything, as if they did not exist) and its own SGD optimizer over
    the parameters it holds (momentum buffers local, never averaged)."""

    def __init__(self, global_model, keep, block_index, a):
        self.keep, self.block_index = keep, block_index
        self.model = copy.deepcopy(global_model)
        self.model.train()
        held = [p for n, p in self.model.named_parameters() if self.holds(n)]
        self.opt = torch.optim.SGD(held, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay, nesterov=False)

    def holds(self, name):
        # A branch tensor is layerS.J.{conv1,bn1,conv2,bn2}.*; the shortcut (layerS.J.shortcut.*), the stem and
        # the head are shared.
        parts = name.split(".")
        if parts[0].startswith("layer") and parts[2] != "shortcut":
            return self.keep[self.block_index[f"{parts[0]}.{parts[1]}"]]
        return True


class Sdp:
    """The global (assembled) model and the K workers; every coordinate of the global model is the mean of
    its holders' values after each step."""

    def __init__(self, model, holds, m, a):
        self.model, self.m, self.k = model, m, len(holds)
        self.names = [n for n, _ in blocks_of(model)]
        index = {n: i for i, n in enumerate(self.names)}
        self.workers = [SdpWorker(model, keep, index, a) for keep in holds]
        # Holders of every synced tensor (`LocalAverager`: the sum of the holders' values times 1/count).
        self.holders = {n: [k for k, w in enumerate(self.workers) if w.holds(n)] for n in synced_tensors(model)}

    def step(self, batches, lr):
        """`sdp_step` with sync = params, sync_every = 1: each worker's forward and backward on its own batch
        in train mode (its own BN batch statistics and running-statistics update), its local SGD step, then
        every parameter and BN running statistic set to the mean over its holders. Returns the mean loss."""
        loss_sum = 0.0
        for w, (x, y) in zip(self.workers, batches):
            for g in w.opt.param_groups:
                g["lr"] = lr
            w.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward_plan(w.model, x, w.keep), y)
            loss.backward()
            w.opt.step()
            loss_sum += loss.item()
        self.sync()
        return loss_sum / len(batches)

    @torch.no_grad()
    def sync(self):
        glob = synced_tensors(self.model)
        local = [synced_tensors(w.model) for w in self.workers]
        for name, hs in self.holders.items():
            total = local[hs[0]][name].clone()
            for k in hs[1:]:
                total += local[k][name]
            mean = total * (1.0 / len(hs))
            glob[name].copy_(mean)
            for k in hs:
                local[k][name].copy_(mean)

    @torch.no_grad()
    def recalibrated(self, train_aug, idx_batches):
        """`recalibrate_bn`: a copy of the global model whose BN statistics are the mean of the batch
        statistics (mean, unbiased variance) of the given training batches, in train mode, no gradient
        (PyTorch's momentum=None cumulative average from reset statistics is exactly that mean)."""
        net = copy.deepcopy(self.model)
        for bn in bn_buffers(net):
            bn.reset_running_stats()
            bn.momentum = None
        net.train()
        for idx in idx_batches:
            forward_plan(net, train_aug.plain(idx), [True] * len(self.names))
        net.eval()
        return net

    @torch.no_grad()
    def evaluate(self, test_aug, n, batch, train_aug, recal_batches):
        """`evaluate_sdp`: (test loss of `full`, {mode: accuracy}) for full, recal, scaled, ensemble,
        subnet_mean."""
        full_keep = [True] * len(self.names)
        recal = self.recalibrated(train_aug, recal_batches)
        frac = self.m / self.k
        self.model.eval()
        for w in self.workers:
            w.model.eval()
        correct = {"full": 0, "recal": 0, "scaled": 0, "ensemble": 0}
        sub_correct, loss_sum = [0] * self.k, 0.0
        for s in range(0, n, batch):
            idx = list(range(s, min(s + batch, n)))
            x, y = test_aug.plain(idx), test_aug.labels[idx]
            logits = forward_plan(self.model, x, full_keep)
            loss_sum += F.cross_entropy(logits, y).item() * len(idx)
            correct["full"] += (logits.argmax(1) == y).sum().item()
            correct["recal"] += (forward_plan(recal, x, full_keep).argmax(1) == y).sum().item()
            scaled = forward_plan(self.model, x, full_keep, frac) if frac < 1.0 else logits
            correct["scaled"] += (scaled.argmax(1) == y).sum().item()
            probs = 0.0
            for k, w in enumerate(self.workers):
                out = forward_plan(w.model, x, w.keep)
                sub_correct[k] += (out.argmax(1) == y).sum().item()
                probs = probs + F.softmax(out, dim=1)
            correct["ensemble"] += ((probs / self.k).argmax(1) == y).sum().item()
        self.model.train()
        for w in self.workers:
            w.model.train()
        modes = {mode: c / n for mode, c in correct.items()}
        modes["subnet_mean"] = sum(sub_correct) / n / self.k
        return loss_sum / n, modes


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
    "kind": "dp",
    "masking": "block",
    "regime": "forward",
    "coverage": 1.0,
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
    ("method", "kind"): "kind",
    ("method", "masking"): "masking",
    ("method", "regime"): "regime",
    ("method", "coverage"): "coverage",
}

# SDP fields this twin trains at one value only (sdp's defaults), checked when the run is SDP.
SDP_FIXED = [("sync", "params"), ("sync_every", 1), ("bn_stats", "average"), ("rescale", False),
             ("resample_every", 0), ("budget", "same_steps"), ("eval_mode", "full"), ("align_every", 0)]


def from_spec(path, data_dir, kind=None):
    """Scalar fields of an sdp spec as flag values; a grid (a list where a scalar belongs) is an error unless
    it is overridden on the command line, so it is returned as such and checked after parsing. `kind` is
    --kind where given: the SDP-only fields are checked for an SDP run only (they do not apply to DP)."""
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
    if isinstance(out.get("kind"), list) and kind is None and "dp" in out["kind"]:
        out["kind"] = "dp"  # a method.kind grid holding dp trains its DP run unless --kind picks another
    seeds = spec.get("seeds", spec.get("seed"))
    if isinstance(seeds, list) and seeds:
        out["seed"] = seeds[0]
    elif isinstance(seeds, int):
        out["seed"] = seeds
    opt, method = spec.get("optim", {}), spec.get("method", {})
    work = spec.get("workload", {})
    if work.get("model") == "wrn18" and "widths" not in work:
        out["widths"] = [128, 256, 512, 1024]  # ResNetConfig::wrn18: resnet18 at twice the width
    fixed = [("optim", "name", "sgd"), ("optim", "schedule", "cosine"), ("optim", "nesterov", False),
             ("optim", "clip_grad_norm", 0), ("workload", "norm", "batch"), ("workload", "precision", "f32")]
    if (kind or method.get("kind", "dp")) == "sdp":
        fixed += [("method", key, want) for key, want in SDP_FIXED]
    for sec, key, want in fixed:
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
    p.add_argument("--kind", choices=["dp", "sdp"], help="method.kind")
    p.add_argument("--masking", help="method.masking (SDP): block only")
    p.add_argument("--regime", help="method.regime (SDP): forward only")
    p.add_argument("--coverage", type=float, help="method.coverage C (SDP), in (0, 1]")
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
        vals.update(from_spec(a.spec, a.data_dir, a.kind))
    for k, v in vars(a).items():
        if v is not None or k not in vals:  # a flag given wins; an absent one leaves the spec's or the default
            vals[k] = v
    for k in ["data", "epochs", "batch"]:
        if vals.get(k) is None:
            p.error(f"--{k} is required (or a --spec that sets it)")
    if vals["kind"] == "dp":  # the SDP-only fields do not apply to DP (a grid over them included)
        vals.update(masking=DEFAULTS["masking"], regime=DEFAULTS["regime"], coverage=DEFAULTS["coverage"])
    for k, v in vals.items():
        grid = isinstance(v, list) and (k not in ("widths", "depths") or any(isinstance(e, list) for e in v))
        if grid:
            p.error(f"--spec gives a grid for {k} ({v}): pass one value with --{k.replace('_', '-')}")
    for k in ["epochs", "batch", "workers", "eval_every", "eval_batch"]:
        if vals[k] < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {vals[k]}")
    if vals["kind"] not in ("dp", "sdp"):
        p.error(f"method.kind = {vals['kind']!r}: this twin trains dp and sdp only")
    if vals["kind"] == "sdp":
        for k, want in [("masking", "block"), ("regime", "forward")]:
            if vals[k] != want:
                p.error(f"method.{k} = {vals[k]!r}: this twin trains SDP with method.{k} = {want!r} only")
        if not 0 < vals["coverage"] <= 1:
            p.error(f"--coverage must be in (0, 1], got {vals['coverage']}")
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
    k, b = a.workers, a.batch
    n = len(train_keep)
    per_epoch = n // (k * b)
    if per_epoch == 0:
        sys.exit(f"error: {n} training samples are fewer than one step of {k} workers x batch {b}")
    total = per_epoch * a.epochs
    if a.kind == "dp":
        opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                              nesterov=False)
        what = "DP"
    else:
        m = holders(a.coverage, k)
        holds = block_selection([branch_size(blk) for _, blk in blocks_of(model)], k, m, a.seed)
        sdp = Sdp(model, holds, m, a)
        # The BN recalibration batches: the first 10 runs of --eval-batch indices of permutation(seed, usize::MAX).
        recal_perm = permutation(a.seed, 2**64 - 1, n)
        eb = min(a.eval_batch, n)
        recal_batches = [recal_perm[i:i + eb] for i in range(0, n, eb)][:10]
        recal_batches = [r for r in recal_batches if len(r) >= 2]
        what = f"SDP block forward C={a.coverage} (m={m})"
        for w, keep in enumerate(holds):
            print(f"worker {w} holds {' '.join(nm for nm, h in zip(sdp.names, keep) if h)}", file=sys.stderr)
    print(f"pytorch {torch.__version__}, {torch.get_num_threads()} threads; {what} K={k} x batch {b}, "
          f"{per_epoch} steps/epoch x {a.epochs} epochs, lr {a.lr} warm-up {a.warmup} epochs, pad {a.crop_pad} "
          f"{a.pad_mode}, flip {a.flip}, seed {a.seed}, params {sum(p.numel() for p in model.parameters())}",
          file=sys.stderr)
    rows, step, start = [], 0, time.time()
    for epoch in range(1, a.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        loss_sum, t_epoch, lr = 0.0, time.time(), 0.0
        for s in range(per_epoch):
            lr = lr_at(a.lr, a.warmup, step, total, per_epoch)
            batches = []
            for w in range(k):
                if a.kind == "dp":  # the w-th contiguous run of b in this step's K b entries
                    idx = perm[s * k * b + w * b:s * k * b + (w + 1) * b]
                else:  # sdp's rule (src/data/loader.rs `worker_indices`): perm[w + K (s b + j)], j < b
                    idx = perm[w + k * s * b:w + k * (s + 1) * b:k]
                batches.append((train_aug.batch(idx, gen), train_y[idx]))
            loss = dp_step(model, opt, batches, lr) if a.kind == "dp" else sdp.step(batches, lr)
            if not math.isfinite(loss):
                sys.exit(f"error: training loss is {loss} at step {step + 1}: the run diverged")
            loss_sum += loss
            step += 1
        img_per_s = per_epoch * k * b / max(time.time() - t_epoch, 1e-9)
        if epoch % a.eval_every == 0 or epoch == a.epochs:
            if a.kind == "dp":
                test_loss, test_acc = evaluate(model, test_aug, len(test_keep), a.eval_batch)
                modes = {}
            else:
                test_loss, modes = sdp.evaluate(test_aug, len(test_keep), a.eval_batch, train_aug, recal_batches)
                test_acc = modes["full"]  # method.eval_mode = "full", sdp's default headline
            row = {"epoch": epoch, "step": step, "train_loss": loss_sum / per_epoch, "test_loss": test_loss,
                   "test_acc": test_acc, "lr": lr, "img_per_s": img_per_s, "wall_s": time.time() - start}
            row.update((f"test_acc_{mode}", modes[mode]) for mode in sorted(modes))  # metrics.csv's order
            rows.append(row)
            shown = "".join(f" {mode} {v:.4f}" for mode, v in sorted(modes.items()))
            print(f"epoch {epoch} step {step} train_loss {row['train_loss']:.4f} test_loss {test_loss:.4f} "
                  f"test_acc {test_acc:.4f}{shown} {img_per_s:.0f} img/s {row['wall_s']:.1f} s", flush=True)
    out = a.csv or f"pytorch_train_seed{a.seed}.csv"
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"csv: {out}", file=sys.stderr)
    print(f"final_test_acc={rows[-1]['test_acc']:.4f}")


if __name__ == "__main__":
    main()
