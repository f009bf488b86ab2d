#!/usr/bin/env python3
"""Golden fixtures for tests/llama.rs: two tiny Hugging Face `LlamaForCausalLM`s and their logits and loss.

How the files were made (and how to regenerate them, from the repository root):

    python3 -m venv ~/.cache/sdp-torch
    ~/.cache/sdp-torch/bin/pip install torch safetensors numpy transformers
    ~/.cache/sdp-torch/bin/python tests/golden/make_golden_llama.py

(made with torch 2.15.0, transformers 5.25.0, safetensors 0.8.0, on the CPU). It writes, under
tests/fixtures/golden/, for each config:

- llama_<cfg>.safetensors     the model's state_dict under transformers' names (a tied model has no separate
                              `lm_head.weight`: it is the embedding).
- llama_<cfg>_io.safetensors  `input_ids` (2, 7) int64, `targets` (2, 7) int64 (random next tokens),
                              `logits` (2, 7, vocab), `loss` (mean cross-entropy of the logits against the
                              targets over all 14 positions) and `grad.<name>`: the loss's gradient with
                              respect to every parameter (a tied model's embedding gradient sums both uses).

Configs: `gqa` — vocab 32, hidden 16, 2 layers, 4 query heads over 2 key/value heads (grouped-query attention),
SwiGLU 24, untied head; `tied` — vocab 32, hidden 16, 2 layers, 2 heads (head dim 8), SwiGLU 20, tied head.
RMSNorm eps 1e-6, rope theta 10,000, eager attention with its causal mask. Weights are N(0, 0.3²) (far from the
0.02 init, so that every layer moves the logits), norm scales 1 + N(0, 0.2²); rounded to f32, then the
reference forward runs in float64 on those values, so the Rust f32 forward is compared with the exact result.
"""

import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "golden")

CONFIGS = {
    "gqa": dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False),
    "tied": dict(vocab_size=32, hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, tie_word_embeddings=True),
}


def make(name, kw, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
                      mlp_bias=False, **kw)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    targets = torch.randint(0, cfg.vocab_size, (2, 7))
    model = model.double()
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    loss.backward()
    grads = {f"grad.{n}": p.grad.float().contiguous() for n, p in model.named_parameters()}
    if cfg.tie_word_embeddings:
        grads.pop("grad.lm_head.weight", None)
    logits, loss = logits.detach(), loss.detach()
    save_file(state, os.path.join(OUT, f"llama_{name}.safetensors"))
    save_file({"input_ids": ids, "targets": targets, "logits": logits.float().contiguous(),
               "loss": loss.float().reshape(1), **grads}, os.path.join(OUT, f"llama_{name}_io.safetensors"))
    print(f"llama_{name}: {sum(v.numel() for v in state.values())} parameters, loss {loss.item():.6f}")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for i, (name, kw) in enumerate(CONFIGS.items()):
        make(name, kw, seed=i)
