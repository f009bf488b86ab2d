#!/usr/bin/env python3
"""The PyTorch twin of an `sdp` data-parallel (DP) language-model run: the same token shards, decoder, recipe and
K x batch, trained by PyTorch with Hugging Face's `LlamaForCausalLM`, so that sdp's DP baseline on a decoder can
be checked against the field's reference implementation.

    python3 scripts/pytorch_lm.py --spec experiments/llm_mini/dp.toml --data-dir datasets --seed 0 --csv /tmp/lm0.csv

The spec gives every setting (`workload.dataset = "tokens:<dir>"` under --data-dir, `workload.context`,
`workload.model` = llama_tiny with its `widths`/`depths` overrides, epochs, batch, eval_every, test_samples,
`optim` = adamw with lr, betas, eps, weight decay, warm-up, cosine, clip_grad_norm; `method.workers` K); fields
this twin cannot train (another optimizer, schedule, method or model) are errors. Prints one line per evaluation
and, as its LAST line, `final_test_nll=<nats per token>`; writes the evaluations to a CSV with the columns of
sdp's metrics.csv for this task (epoch, step, train_loss, test_loss, test_nll, lr, wall_s).

What is the same as sdp, by construction:
- Model: transformers' LlamaForCausalLM with sdp's preset (src/models/llama.rs; tests/llama.rs checks logits,
  loss and every gradient against this class), RMSNorm eps 1e-6, rope theta 10,000, eager attention. Init: every
  projection and the embedding N(0, 0.02²) (sdp clips its draws at ±2 std; transformers does not), norms 1.
- Data: the same shards. A training epoch is floor(windows / (K B)) steps of K x B windows of context + 1 tokens,
  windows = floor(train tokens / (context + 1)), each window starting at an offset uniform over the train
  stream (sdp draws it from the epoch key; here torch's generator). Evaluation reads the val split's consecutive
  windows i (context + 1) (the first `test_samples` of them in sdp's subset order: sdp's subset draws which
  windows; with test_samples unset or >= the windows, all of them, as here).
- DP step: the mean cross-entropy over the K x B x context predictions (the mean of K workers' means on
  equal batches), its gradient clipped to optim.clip_grad_norm (PyTorch's clip_grad_norm_, what sdp applies to
  the averaged gradient), one AdamW step (decoupled weight decay on every parameter, PyTorch's rule).
- Learning rate: `lr_at` of src/optim.rs: linear warm-up (step+1)/warmup_steps * lr, then a cosine to 0.
- Metric: validation loss per token in nats (each window's mean NLL, averaged over windows).
What differs: random draws (init, window offsets) come from torch's generator, so runs agree in distribution,
not bit for bit; compare means over seeds.
"""

import argparse
import json
import math
import os
import sys
import time
import tomllib

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {"llama_tiny": dict(dim=128, layers=8, heads=4, kv_heads=4, ffn=352, tied=True)}


def read_shard(path):
    """An llm.c shard: 256 int32 header (magic 20240520, version 1, token count), then uint16 tokens."""
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(1024), dtype="<i4")
        if head[0] != 20240520 or head[1] != 1:
            sys.exit(f"{path}: not an llm.c token shard (magic {head[0]}, version {head[1]})")
        toks = np.frombuffer(f.read(), dtype="<u2")
    if len(toks) != head[2]:
        sys.exit(f"{path}: header says {head[2]} tokens, file holds {len(toks)}")
    return toks


def split_tokens(d, split):
    files = sorted(f for f in os.listdir(d) if split in f and f.endswith(".bin"))
    if not files:
        sys.exit(f"{d}: no *{split}*.bin shard")
    return np.concatenate([read_shard(os.path.join(d, f)) for f in files]).astype(np.int64)


def lr_at(o, step, total, per_epoch):
    warmup = o["warmup_epochs"] * per_epoch
    if warmup > 0 and step < warmup:
        return o["lr"] * (step + 1) / warmup
    t = min(max((step - warmup) / max(total - warmup, 1.0), 0.0), 1.0)
    return 0.5 * o["lr"] * (1 + math.cos(math.pi * t))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--data-dir", default="datasets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = tomllib.load(open(a.spec, "rb"))
    w, o, m = spec["workload"], spec.get("optim", {}), spec.get("method", {})
    kinds = m.get("kind", "dp")
    if (kinds if isinstance(kinds, list) else [kinds]).count("dp") == 0:
        sys.exit(f"{a.spec}: method.kind must be (or list) dp, the run this twin trains")
    for k, want in [("name", "adamw"), ("schedule", "cosine")]:
        if o.get(k, "sgd" if k == "name" else "cosine") != want:
            sys.exit(f"{a.spec}: optim.{k} = {o.get(k)!r}: this twin trains {want} only")
    model = w["model"]
    if model not in PRESETS:
        sys.exit(f"{a.spec}: workload.model = {model!r}: this twin knows {sorted(PRESETS)}")
    p = dict(PRESETS[model])
    if "widths" in w or "depths" in w:
        sys.exit(f"{a.spec}: widths/depths overrides are not mirrored here yet")
    ds = w["dataset"]
    if not ds.startswith("tokens:"):
        sys.exit(f"{a.spec}: workload.dataset must be tokens:<dir>, got {ds!r}")
    d = ds[len("tokens:"):]
    d = d if os.path.isabs(d) else os.path.join(a.data_dir, d)
    side = json.load(open(os.path.join(d, "tokens.json"))) if os.path.exists(os.path.join(d, "tokens.json")) else {}
    vocab = side.get("vocab_size", 50257)
    ctx = w.get("context", 128)
    K, B = m.get("workers", 1), w["batch_size"]
    opt = dict(lr=o.get("lr", 0.1), warmup_epochs=o.get("warmup_epochs", 0.0))
    betas = tuple(o.get("betas", [0.9, 0.999]))
    torch.manual_seed(a.seed)
    train, val = split_tokens(d, "train"), split_tokens(d, "val")
    windows = len(train) // (ctx + 1)
    per_epoch = windows // (K * B)
    epochs = w["epochs"]
    total = per_epoch * epochs
    val_windows = len(val) // (ctx + 1)
    n_val = min(w.get("test_samples", val_windows), val_windows)
    if n_val < val_windows:
        print(f"note: test_samples {n_val} < {val_windows} windows: sdp draws its subset, this twin takes the first",
              file=sys.stderr)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=p["dim"], intermediate_size=p["ffn"], num_hidden_layers=p["layers"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], tie_word_embeddings=p["tied"],
                      max_position_embeddings=max(ctx, 128), rms_norm_eps=1e-6, rope_theta=10000.0,
                      attention_bias=False, mlp_bias=False, initializer_range=0.02)
    cfg._attn_implementation = "eager"
    net = LlamaForCausalLM(cfg)
    optim = torch.optim.AdamW(net.parameters(), lr=opt["lr"], betas=betas, eps=o.get("eps", 1e-8),
                              weight_decay=o.get("weight_decay", 0.0))
    clip = o.get("clip_grad_norm", 0.0)
    train_t = torch.from_numpy(train)
    val_t = torch.from_numpy(val)
    eval_every = w.get("eval_every", 1)
    eval_batch = w.get("eval_batch_size", 500)

    def evaluate():
        net.eval()
        tot, loss_sum = 0.0, 0.0
        with torch.no_grad():
            for s in range(0, n_val, eval_batch):
                idx = torch.arange(s, min(s + eval_batch, n_val)) * (ctx + 1)
                win = torch.stack([val_t[i:i + ctx + 1] for i in idx.tolist()])
                logits = net(input_ids=win[:, :-1]).logits
                nll = F.cross_entropy(logits.reshape(-1, vocab), win[:, 1:].reshape(-1), reduction="none")
                per_seq = nll.view(len(idx), ctx).mean(1)
                tot += per_seq.sum().item()
                loss_sum += per_seq.sum().item()
        net.train()
        return loss_sum / n_val, tot / n_val

    rows, step, t0 = [], 0, time.time()
    for epoch in range(1, epochs + 1):
        loss_sum = 0.0
        for _ in range(per_epoch):
            lr = lr_at(opt, step, total, per_epoch)
            for g in optim.param_groups:
                g["lr"] = lr
            starts = torch.randint(0, len(train) - ctx, (K * B,))
            win = torch.stack([train_t[s:s + ctx + 1] for s in starts.tolist()])
            logits = net(input_ids=win[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, vocab), win[:, 1:].reshape(-1))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            optim.step()
            loss_sum += loss.item()
            step += 1
        if epoch % eval_every == 0 or epoch == epochs:
            test_loss, test_nll = evaluate()
            row = dict(epoch=epoch, step=step, train_loss=loss_sum / per_epoch, test_loss=test_loss,
                       test_nll=test_nll, lr=lr, wall_s=time.time() - t0)
            rows.append(row)
            print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if a.csv:
        with open(a.csv, "w") as f:
            f.write(",".join(rows[0]) + "\n")
            for r in rows:
                f.write(",".join(str(v) for v in r.values()) + "\n")
    print(f"final_test_nll={rows[-1]['test_nll']:.6f}")


if __name__ == "__main__":
    main()
