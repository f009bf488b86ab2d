//! Swin Transformer for 32×32 inputs (docs/design.md §7): `swin_t` and tiny variants are one implementation with
//! configurable per-stage dims, depths, heads and window.
//!
//! The structure follows timm's `SwinTransformer` (timm 1.0.x, the version the golden fixtures were made
//! with), and parameter names are its `state_dict` keys: `patch_embed.proj`, `patch_embed.norm`,
//! `layers.{i}.blocks.{j}.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}`,
//! `layers.{i}.downsample.{norm,reduction}`, `norm`, `head.fc`. In timm ≥ 0.9 the patch merging that halves
//! the resolution sits at the *start* of stage i (`layers.{i}.downsample`, i ≥ 1), not at the end of stage
//! i−1 as in the original Swin code (`layers.{i-1}.downsample`); we follow current timm. Its concatenation
//! order of the 2×2 neighbours is the original one (x0 = (0,0), x1 = (1,0), x2 = (0,1), x3 = (1,1) as
//! (row, col) offsets).
//!
//! Activations are kept channels-last, (B, H, W, C), as in timm. The relative position index and the
//! shifted-window attention mask are deterministic functions of the config: they are plain tensors held by
//! the blocks, not entries of the [`ParamStore`] (whose buffers are averaged among workers like BatchNorm
//! statistics), and they are not written to checkpoints.
//!
//! A network is built from a [`SwinConfig`] (the [`Family`]) and a per-block [`BlockPlan`]: a dropped block
//! is the identity (both residual branches gone), a kept block may hold fewer MLP hidden units (a worker's
//! physical subnetwork, docs/design.md §2).

use super::layers::{Builder, Conv2d, Init, Linear, ParamStore};
use super::{BlockDrop, BlockPlan, Family, MaskableBlock, ModelArgs, Net, ParamGroup};
use candle_core::{Result, Tensor, Var};

/// `swin_t`: Swin-T, with `widths` as per-stage dims and `depths` as per-stage block counts when given.
/// Heads follow the dims: dim / 32 per stage (Swin-T's head dim of 32; see [`default_heads`] for dims below
/// 32 or not divisible), so `swin_t` without overrides keeps heads 3/6/12/24. `workload.norm` does not
/// apply (Swin's LayerNorms are always present).
pub fn swin_t(a: &ModelArgs) -> anyhow::Result<Box<dyn Family>> {
    Ok(Box::new(SwinConfig::of(a)?))
}

/// timm's LayerNorm epsilon (`nn.LayerNorm` default).
pub const LN_EPS: f64 = 1e-5;
/// Value added to the attention logits of token pairs from different regions of a shifted window (timm).
pub const MASK_VALUE: f32 = -100.0;

#[derive(Clone, Debug, PartialEq)]
pub struct SwinConfig {
    /// Input side in pixels (32 for CIFAR/SVHN).
    pub img_size: usize,
    /// Patch side of the patch embedding (2: 32×32 pixels → 16×16 tokens).
    pub patch_size: usize,
    /// Channel dim of each stage (timm's `embed_dim` as a per-stage list; Swin-T: 96·2^i).
    pub dims: Vec<usize>,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Attention heads per stage.
    pub heads: Vec<usize>,
    /// Attention window side (clamped to the stage resolution, see [`SwinConfig::blocks`]).
    pub window: usize,
    /// MLP hidden units = `mlp_ratio` × dim.
    pub mlp_ratio: usize,
    pub num_classes: usize,
}

/// One Swin block's static shape.
#[derive(Clone, Debug, PartialEq)]
pub struct SwinBlockShape {
    /// `layers.{i}.blocks.{j}`.
    pub name: String,
    pub stage: usize,
    /// Tokens per side at this stage.
    pub resolution: usize,
    pub dim: usize,
    pub heads: usize,
    /// Window side actually used (min(window, resolution)).
    pub window: usize,
    /// Cyclic shift (window/2 on odd blocks; 0 where the stage fits in one window).
    pub shift: usize,
    /// Full-size MLP hidden units.
    pub mlp_hidden: usize,
}

impl SwinBlockShape {
    /// Activations the block's two branches keep for backward, per sample (an estimate from the
    /// shapes): attention — norm1, qkv (3d), scores and probabilities (heads × window² per token),
    /// attention output, projection; MLP — norm2, fc1 and GELU outputs (hidden), fc2.
    pub fn act_elems(&self) -> usize {
        let t = self.resolution * self.resolution;
        let attn = t * (6 * self.dim + 2 * self.heads * self.window * self.window);
        let mlp = t * (2 * self.dim + 2 * self.mlp_hidden);
        attn + mlp
    }

    /// Parameters of the whole block (both residual branches with their norms).
    pub fn params(&self) -> usize {
        let d = self.dim;
        let table = (2 * self.window - 1).pow(2) * self.heads;
        // norm1 + qkv + table + proj + norm2 + fc1 + fc2
        2 * d
            + (3 * d * d + 3 * d)
            + table
            + (d * d + d)
            + 2 * d
            + (self.mlp_hidden * d + self.mlp_hidden)
            + (d * self.mlp_hidden + d)
    }

    /// Parameters one MLP hidden unit owns: its fc1 row and bias, its fc2 column.
    pub fn neuron_params(&self) -> usize {
        2 * self.dim + 1
    }
}

impl SwinConfig {
    /// Swin-T adapted to 32×32 (docs/design.md §7): 27,574,318 parameters with 100 classes.
    pub fn swin_t(num_classes: usize) -> Self {
        Self {
            img_size: 32,
            patch_size: 2,
            dims: vec![96, 192, 384, 768],
            depths: vec![2, 2, 6, 2],
            heads: vec![3, 6, 12, 24],
            window: 4,
            mlp_ratio: 4,
            num_classes,
        }
    }

    /// The `swin_t` config with the overrides of `a` (see [`swin_t`]).
    pub fn of(a: &ModelArgs) -> anyhow::Result<Self> {
        let base = Self::swin_t(a.num_classes);
        let dims = a.widths.clone().unwrap_or_else(|| base.dims.clone());
        let depths = a.depths.clone().unwrap_or_else(|| base.depths.clone());
        let cfg = Self::with_dims(dims, depths, a.num_classes);
        if let Err(e) = cfg.validate() {
            anyhow::bail!("workload.widths/depths for swin_t: {e}");
        }
        Ok(cfg)
    }

    /// A config with per-stage `dims` and `depths` and the default head rule: heads = dim / 32 (Swin-T's
    /// head dim), at least 1, and a divisor of dim (the largest one ≤ dim/32).
    pub fn with_dims(dims: Vec<usize>, depths: Vec<usize>, num_classes: usize) -> Self {
        let heads = dims.iter().map(|&d| default_heads(d)).collect();
        Self { dims, depths, heads, ..Self::swin_t(num_classes) }
    }

    /// Checks the config is buildable; the message names the offending field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.dims.len();
        if n == 0 || self.depths.len() != n || self.heads.len() != n {
            return Err(format!(
                "swin: dims ({}), depths ({}) and heads ({}) need the same, non-zero number of stages",
                n,
                self.depths.len(),
                self.heads.len()
            ));
        }
        if self.patch_size == 0 || !self.img_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "swin: img_size {} is not a multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        let mut res = self.img_size / self.patch_size;
        for s in 0..n {
            if s > 0 {
                if !res.is_multiple_of(2) {
                    return Err(format!("swin: stage {s} halves an odd resolution {res}"));
                }
                res /= 2;
            }
            let (d, h) = (self.dims[s], self.heads[s]);
            if h == 0 || d % h != 0 {
                return Err(format!("swin: stage {s} dim {d} is not divisible by its {h} heads"));
            }
            let w = self.window.min(res);
            if w == 0 || !res.is_multiple_of(w) {
                return Err(format!("swin: stage {s} resolution {res} is not a multiple of the window {w}"));
            }
        }
        Ok(())
    }

    /// Blocks in forward order.
    pub fn blocks(&self) -> Vec<SwinBlockShape> {
        let mut out = Vec::new();
        let mut res = self.img_size / self.patch_size;
        for (s, &depth) in self.depths.iter().enumerate() {
            if s > 0 {
                res /= 2;
            }
            // timm `_calc_window_shift`: a stage that fits in one window uses it whole, unshifted.
            let (window, shift) = if res <= self.window { (res, 0) } else { (self.window, self.window / 2) };
            for j in 0..depth {
                out.push(SwinBlockShape {
                    name: format!("layers.{s}.blocks.{j}"),
                    stage: s,
                    resolution: res,
                    dim: self.dims[s],
                    heads: self.heads[s],
                    window,
                    shift: if j % 2 == 1 { shift } else { 0 },
                    mlp_hidden: self.mlp_ratio * self.dims[s],
                });
            }
        }
        out
    }

    /// Parameters of the full model.
    pub fn num_params(&self) -> usize {
        let blocks: usize = self.blocks().iter().map(|b| b.params()).sum();
        blocks + self.shared_params()
    }

    /// Parameters outside every block: patch embedding, patch mergings, final norm, head.
    pub fn shared_params(&self) -> usize {
        let d0 = self.dims[0];
        let p = self.patch_size;
        let embed = 3 * p * p * d0 + d0 + 2 * d0;
        let merges: usize = self.dims.windows(2).map(|w| 2 * 4 * w[0] + 4 * w[0] * w[1]).sum();
        let d_last = *self.dims.last().unwrap_or(&d0);
        embed + merges + 2 * d_last + d_last * self.num_classes + self.num_classes
    }
}

impl Family for SwinConfig {
    /// A Block unit owns a Swin block (its attention and MLP branches with their norms); a Neuron unit owns
    /// one MLP hidden unit (fc1 row + bias, fc2 column). Attention heads are not units (docs/protocol.md,
    /// "Units").
    fn maskable(&self) -> Vec<MaskableBlock> {
        self.blocks()
            .into_iter()
            .map(|b| MaskableBlock {
                width: b.mlp_hidden,
                params: b.params(),
                act_elems: b.act_elems(),
                neuron_params: b.neuron_params(),
                // One hidden unit: its fc1 output and its GELU output, per token.
                neuron_act_elems: 2 * b.resolution * b.resolution,
                name: b.name,
            })
            .collect()
    }

    fn build(&self, plan: &[BlockPlan], b: Builder) -> Result<Box<dyn Net>> {
        Ok(Box::new(Swin::new(self, plan, b)?))
    }

    /// fc1's rows and biases, fc2's columns.
    fn narrowed(&self) -> &'static [(&'static str, usize)] {
        &[("mlp.fc1.weight", 0), ("mlp.fc1.bias", 0), ("mlp.fc2.weight", 1)]
    }

    fn shared(&self) -> &'static [&'static str] {
        &[]
    }

    /// The patch embedding, each stage's patch merging and blocks, the final norm, the head.
    fn param_groups(&self) -> Vec<ParamGroup> {
        let mut groups: Vec<ParamGroup> = vec![("patch_embed".into(), vec!["patch_embed.".into()], false)];
        let blocks = self.blocks();
        for s in 0..self.depths.len() {
            if s > 0 {
                let n = format!("layers.{s}.downsample");
                groups.push((n.clone(), vec![format!("{n}.")], false));
            }
            for b in blocks.iter().filter(|b| b.stage == s) {
                groups.push((b.name.clone(), vec![format!("{}.", b.name)], true));
            }
        }
        groups.push(("norm".into(), vec!["norm.".into()], false));
        groups.push(("head (head.fc)".into(), vec!["head.".into()], false));
        groups
    }

    fn stages(&self) -> (Vec<usize>, Vec<usize>) {
        (self.dims.clone(), self.depths.clone())
    }

    fn param_count(&self) -> Result<usize> {
        Ok(self.num_params())
    }

    /// The same config at per-stage dims `widths`, heads by the default rule (as `workload.widths` would
    /// give, see [`swin_t`]).
    fn with_widths(&self, widths: &[usize]) -> anyhow::Result<Box<dyn Family>> {
        let heads = widths.iter().map(|&d| default_heads(d)).collect();
        let cfg = Self { dims: widths.to_vec(), heads, ..self.clone() };
        if let Err(e) = cfg.validate() {
            anyhow::bail!("workload.widths for swin_t: {e}");
        }
        Ok(Box::new(cfg))
    }

    fn drops(&self) -> bool {
        true
    }
}

/// Heads for a stage of `dim` channels: dim / 32 (Swin-T's head dim), rounded down to a divisor of dim, ≥ 1.
pub fn default_heads(dim: usize) -> usize {
    let mut h = (dim / 32).max(1);
    while !dim.is_multiple_of(h) {
        h -= 1;
    }
    h
}

/// LayerNorm over the last dim (candle-nn's fused `layer_norm` has no backward pass; ours does).
pub struct LayerNorm {
    pub weight: Var,
    pub bias: Var,
}

impl LayerNorm {
    pub fn new(b: &mut Builder, name: &str, d: usize) -> Result<Self> {
        Ok(Self {
            weight: b.param(&format!("{name}.weight"), &[d], Init::Const(1.0))?,
            bias: b.param(&format!("{name}.bias"), &[d], Init::Const(0.0))?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layer_norm(xs, self.weight.as_tensor(), self.bias.as_tensor(), LN_EPS)
    }
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dim (biased variance, as PyTorch): see
/// [`crate::ops::layer_norm`].
pub fn layer_norm(xs: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    crate::ops::layer_norm(xs, w, b, eps)
}

/// Applies a [`Linear`] to (…, d_in) by flattening the leading dims (one GEMM instead of a batched one).
fn linear_nd(l: &Linear, xs: &Tensor) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let d_in = dims[dims.len() - 1];
    let ys = l.forward(&xs.reshape(((), d_in))?)?;
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = ys.dim(1)?;
    ys.reshape(out)
}

/// timm's relative position index for a `w`×`w` window: entry (i, j) indexes the (2w−1)² bias table by the
/// (row, col) offset of token i from token j, tokens in row-major order. Returns the w⁴ indices row-major.
pub fn relative_position_index(w: usize) -> Vec<u32> {
    let n = w * w;
    let mut out = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            let dh = (i / w) as isize - (j / w) as isize + w as isize - 1;
            let dw = (i % w) as isize - (j % w) as isize + w as isize - 1;
            out.push((dh * (2 * w as isize - 1) + dw) as u32);
        }
    }
    out
}

/// The shifted-window attention mask, (nW, w², w²) row-major with nW = (res/w)²: 0 where two tokens of a
/// window come from the same region of the cyclically shifted map, [`MASK_VALUE`] otherwise (timm's
/// construction: three bands per axis, [0, res−w), [res−w, res−shift), [res−shift, res)).
pub fn shifted_window_mask(res: usize, w: usize, shift: usize) -> Vec<f32> {
    let band = |i: usize| {
        if i < res - w {
            0
        } else if i < res - shift {
            1
        } else {
            2
        }
    };
    let nw = res / w;
    let n = w * w;
    let mut out = Vec::with_capacity(nw * nw * n * n);
    for wr in 0..nw {
        for wc in 0..nw {
            let label = |t: usize| {
                let (r, c) = (wr * w + t / w, wc * w + t % w);
                band(r) * 3 + band(c)
            };
            for i in 0..n {
                for j in 0..n {
                    out.push(if label(i) == label(j) { 0.0 } else { MASK_VALUE });
                }
            }
        }
    }
    out
}

struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    table: Var,
    /// (w², w²) flattened: relative position index into `table`.
    index: Tensor,
    heads: usize,
    window: usize,
}

impl WindowAttention {
    fn new(b: &mut Builder, name: &str, s: &SwinBlockShape) -> Result<Self> {
        let (d, w) = (s.dim, s.window);
        let n2 = (w * w) * (w * w);
        Ok(Self {
            qkv: Linear::new_trunc_normal(b, &format!("{name}.qkv"), d, 3 * d, true)?,
            proj: Linear::new_trunc_normal(b, &format!("{name}.proj"), d, d, true)?,
            table: b.param(
                &format!("{name}.relative_position_bias_table"),
                &[(2 * w - 1) * (2 * w - 1), s.heads],
                Init::Normal { std: 0.02 },
            )?,
            index: Tensor::from_vec(relative_position_index(w), n2, b.device())?,
            heads: s.heads,
            window: w,
        })
    }

    /// `xs` is (B·nW, N, C) with N = w²; `mask` is (nW, N, N).
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (bw, n, c) = xs.dims3()?;
        let (nh, hd) = (self.heads, c / self.heads);
        // (B·nW, N, 3C) -> (3, B·nW, heads, N, head_dim)
        let qkv = linear_nd(&self.qkv, xs)?.reshape((bw, n, 3, nh, hd))?.permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)? * (hd as f64).powf(-0.5))?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        // (B·nW, heads, N, N)
        let attn = crate::ops::bmm(&q, &k.t()?)?;
        let ww = self.window * self.window;
        // (N·N, heads) -> (heads, N, N)
        let bias = self.table.as_tensor().index_select(&self.index, 0)?.reshape((ww, ww, nh))?.permute((2, 0, 1))?;
        let attn = attn.broadcast_add(&bias.unsqueeze(0)?)?;
        let attn = match mask {
            Some(m) => {
                let nw = m.dim(0)?;
                attn.reshape((bw / nw, nw, nh, n, n))?
                    .broadcast_add(&m.unsqueeze(1)?.unsqueeze(0)?)?
                    .reshape((bw, nh, n, n))?
            }
            None => attn,
        };
        let attn = crate::ops::softmax_last_dim(&attn)?;
        // (B·nW, heads, N, head_dim) -> (B·nW, N, C)
        let ys = crate::ops::bmm(&attn, &v)?.transpose(1, 2)?.reshape((bw, n, c))?;
        linear_nd(&self.proj, &ys)
    }
}

/// The MLP branch: fc1 → GELU → fc2. A worker holding none of a block's hidden units keeps only fc2's bias.
enum Mlp {
    Full { fc1: Linear, fc2: Linear, scale: f64 },
    BiasOnly(Var),
}

impl Mlp {
    fn new(b: &mut Builder, name: &str, d: usize, hidden: usize, scale: f64) -> Result<Self> {
        if hidden == 0 {
            return Ok(Self::BiasOnly(b.param(&format!("{name}.fc2.bias"), &[d], Init::Const(0.0))?));
        }
        Ok(Self::Full {
            fc1: Linear::new_trunc_normal(b, &format!("{name}.fc1"), d, hidden, true)?,
            fc2: Linear::new_trunc_normal(b, &format!("{name}.fc2"), hidden, d, true)?,
            scale,
        })
    }

    /// `mask`: a multiplier per hidden unit, (hidden,) (the dropout baseline).
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        match self {
            // GELU in its exact erf form (PyTorch's `nn.GELU()` default).
            Self::Full { fc1, fc2, scale } => {
                let hidden = crate::ops::gelu_erf(&linear_nd(fc1, xs)?)?;
                let hidden = if *scale == 1.0 { hidden } else { (hidden * *scale)? };
                // Channels-last: the mask broadcasts over (…, hidden).
                let hidden = match mask {
                    Some(m) => hidden.broadcast_mul(&m.to_dtype(hidden.dtype())?)?,
                    None => hidden,
                };
                linear_nd(fc2, &hidden)
            }
            Self::BiasOnly(bias) => xs.zeros_like()?.broadcast_add(bias.as_tensor()),
        }
    }
}

struct SwinBranches {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    mlp: Mlp,
    /// (nW, N, N) shifted-window mask; None for unshifted blocks.
    mask: Option<Tensor>,
}

struct SwinBlock {
    branches: Option<SwinBranches>,
    window: usize,
    shift: usize,
    scale: f64,
}

impl SwinBlock {
    fn new(b: &mut Builder, s: &SwinBlockShape, plan: &BlockPlan) -> Result<Self> {
        let n = &s.name;
        let branches = if plan.residual {
            let mask = if s.shift > 0 {
                let nw = (s.resolution / s.window).pow(2);
                let ww = s.window * s.window;
                let m = shifted_window_mask(s.resolution, s.window, s.shift);
                Some(Tensor::from_vec(m, (nw, ww, ww), b.device())?)
            } else {
                None
            };
            Some(SwinBranches {
                norm1: LayerNorm::new(b, &format!("{n}.norm1"), s.dim)?,
                attn: WindowAttention::new(b, &format!("{n}.attn"), s)?,
                norm2: LayerNorm::new(b, &format!("{n}.norm2"), s.dim)?,
                mlp: Mlp::new(b, &format!("{n}.mlp"), s.dim, plan.channels.len(), plan.mid_scale)?,
                mask,
            })
        } else {
            None
        };
        Ok(Self { branches, window: s.window, shift: s.shift, scale: plan.scale })
    }

    /// `xs` is (B, H, W, C). Stochastic depth skips both branches (the block is the identity, as without its
    /// Block unit); channel dropout multiplies the MLP hidden units by the mask.
    fn forward(&self, xs: &Tensor, drop: &BlockDrop) -> Result<Tensor> {
        let Some(br) = self.branches.as_ref().filter(|_| !drop.skip) else { return Ok(xs.clone()) };
        let (b, h, w, c) = xs.dims4()?;
        let (ws, sh) = (self.window, self.shift as i32);
        let ys = br.norm1.forward(xs)?;
        let ys = if sh > 0 { ys.roll(-sh, 1)?.roll(-sh, 2)? } else { ys };
        // (B, H, W, C) -> (B·nW, w², C)
        let win = ys.reshape((b, h / ws, ws, w / ws, ws, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((
            b * (h / ws) * (w / ws),
            ws * ws,
            c,
        ))?;
        let win = br.attn.forward(&win, br.mask.as_ref())?;
        // (B·nW, w², C) -> (B, H, W, C)
        let ys = win.reshape((b, h / ws, w / ws, ws, ws, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((b, h, w, c))?;
        let ys = if sh > 0 { ys.roll(sh, 1)?.roll(sh, 2)? } else { ys };
        let xs = (xs + self.scaled(ys)?)?;
        let ys = br.mlp.forward(&br.norm2.forward(&xs)?, drop.channels.as_ref())?;
        xs + self.scaled(ys)?
    }

    fn scaled(&self, ys: Tensor) -> Result<Tensor> {
        if self.scale == 1.0 {
            Ok(ys)
        } else {
            ys * self.scale
        }
    }
}

/// timm's `PatchMerging`: concatenate each 2×2 neighbourhood (x0, x1, x2, x3 order), LayerNorm(4d),
/// Linear 4d → d_out without bias.
struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
}

impl PatchMerging {
    fn new(b: &mut Builder, name: &str, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Self {
            norm: LayerNorm::new(b, &format!("{name}.norm"), 4 * d_in)?,
            reduction: Linear::new_trunc_normal(b, &format!("{name}.reduction"), 4 * d_in, d_out, false)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = xs.dims4()?;
        // (B, H, W, C) -> (B, H/2, W/2, 4C): the neighbour at (row r, col s) lands in slot 2s + r.
        let ys =
            xs.reshape((b, h / 2, 2, w / 2, 2, c))?.permute((0, 1, 3, 4, 2, 5))?.reshape((b, h / 2, w / 2, 4 * c))?;
        linear_nd(&self.reduction, &self.norm.forward(&ys)?)
    }
}

struct Stage {
    downsample: Option<PatchMerging>,
    blocks: Vec<SwinBlock>,
}

pub struct Swin {
    pub cfg: SwinConfig,
    pub plan: Vec<BlockPlan>,
    embed: Conv2d,
    embed_bias: Var,
    embed_norm: LayerNorm,
    stages: Vec<Stage>,
    norm: LayerNorm,
    head: Linear,
    store: ParamStore,
}

impl Swin {
    pub fn new(cfg: &SwinConfig, plan: &[BlockPlan], mut b: Builder) -> Result<Self> {
        if b.compute_dtype() != candle_core::DType::F32 {
            candle_core::bail!(
                "swin_t computes in f32 only (workload.precision = \"bf16\" is implemented for the ResNet family)"
            );
        }
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let shapes = cfg.blocks();
        if plan.len() != shapes.len() {
            candle_core::bail!("plan has {} blocks, the model {}", plan.len(), shapes.len());
        }
        let (p, d0) = (cfg.patch_size, cfg.dims[0]);
        let embed = Conv2d::new(&mut b, "patch_embed.proj", 3, d0, p, p, 0)?;
        let embed_bias = b.param("patch_embed.proj.bias", &[d0], Init::Uniform { fan_in: 3 * p * p })?;
        let embed_norm = LayerNorm::new(&mut b, "patch_embed.norm", d0)?;
        let mut stages = Vec::new();
        let mut k = 0;
        for (s, &depth) in cfg.depths.iter().enumerate() {
            let downsample = if s > 0 {
                Some(PatchMerging::new(&mut b, &format!("layers.{s}.downsample"), cfg.dims[s - 1], cfg.dims[s])?)
            } else {
                None
            };
            let mut blocks = Vec::new();
            for _ in 0..depth {
                blocks.push(SwinBlock::new(&mut b, &shapes[k], &plan[k])?);
                k += 1;
            }
            stages.push(Stage { downsample, blocks });
        }
        let d_last = *cfg.dims.last().unwrap_or(&d0);
        let norm = LayerNorm::new(&mut b, "norm", d_last)?;
        let head = Linear::new_trunc_normal(&mut b, "head.fc", d_last, cfg.num_classes, true)?;
        Ok(Self {
            cfg: cfg.clone(),
            plan: plan.to_vec(),
            embed,
            embed_bias,
            embed_norm,
            stages,
            norm,
            head,
            store: b.store,
        })
    }
}

impl Net for Swin {
    /// Swin has no batch statistics and no dropout: `train` does not change the forward pass.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_dropping(xs, train, &[])
    }

    fn forward_dropping(&self, xs: &Tensor, _train: bool, drops: &[BlockDrop]) -> Result<Tensor> {
        let none = BlockDrop::default();
        // (B, 3, 32, 32) -> (B, d0, 16, 16) -> (B, 16, 16, d0)
        let ys = self.embed.forward(xs)?.broadcast_add(&self.embed_bias.as_tensor().reshape((1, (), 1, 1))?)?;
        let mut ys = self.embed_norm.forward(&ys.permute((0, 2, 3, 1))?)?;
        let mut k = 0;
        for stage in &self.stages {
            if let Some(ds) = &stage.downsample {
                // (B, H, W, d) -> (B, H/2, W/2, d')
                ys = ds.forward(&ys)?;
            }
            for block in &stage.blocks {
                ys = block.forward(&ys, drops.get(k).unwrap_or(&none))?;
                k += 1;
            }
        }
        // (B, H, W, C) -> (B, C) -> (B, classes)
        let ys = self.norm.forward(&ys)?.mean(1)?.mean(1)?;
        self.head.forward(&ys)
    }

    fn store(&self) -> &ParamStore {
        &self.store
    }
}
