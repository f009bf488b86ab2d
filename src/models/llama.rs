//! LLaMA-style decoder (docs/design.md §7): token embedding; L pre-norm decoder layers — RMSNorm → causal
//! multi-head self-attention with rotary position embeddings (rotate-half, θ = 10,000; grouped-query heads
//! optional) → residual; RMSNorm → SwiGLU MLP → residual —; a final RMSNorm; the LM head, tied to the
//! embedding or not. Parameter names are Hugging Face `LlamaForCausalLM`'s `state_dict` keys
//! (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
//! `model.layers.{i}.mlp.{gate,up,down}_proj.weight`, `model.layers.{i}.{input,post_attention}_layernorm.weight`,
//! `model.norm.weight`, `lm_head.weight`); the golden test compares logits with `transformers`
//! (tests/golden/make_golden_llama.py).
//!
//! Masking units: a Block unit is one decoder layer (attention and MLP with their two norms: a dropped layer
//! is the identity); a Neuron unit is one SwiGLU hidden unit (a row of `gate_proj` and of `up_proj`, a
//! column of `down_proj`). The embedding, the final norm and the head are shared by every worker. Attention
//! heads are not units yet (the family seam carries one unit kind per block besides the block itself).
//!
//! The vocabulary is the dataset's class count (a token dataset's vocabulary size). The sequence length is
//! the batch's: rotary tables are made for [`LlamaConfig::context`] positions at build time and again for a
//! longer batch; the context only sets the activation estimates of the masking and the accounting.

use super::layers::{Builder, Init, Linear, ParamStore};
use super::{BlockDrop, BlockPlan, Family, MaskableBlock, ModelArgs, Net, ParamGroup};
use candle_core::{DType, Result, Tensor, Var};

/// `llama_tiny`: the CPU preset (d 128, 8 layers, 4 heads, SwiGLU 352, tied head; 1.87 M parameters
/// at a vocabulary of 2,048), `workload.widths = [d]` and `depths = [layers]` overriding.
pub fn llama_tiny(a: &ModelArgs) -> anyhow::Result<Box<dyn Family>> {
    Ok(Box::new(LlamaConfig::tiny(a.num_classes).with_args(a)?))
}

/// `llama_134m`: the paper's smallest decoder (d 768, 12 layers, 12 heads, SwiGLU 2048, untied head;
/// 134,105,856 parameters at a vocabulary of 32,000).
pub fn llama_134m(a: &ModelArgs) -> anyhow::Result<Box<dyn Family>> {
    Ok(Box::new(LlamaConfig::m134(a.num_classes).with_args(a)?))
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size (the dataset's class count).
    pub vocab: usize,
    /// Model dim d (`hidden_size`).
    pub dim: usize,
    /// Decoder layers (`num_hidden_layers`).
    pub layers: usize,
    /// Query heads; head dim = d / heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention: a divisor of `heads`; = heads is plain multi-head).
    pub kv_heads: usize,
    /// SwiGLU hidden units (`intermediate_size`).
    pub ffn: usize,
    /// The LM head is the embedding matrix (`tie_word_embeddings`).
    pub tied: bool,
    pub rope_theta: f64,
    /// RMSNorm epsilon (`rms_norm_eps`; transformers' default 1e-6).
    pub eps: f64,
    /// Tokens per sequence assumed by the activation estimates (`workload.context` where given).
    pub context: usize,
}

impl LlamaConfig {
    pub fn tiny(vocab: usize) -> Self {
        Self {
            vocab,
            dim: 128,
            layers: 8,
            heads: 4,
            kv_heads: 4,
            ffn: 352,
            tied: true,
            rope_theta: 10_000.0,
            eps: 1e-6,
            context: 128,
        }
    }

    pub fn m134(vocab: usize) -> Self {
        Self {
            vocab,
            dim: 768,
            layers: 12,
            heads: 12,
            kv_heads: 12,
            ffn: 2048,
            tied: false,
            rope_theta: 10_000.0,
            eps: 1e-6,
            context: 256,
        }
    }

    /// This preset with `workload.widths = [d]` (heads keep the preset's head dim where d allows, the
    /// SwiGLU width scales with d) and `workload.depths = [layers]`.
    pub fn with_args(self, a: &ModelArgs) -> anyhow::Result<Self> {
        let mut cfg = self;
        if let Some(w) = &a.widths {
            let &[d] = w.as_slice() else {
                anyhow::bail!("workload.widths for a llama model is [d] (the model dim), got {w:?}");
            };
            cfg = cfg.at_dim(d);
        }
        if let Some(l) = &a.depths {
            let &[layers] = l.as_slice() else {
                anyhow::bail!("workload.depths for a llama model is [layers], got {l:?}");
            };
            cfg.layers = layers;
        }
        if let Some(t) = a.context {
            cfg.context = t;
        }
        if let Err(e) = cfg.validate() {
            anyhow::bail!("workload.widths/depths for a llama model: {e}");
        }
        Ok(cfg)
    }

    /// The config at model dim `d`: the preset's head dim where `d` allows (heads = the largest divisor
    /// of d at most d / head_dim, kv heads likewise), the SwiGLU width scaled with d to a multiple of 8.
    pub fn at_dim(&self, d: usize) -> Self {
        if d == self.dim {
            return self.clone();
        }
        let head_dim = self.dim / self.heads.max(1);
        let heads = largest_divisor_at_most(d, (d / head_dim.max(1)).max(1));
        let group = (self.heads / self.kv_heads.max(1)).max(1);
        let kv_heads = largest_divisor_at_most(heads, (heads / group).max(1));
        let ffn = (((self.ffn * d) as f64 / self.dim as f64 / 8.0).round() as usize * 8).max(8);
        Self { dim: d, heads, kv_heads, ffn, ..self.clone() }
    }

    /// Checks the config is buildable; the message names the offending field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.vocab == 0 || self.dim == 0 || self.layers == 0 || self.ffn == 0 {
            return Err(format!(
                "vocab ({}), dim ({}), layers ({}) and ffn ({}) must be positive",
                self.vocab, self.dim, self.layers, self.ffn
            ));
        }
        if self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            return Err(format!("dim {} is not divisible by its {} heads", self.dim, self.heads));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head dim {} must be even (rotary embeddings rotate pairs)", self.head_dim()));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!("{} heads are not a multiple of {} key/value heads", self.heads, self.kv_heads));
        }
        if self.context == 0 {
            return Err("context must be positive".into());
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.heads.max(1)
    }

    /// Key/value width: kv_heads × head dim.
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }

    /// Parameters of one decoder layer with `hidden` SwiGLU units: q, k, v, o, gate, up, down, two norms.
    pub fn layer_params(&self, hidden: usize) -> usize {
        let (d, kv) = (self.dim, self.kv_dim());
        2 * d * d + 2 * kv * d + 3 * hidden * d + 2 * d
    }

    /// Parameters outside every layer: embedding, final norm, untied head.
    pub fn shared_params(&self) -> usize {
        let head = if self.tied { 0 } else { self.vocab * self.dim };
        self.vocab * self.dim + self.dim + head
    }

    pub fn num_params(&self) -> usize {
        self.layers * self.layer_params(self.ffn) + self.shared_params()
    }

    /// Activation elements one layer with `hidden` SwiGLU units keeps for backward per sequence of `t`
    /// tokens (an estimate from the shapes): the layer input and both norm outputs (3d), q, k, v (d + 2 kv),
    /// rotated q and k (d + kv), scores and probabilities (2 · heads · t), the attention output and the
    /// attention branch's sum (2d); gate, up, SiLU(gate) and their product (4 · hidden); per token.
    pub fn layer_act_elems(&self, hidden: usize, t: usize) -> usize {
        let (d, kv) = (self.dim, self.kv_dim());
        t * (3 * d + (d + 2 * kv) + (d + kv) + 2 * self.heads * t + 2 * d + 4 * hidden)
    }
}

fn largest_divisor_at_most(n: usize, at_most: usize) -> usize {
    let mut h = at_most.clamp(1, n.max(1));
    while !n.is_multiple_of(h) {
        h -= 1;
    }
    h
}

impl Family for LlamaConfig {
    fn maskable(&self) -> Vec<MaskableBlock> {
        (0..self.layers)
            .map(|i| MaskableBlock {
                name: format!("model.layers.{i}"),
                width: self.ffn,
                params: self.layer_params(self.ffn),
                act_elems: self.layer_act_elems(self.ffn, self.context),
                // One SwiGLU unit: a gate row, an up row, a down column.
                neuron_params: 3 * self.dim,
                neuron_act_elems: 4 * self.context,
            })
            .collect()
    }

    fn build(&self, plan: &[BlockPlan], b: Builder) -> Result<Box<dyn Net>> {
        Ok(Box::new(Llama::new(self, plan, b)?))
    }

    fn narrowed(&self) -> &'static [(&'static str, usize)] {
        &[("mlp.gate_proj.weight", 0), ("mlp.up_proj.weight", 0), ("mlp.down_proj.weight", 1)]
    }

    fn shared(&self) -> &'static [&'static str] {
        &[]
    }

    fn param_groups(&self) -> Vec<ParamGroup> {
        let mut groups: Vec<ParamGroup> = vec![("embed_tokens".into(), vec!["model.embed_tokens.".into()], false)];
        for i in 0..self.layers {
            let n = format!("model.layers.{i}");
            groups.push((n.clone(), vec![format!("{n}.")], true));
        }
        groups.push(("norm".into(), vec!["model.norm.".into()], false));
        if !self.tied {
            groups.push(("lm_head".into(), vec!["lm_head.".into()], false));
        }
        groups
    }

    fn stages(&self) -> (Vec<usize>, Vec<usize>) {
        (vec![self.dim], vec![self.layers])
    }

    fn param_count(&self) -> Result<usize> {
        Ok(self.num_params())
    }

    /// The same preset at model dim `widths[0]` (see [`LlamaConfig::at_dim`]).
    fn with_widths(&self, widths: &[usize]) -> anyhow::Result<Box<dyn Family>> {
        let &[d] = widths else { anyhow::bail!("a llama model is narrowed by one width (d), got {widths:?}") };
        let cfg = self.at_dim(d);
        if let Err(e) = cfg.validate() {
            anyhow::bail!("workload.widths for a llama model: {e}");
        }
        Ok(Box::new(cfg))
    }

    fn drops(&self) -> bool {
        true
    }
}

/// RMSNorm over the last dim with a learned scale (Hugging Face `LlamaRMSNorm`).
struct RmsNorm {
    weight: Var,
    eps: f64,
}

impl RmsNorm {
    fn new(b: &mut Builder, name: &str, d: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: b.param(&format!("{name}.weight"), &[d], Init::Const(1.0))?, eps })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm(xs, self.weight.as_tensor(), self.eps)
    }
}

/// A bias-free projection with transformers' N(0, 0.02²) init, applied to (B, T, d_in) as one GEMM.
fn proj(b: &mut Builder, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
    Linear::new_trunc_normal(b, name, d_in, d_out, false)
}

fn linear_3d(l: &Linear, xs: &Tensor) -> Result<Tensor> {
    let (b, t, d) = xs.dims3()?;
    let ys = l.forward(&xs.reshape((b * t, d))?)?;
    ys.reshape((b, t, ()))
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
}

impl Attention {
    fn new(b: &mut Builder, name: &str, c: &LlamaConfig) -> Result<Self> {
        let (d, kv) = (c.dim, c.kv_dim());
        Ok(Self {
            q: proj(b, &format!("{name}.q_proj"), d, d)?,
            k: proj(b, &format!("{name}.k_proj"), d, kv)?,
            v: proj(b, &format!("{name}.v_proj"), d, kv)?,
            o: proj(b, &format!("{name}.o_proj"), d, d)?,
            heads: c.heads,
            kv_heads: c.kv_heads,
        })
    }

    /// `xs` (B, T, d) → (B, T, d); `cos`, `sin` are the rotary tables of T positions.
    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let hd = d / self.heads;
        // (B, T, h·hd) -> (B, h, T, hd)
        let heads = |l: &Linear, h: usize| linear_3d(l, xs)?.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous();
        let q = crate::ops::rope(&heads(&self.q, self.heads)?, cos, sin)?;
        let k = crate::ops::rope(&heads(&self.k, self.kv_heads)?, cos, sin)?;
        let v = heads(&self.v, self.kv_heads)?;
        let (k, v) = (self.repeat_kv(k)?, self.repeat_kv(v)?);
        // (B, h, T, T)
        let scores = (crate::ops::bmm(&q, &k.t()?)? * (hd as f64).powf(-0.5))?;
        let probs = crate::ops::causal_softmax(&scores)?;
        // (B, h, T, hd) -> (B, T, d)
        let ys = crate::ops::bmm(&probs, &v)?.transpose(1, 2)?.reshape((b, t, d))?;
        linear_3d(&self.o, &ys)
    }

    /// (B, kv, T, hd) → (B, h, T, hd): each key/value head serves h / kv query heads.
    fn repeat_kv(&self, xs: Tensor) -> Result<Tensor> {
        let rep = self.heads / self.kv_heads;
        if rep == 1 {
            return Ok(xs);
        }
        let (b, kv, t, hd) = xs.dims4()?;
        xs.unsqueeze(2)?.broadcast_as((b, kv, rep, t, hd))?.reshape((b, kv * rep, t, hd))
    }
}

/// SwiGLU: down(SiLU(gate(x)) ⊙ up(x)). A worker holding none of a layer's hidden units holds no MLP.
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Multiplier of the hidden activations (`BlockPlan::mid_scale`).
    scale: f64,
}

impl Mlp {
    fn new(b: &mut Builder, name: &str, d: usize, hidden: usize, scale: f64) -> Result<Option<Self>> {
        if hidden == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            gate: proj(b, &format!("{name}.gate_proj"), d, hidden)?,
            up: proj(b, &format!("{name}.up_proj"), d, hidden)?,
            down: proj(b, &format!("{name}.down_proj"), hidden, d)?,
            scale,
        }))
    }

    /// `mask`: a multiplier per hidden unit, (hidden,) (the dropout baseline).
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let hidden = crate::ops::swiglu(&linear_3d(&self.gate, xs)?, &linear_3d(&self.up, xs)?)?;
        let hidden = if self.scale == 1.0 { hidden } else { (hidden * self.scale)? };
        let hidden = match mask {
            Some(m) => hidden.broadcast_mul(&m.to_dtype(hidden.dtype())?)?,
            None => hidden,
        };
        linear_3d(&self.down, &hidden)
    }
}

struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Option<Mlp>,
}

struct DecoderLayer {
    /// None: the layer is dropped on this worker (the identity).
    inner: Option<Layer>,
    /// Multiplier of both branches' outputs (holder fraction in scaled evaluation).
    scale: f64,
}

impl DecoderLayer {
    fn new(b: &mut Builder, i: usize, c: &LlamaConfig, plan: &BlockPlan) -> Result<Self> {
        let n = format!("model.layers.{i}");
        let inner = if plan.residual {
            Some(Layer {
                input_norm: RmsNorm::new(b, &format!("{n}.input_layernorm"), c.dim, c.eps)?,
                attn: Attention::new(b, &format!("{n}.self_attn"), c)?,
                post_norm: RmsNorm::new(b, &format!("{n}.post_attention_layernorm"), c.dim, c.eps)?,
                mlp: Mlp::new(b, &format!("{n}.mlp"), c.dim, plan.channels.len(), plan.mid_scale)?,
            })
        } else {
            None
        };
        Ok(Self { inner, scale: plan.scale })
    }

    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, drop: &BlockDrop) -> Result<Tensor> {
        let Some(l) = self.inner.as_ref().filter(|_| !drop.skip) else { return Ok(xs.clone()) };
        let xs = (xs + self.scaled(l.attn.forward(&l.input_norm.forward(xs)?, cos, sin)?)?)?;
        match &l.mlp {
            Some(mlp) => {
                let ys = mlp.forward(&l.post_norm.forward(&xs)?, drop.channels.as_ref())?;
                xs + self.scaled(ys)?
            }
            None => Ok(xs),
        }
    }

    fn scaled(&self, ys: Tensor) -> Result<Tensor> {
        if self.scale == 1.0 {
            Ok(ys)
        } else {
            ys * self.scale
        }
    }
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub plan: Vec<BlockPlan>,
    embed: Var,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// None: tied to the embedding.
    head: Option<Linear>,
    /// Rotary tables (T, head_dim / 2) for `cfg.context` positions.
    rope: (Tensor, Tensor),
    store: ParamStore,
}

impl Llama {
    pub fn new(cfg: &LlamaConfig, plan: &[BlockPlan], mut b: Builder) -> Result<Self> {
        if b.compute_dtype() != DType::F32 {
            candle_core::bail!(
                "llama models compute in f32 only (workload.precision = \"bf16\" is not implemented for them)"
            );
        }
        cfg.validate().map_err(candle_core::Error::Msg)?;
        if plan.len() != cfg.layers {
            candle_core::bail!("plan has {} blocks, the model {} layers", plan.len(), cfg.layers);
        }
        let embed = b.param("model.embed_tokens.weight", &[cfg.vocab, cfg.dim], Init::Normal { std: 0.02 })?;
        let layers =
            plan.iter().enumerate().map(|(i, p)| DecoderLayer::new(&mut b, i, cfg, p)).collect::<Result<_>>()?;
        let norm = RmsNorm::new(&mut b, "model.norm", cfg.dim, cfg.eps)?;
        let head = if cfg.tied { None } else { Some(proj(&mut b, "lm_head", cfg.dim, cfg.vocab)?) };
        let rope = crate::ops::rope_tables(cfg.context, cfg.head_dim(), cfg.rope_theta, b.device())?;
        Ok(Self { cfg: cfg.clone(), plan: plan.to_vec(), embed, layers, norm, head, rope, store: b.store })
    }

    /// Rotary tables for `t` positions: the built ones narrowed, or new ones for a longer sequence.
    fn rope_for(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let (cos, sin) = &self.rope;
        if t <= cos.dim(0)? {
            Ok((cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?))
        } else {
            crate::ops::rope_tables(t, self.cfg.head_dim(), self.cfg.rope_theta, cos.device())
        }
    }
}

impl Net for Llama {
    /// No batch statistics and no dropout: `train` does not change the forward pass.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_dropping(xs, train, &[])
    }

    /// Token ids (B, T) → logits (B, T, vocab).
    fn forward_dropping(&self, ids: &Tensor, _train: bool, drops: &[BlockDrop]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (cos, sin) = self.rope_for(t)?;
        let none = BlockDrop::default();
        // (B, T) -> (B, T, d)
        let mut xs = self.embed.as_tensor().index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.dim))?;
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, &cos, &sin, drops.get(i).unwrap_or(&none))?;
        }
        let xs = self.norm.forward(&xs)?;
        // (B, T, d) -> (B, T, vocab)
        match &self.head {
            Some(head) => linear_3d(head, &xs),
            None => xs.reshape((b * t, self.cfg.dim))?.matmul(&self.embed.as_tensor().t()?)?.reshape((b, t, ())),
        }
    }

    fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Per sequence of `input[0]` tokens: the embedding output and the final norm's (2d), the logits and
    /// their log-softmax (2 · vocab), per token, plus each held layer's estimate.
    fn activation_elems(&self, input: &[usize]) -> usize {
        let Some(&t) = input.first() else { return 0 };
        let c = &self.cfg;
        let layers: usize = self
            .layers
            .iter()
            .filter_map(|l| l.inner.as_ref())
            .map(|l| c.layer_act_elems(l.mlp.as_ref().map_or(0, |m| m.down.weight.dims()[1]), t))
            .sum();
        layers + t * (2 * c.dim + 2 * c.vocab)
    }
}
