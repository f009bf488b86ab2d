#!/usr/bin/env python3
"""Checks sdp's SDP (block masking, forward regime) against the PyTorch twin of scripts/pytorch_train.py on
sdp's OWN state and pixels, where the two must agree up to floating-point rounding (training runs can only
agree in distribution):

- `step`: sdp's checkpoint after step s and its checkpoint after step s+1 of the same run (two runs that
  differ only in workload.epochs, one step per epoch); the twin redoes step s+1 (`Sdp.step`) from the first
  on sdp's exact batch (its decoded pixels from its cache `<dataset>/.sdp-cache-v1.bin`, its permutation and
  its augmentation draws `data::augment::draw`), in float64, and compares every worker's gradient (recovered
  from sdp's momentum buffers: buf' = momentum buf + g + weight_decay p) and every tensor of the second
  checkpoint (global model, workers' subnetworks, momentum buffers). The twin's own float32 gradients are
  compared with the float64 ones too, as the scale of float32 rounding.
- `eval`: sdp's saved final global model (`sdp run --save-model`) evaluated by the twin in every mode
  (full, recal, scaled, ensemble, subnet_mean) on sdp's pixels, beside the last row of the run's metrics.csv.

    for e in 1 2; do sdp run experiments/mini/sdp_forward.toml --set method.kind=sdp --set method.masking=block \\
        --set method.coverage=0.75 --set workload.train_samples=256 --set workload.epochs=$e \\
        --set optim.warmup_epochs=0 --set seeds=[0] --results-dir /tmp/step$e --keep-checkpoints --no-memprobe; done
    python3 scripts/pytorch_sdp_check.py step /tmp/step1/mini-cifar10-jpeg-q75/*/ /tmp/step2/mini-cifar10-jpeg-q75/*/
    sdp run experiments/mini/sdp_forward.toml --set method.kind=sdp --set method.masking=block \\
        --set method.coverage=0.75 --set seeds=[0] --results-dir /tmp/full --save-model --no-memprobe
    python3 scripts/pytorch_sdp_check.py eval /tmp/full/mini-cifar10-jpeg-q75/*/

Run directories are sdp's (manifest.json, checkpoint/, model.safetensors, metrics.csv); the spec is read from
the manifest, the dataset's cache from --data-dir (default datasets, as `sdp run`).

Found on the mini recipe (sdp 0.1.0, torch 2.15.0 CPU), C = 0.75 seed 0 and C = 0.5 seed 1, step 2: the
step's mean loss equal to 7 digits; per-tensor gradient error against float64 about 1e-6 for most workers
(the twin's float32 likewise), up to 1e-2 for a worker where a ReLU input within float32 rounding of 0
changes sign (in sdp's float32 or the twin's: the same size of error, on different workers); every tensor
after the step (models, BN statistics, momentum buffers) within a median 1e-6 of the float64 step. Every
evaluation mode of sdp's final models (C = 0.75, seeds 0-2, and the C = 0.5 two-step run) identical to sdp's
figures to the 4 digits printed.
"""
import argparse
import copy
import csv
import glob
import json
import os
import struct
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pytorch_train as twin  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytorch_step import ResNet  # noqa: E402

M64 = (1 << 64) - 1


def load_safetensors(path):
    """Every F32 tensor of a safetensors file, by name."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        if v["dtype"] != "F32":
            sys.exit(f"error: {path}: {name} is {v['dtype']}, expected F32")
        s, e = v["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[s:e], dtype=np.float32).copy()).reshape(v["shape"])
    return out


def sdp_cache(path):
    """sdp's decoded dataset (src/data/cache.rs): train images (N, H, W, C) u8 and labels, test likewise."""
    raw = open(path, "rb").read()
    if raw[:8] != b"SDPCACHE" or struct.unpack_from("<I", raw, 8)[0] != 1:
        sys.exit(f"error: {path} is not an sdp cache of format 1")
    o = 8 + 4 + 32
    h, w, c, n_classes = struct.unpack_from("<4I", raw, o)
    n_train, n_test = struct.unpack_from("<2Q", raw, o + 16)
    o += 32
    for _ in range(n_classes):
        o += 4 + struct.unpack_from("<I", raw, o)[0]
    labels = np.frombuffer(raw, np.uint32, n_train + n_test, o).astype(np.int64)
    o += 4 * (n_train + n_test)
    images = np.frombuffer(raw, np.uint8, (n_train + n_test) * h * w * c, o).reshape(-1, h, w, c)
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


def augment_draw(key, index):
    """`data::augment::draw`: the SplitMix64 finaliser of key ^ index * golden."""
    z = key ^ ((index * 0x9E3779B97F4A7C15) & M64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class Run:
    """An sdp run directory: its spec, sdp's pixels for it, and the twin's SDP state for it."""

    def __init__(self, run_dir, data_dir):
        self.dir = run_dir
        m = json.load(open(os.path.join(run_dir, "manifest.json")))
        self.spec = spec = m["spec"]
        me, wl = spec["method"], spec["workload"]
        if (me["kind"], me["masking"], me["regime"]) != ("sdp", "block", "forward") or wl["norm"] != "batch":
            sys.exit(f"error: {run_dir}: the twin checks SDP block masking, forward regime, BatchNorm only")
        if not wl["dataset"].startswith("folder:"):
            sys.exit(f"error: {run_dir}: workload.dataset {wl['dataset']!r} is not a folder: dataset")
        self.seed, self.k, self.b = spec["seed"], me["workers"], wl["batch_size"]
        cache = os.path.join(data_dir, wl["dataset"][len("folder:"):], ".sdp-cache-v1.bin")
        train_all, train_labels, test_all, test_labels = sdp_cache(cache)
        mean, std = twin.channel_stats(train_all)  # over the whole training split, as sdp
        tr = twin.subset_indices(train_labels.tolist(), wl["train_samples"] or len(train_labels), wl["data_seed"])
        te = twin.subset_indices(test_labels.tolist(), wl["test_samples"] or len(test_labels), wl["data_seed"])
        aug = wl["augment"]
        self.pad, self.flip = aug["crop_pad"], aug["flip"]
        self.train = twin.Augmenter(train_all[tr], self.pad, aug["pad_mode"], self.flip, mean, std)
        self.train_y = torch.from_numpy(train_labels[tr])
        self.test = twin.Augmenter(test_all[te], 0, "zero", False, mean, std)
        self.test.labels = torch.from_numpy(test_labels[te])
        self.n = len(tr)
        widths, depths = wl["widths"] or [64, 128, 256, 512], wl["depths"] or [2, 2, 2, 2]
        self.model = ResNet(widths, depths, int(train_labels.max()) + 1)
        self.m = twin.holders(me["coverage"], self.k)
        holds = twin.block_selection([twin.branch_size(b) for _, b in twin.blocks_of(self.model)], self.k, self.m,
                                     self.seed)
        o = spec["optim"]
        self.opt = argparse.Namespace(lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
        self.holds = holds

    def sdp_state(self, dtype=torch.float32):
        model = copy.deepcopy(self.model).to(dtype)
        return twin.Sdp(model, self.holds, self.m, self.opt)

    def batches(self, epoch, step_in_epoch):
        """sdp's training batches of one step: worker k's `worker_indices`, augmented with the epoch key's draws
        (crop offsets (b mod s, (b / s) mod s) - pad with s = 2 pad + 1, flip bit 40: `crop_and_flip`)."""
        perm = twin.permutation(self.seed, epoch, self.n)
        key = twin.ChaCha8(twin.stream_seed(self.seed, "augment", epoch, 0)).next_u64()
        span, out = 2 * self.pad + 1, []
        h, w = self.train.h, self.train.w
        for k in range(self.k):
            idx = [perm[k + self.k * (step_in_epoch * self.b + j)] for j in range(self.b)]
            xs = []
            for i in idx:
                bits = augment_draw(key, i)
                dy, dx = bits % span - self.pad, (bits // span) % span - self.pad
                flip = self.flip and (bits >> 40) & 1 == 1
                rows = torch.arange(h) + dy + self.pad
                cols = (w - 1 - torch.arange(w) if flip else torch.arange(w)) + dx + self.pad
                xs.append(self.train.padded[i][:, rows[:, None], cols[None, :]])
            out.append((self.train.normalise(torch.stack(xs)), self.train_y[idx]))
        return out


def load_checkpoint(run_dir):
    j = json.load(open(os.path.join(run_dir, "checkpoint", "checkpoint.json")))
    files = glob.glob(os.path.join(run_dir, "checkpoint", "state-*.safetensors"))
    if len(files) != 1:
        sys.exit(f"error: {run_dir}/checkpoint: expected one state-*.safetensors, found {len(files)}")
    return j["step"], load_safetensors(files[0])


def put_state(sdp, st):
    """Loads an sdp checkpoint into the twin's Sdp: the global model, each worker's held tensors, each worker's
    momentum buffers; checks that sdp's workers hold exactly the tensors the twin says they hold."""
    with torch.no_grad():
        for n, v in twin.synced_tensors(sdp.model).items():
            v.copy_(st[f"global/model/{n}"])
        for k, w in enumerate(sdp.workers):
            stored = {n.split("/", 2)[2] for n in st if n.startswith(f"worker{k}/model/")}
            mine = {n for n, hs in sdp.holders.items() if k in hs}
            if stored != mine:
                sys.exit(f"error: worker {k}: sdp's and the twin's held tensors differ: {sorted(stored ^ mine)}")
            tensors = twin.synced_tensors(w.model)
            for n in mine:
                tensors[n].copy_(st[f"worker{k}/model/{n}"])
            for n, p in w.model.named_parameters():
                if w.holds(n):
                    w.opt.state[p]["momentum_buffer"] = st[f"worker{k}/opt/{n}/0"].to(p.dtype).clone()


def rel(a, b):
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), 1e-30)).item()


def check_step(a):
    ra, rb = Run(a.before, a.data_dir), Run(a.after, a.data_dir)
    (s0, before), (s1, after) = load_checkpoint(a.before), load_checkpoint(a.after)
    if s1 != s0 + 1:
        sys.exit(f"error: checkpoints at steps {s0} and {s1}: need consecutive steps")
    wl = rb.spec["workload"]
    per_epoch = rb.n // (rb.k * rb.b)
    epoch, in_epoch = s0 // per_epoch + 1, s0 % per_epoch
    lr = twin.lr_at(rb.opt.lr, rb.spec["optim"]["warmup_epochs"], s0, per_epoch * wl["epochs"], per_epoch)
    batches = rb.batches(epoch, in_epoch)
    print(f"step {s1} (epoch {epoch}, lr {lr}) of {rb.k} workers x {rb.b}, C = {rb.spec['method']['coverage']} "
          f"(m = {rb.m}); held blocks per worker: {[''.join('1' if h else '0' for h in x) for x in rb.holds]}")
    # Gradients: sdp's (from its momentum buffers) and the twin's float32 against the twin's float64.
    mu, wd = rb.opt.momentum, rb.opt.weight_decay
    s32, s64 = ra.sdp_state(torch.float32), ra.sdp_state(torch.float64)
    put_state(s32, before)
    put_state(s64, before)
    print("worker  held      loss(f64)   ||g - g64|| / ||g64|| per tensor, median / max:  sdp        twin f32")
    for k, (w32, w64) in enumerate(zip(s32.workers, s64.workers)):
        x, y = batches[k]
        losses = []
        for w, xx in [(w32, x), (w64, x.double())]:
            w.model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(twin.forward_plan(w.model, xx, w.keep), y)
            loss.backward()
            losses.append(loss.item())
        e_sdp, e_32 = [], []
        p32 = dict(w32.model.named_parameters())
        for n, p in w64.model.named_parameters():
            if not w64.holds(n):
                continue
            g_sdp = (after[f"worker{k}/opt/{n}/0"].double() - mu * before[f"worker{k}/opt/{n}/0"].double()
                     - wd * before[f"worker{k}/model/{n}"].double())
            e_sdp.append(rel(g_sdp, p.grad))
            e_32.append(rel(p32[n].grad, p.grad))
        print(f"{k:6}  {''.join('1' if h else '0' for h in w64.keep)}  {losses[1]:.6f}"
              f"{'':48}{np.median(e_sdp):.1e} / {max(e_sdp):.1e}  {np.median(e_32):.1e} / {max(e_32):.1e}")
    # The whole step in float64 (local steps, then averaging among holders) against sdp's next checkpoint.
    put_state(s64, before)
    loss = s64.step([(x.double(), y) for x, y in batches], lr)
    row = json.load(open(os.path.join(a.after, "checkpoint", "checkpoint.json")))["rows"]
    one = per_epoch == 1 and row and row[-1]["epoch"] == epoch  # the row's train_loss is this step's loss
    shown = f" (sdp's: {float(row[-1]['train_loss']):.6f})" if one else ""
    print(f"mean loss of the step: twin f64 {loss:.6f}{shown}")
    errs = []
    for prefix, tensors in [("global", twin.synced_tensors(s64.model))] + [
            (f"worker{k}", twin.synced_tensors(w.model)) for k, w in enumerate(s64.workers)]:
        for n, v in tensors.items():
            name = f"{prefix}/model/{n}"
            if name in after:
                errs.append((rel(v - before[name].double(), after[name].double() - before[name].double()), name))
    for k, w in enumerate(s64.workers):
        for n, p in w.model.named_parameters():
            if w.holds(n):
                errs.append((rel(w.opt.state[p]["momentum_buffer"], after[f"worker{k}/opt/{n}/0"]),
                             f"worker{k}/opt/{n}"))
    errs.sort(reverse=True)
    print(f"after the step, {len(errs)} tensors (models' change over the step; momentum buffers): "
          f"||twin f64 - sdp|| / ||sdp|| median {np.median([e for e, _ in errs]):.1e}, largest:")
    for e, n in errs[:5]:
        print(f"  {e:.1e}  {n}")


def check_eval(a):
    r = Run(a.run, a.data_dir)
    sdp = r.sdp_state()
    values = load_safetensors(os.path.join(a.run, "model.safetensors"))
    with torch.no_grad():
        for n, v in twin.synced_tensors(sdp.model).items():
            v.copy_(values[n])
        for w in sdp.workers:  # after a sync every worker holds the global values of its coordinates
            for n, v in twin.synced_tensors(w.model).items():
                v.copy_(values[n])
    wl = r.spec["workload"]
    eb = min(wl["eval_batch_size"], r.n)
    perm = twin.permutation(r.seed, 2**64 - 1, r.n)
    recal = [x for x in [perm[i:i + eb] for i in range(0, r.n, eb)][:10] if len(x) >= 2]
    loss, modes = sdp.evaluate(r.test, len(r.test.labels), wl["eval_batch_size"], r.train, recal)
    last = list(csv.DictReader(open(os.path.join(a.run, "metrics.csv"))))[-1]
    print(f"{'':12} {'twin':>8} {'sdp':>8}")
    print(f"{'test_loss':12} {loss:8.4f} {float(last['test_loss']):8.4f}")
    for mode, v in sorted(modes.items()):
        print(f"{mode:12} {v:8.4f} {float(last['test_acc_' + mode]):8.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="datasets", help="where the spec's folder: dataset is (as `sdp run`)")
    p.add_argument("--threads", type=int, default=2)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step", help="one training step, from sdp's checkpoint after step s to the one after s+1")
    s.add_argument("before", help="run directory whose checkpoint is after step s")
    s.add_argument("after", help="run directory whose checkpoint is after step s+1")
    e = sub.add_parser("eval", help="every evaluation mode of sdp's saved final model")
    e.add_argument("run", help="run directory with model.safetensors and metrics.csv")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    check_step(a) if a.cmd == "step" else check_eval(a)


if __name__ == "__main__":
    main()
