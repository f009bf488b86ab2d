//! The CIFAR ResNet family (BasicBlocks, 3×3 stem without max-pool): resnet18, wrn18 and tiny variants are
//! one implementation with configurable widths and depths (docs/design.md §7).
//!
//! A network is built from a [`ResNetConfig`] (the [`Family`]) and a per-block [`BlockPlan`]: the full model
//! holds every residual branch at full width; a worker's subnetwork may lack some branches (they do not
//! exist on that worker) and hold fewer internal channels. Parameter names are the PyTorch reference
//! `state_dict` keys (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.shortcut.0`, …, `linear`).

use super::layers::{BatchNorm, Builder, Conv2d, Linear, ParamStore};
use super::{BlockDrop, BlockPlan, Family, MaskableBlock, ModelArgs, Net, ParamGroup};
use crate::ops::Epilogue;
use candle_core::{DType, Result, Tensor, D};

/// `resnet`: the ResNet-18 layout with the workload's own `widths` and `depths` (both required).
pub fn resnet(a: &ModelArgs) -> anyhow::Result<Box<dyn Family>> {
    if a.widths.is_none() || a.depths.is_none() {
        anyhow::bail!("`resnet` needs explicit `widths` and `depths`");
    }
    configured(ResNetConfig::resnet18(a.num_classes), a)
}

/// `resnet18`, with the workload's width and depth overrides.
pub fn resnet18(a: &ModelArgs) -> anyhow::Result<Box<dyn Family>> {
    configured(ResNetConfig::resnet18(a.num_classes), a)
}

/// `wrn18` (ResNet-18 at twice the width), with the workload's width and depth overrides.
pub fn wrn18(a: &ModelArgs) -> anyhow::Result<Box<dyn Family>> {
    configured(ResNetConfig::wrn18(a.num_classes), a)
}

/// `base` with the overrides of `a` applied.
fn configured(base: ResNetConfig, a: &ModelArgs) -> anyhow::Result<Box<dyn Family>> {
    let mut cfg = base;
    if let Some(ws) = &a.widths {
        cfg.widths = ws.clone();
    }
    if let Some(ds) = &a.depths {
        cfg.depths = ds.clone();
    }
    if cfg.widths.len() != cfg.depths.len() {
        anyhow::bail!("workload.widths has {} stages but workload.depths has {}", cfg.widths.len(), cfg.depths.len());
    }
    cfg.batch_norm = a.batch_norm;
    Ok(Box::new(cfg))
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResNetConfig {
    /// Output channels of each stage (the stem has `widths[0]`).
    pub widths: Vec<usize>,
    /// BasicBlocks per stage.
    pub depths: Vec<usize>,
    pub num_classes: usize,
    /// BatchNorm layers (false: identity, used by exactness tests).
    pub batch_norm: bool,
}

impl ResNetConfig {
    pub fn resnet18(num_classes: usize) -> Self {
        Self { widths: vec![64, 128, 256, 512], depths: vec![2, 2, 2, 2], num_classes, batch_norm: true }
    }

    pub fn wrn18(num_classes: usize) -> Self {
        Self { widths: vec![128, 256, 512, 1024], ..Self::resnet18(num_classes) }
    }

    /// Blocks in forward order: (name, stage, in channels, out channels, stride).
    pub fn blocks(&self) -> Vec<BlockShape> {
        let mut out = Vec::new();
        let mut c_in = self.widths[0];
        for (s, (&w, &d)) in self.widths.iter().zip(&self.depths).enumerate() {
            for j in 0..d {
                let stride = if s > 0 && j == 0 { 2 } else { 1 };
                out.push(BlockShape { name: format!("layer{}.{j}", s + 1), c_in, c_out: w, stride });
                c_in = w;
            }
        }
        out
    }

    /// Output pixels (H×W) of each block for a 32×32 input.
    pub fn block_pixels(&self) -> Vec<usize> {
        let mut side = 32;
        self.blocks()
            .iter()
            .map(|s| {
                side = (side - 1) / s.stride + 1;
                side * side
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BlockShape {
    pub name: String,
    pub c_in: usize,
    pub c_out: usize,
    pub stride: usize,
}

impl BlockShape {
    /// A projection shortcut (1×1 conv + BN) exists where the shape changes.
    pub fn has_projection(&self) -> bool {
        self.stride != 1 || self.c_in != self.c_out
    }
}

impl Family for ResNetConfig {
    /// A Block unit owns its residual branch (conv1, bn1, conv2, bn2; not the projection shortcut, which
    /// is shared); a Neuron unit owns one internal channel (a conv1 output filter, its bn1 scale and shift,
    /// and a conv2 input slice).
    fn maskable(&self) -> Vec<MaskableBlock> {
        let bn = if self.batch_norm { 2 } else { 0 };
        self.blocks()
            .into_iter()
            .zip(self.block_pixels())
            .map(|(s, hw)| {
                let per_channel = s.c_in * 9 + bn + s.c_out * 9;
                MaskableBlock {
                    width: s.c_out,
                    params: per_channel * s.c_out + bn * s.c_out,
                    act_elems: branch_act_elems(s.c_out, s.c_out, hw),
                    neuron_params: per_channel,
                    // One internal channel: its conv1 output and its BN-ReLU output.
                    neuron_act_elems: 2 * hw,
                    name: s.name,
                }
            })
            .collect()
    }

    fn build(&self, plan: &[BlockPlan], b: Builder) -> Result<Box<dyn Net>> {
        Ok(Box::new(ResNet::new(self, plan, b)?))
    }

    /// conv1's filters, bn1's channels and conv2's input slices.
    fn narrowed(&self) -> &'static [(&'static str, usize)] {
        &[
            ("conv1.weight", 0),
            ("bn1.weight", 0),
            ("bn1.bias", 0),
            ("bn1.running_mean", 0),
            ("bn1.running_var", 0),
            ("conv2.weight", 1),
        ]
    }

    fn shared(&self) -> &'static [&'static str] {
        &["shortcut."]
    }

    /// The stem, each block's branch and projection shortcut, the head.
    fn param_groups(&self) -> Vec<ParamGroup> {
        let mut groups: Vec<ParamGroup> = vec![("stem".into(), vec!["conv1.".into(), "bn1.".into()], false)];
        for b in self.blocks() {
            let n = &b.name;
            let branch = ["conv1", "bn1", "conv2", "bn2"].iter().map(|l| format!("{n}.{l}.")).collect();
            groups.push((format!("{n} (branch)"), branch, true));
            if b.has_projection() {
                groups.push((format!("{n}.shortcut"), vec![format!("{n}.shortcut.")], false));
            }
        }
        groups.push(("head (linear)".into(), vec!["linear.".into()], false));
        groups
    }

    fn stages(&self) -> (Vec<usize>, Vec<usize>) {
        (self.widths.clone(), self.depths.clone())
    }

    /// The stem, every residual branch and projection shortcut, the head.
    fn param_count(&self) -> Result<usize> {
        let blocks: usize = self.maskable().iter().map(|b| b.params).sum();
        let bn = if self.batch_norm { 2 } else { 0 };
        let stem = 3 * 9 * self.widths[0] + bn * self.widths[0];
        let shortcuts: usize =
            self.blocks().iter().filter(|b| b.has_projection()).map(|b| b.c_in * b.c_out + bn * b.c_out).sum();
        let head = self.widths.last().copied().unwrap_or(0) * self.num_classes + self.num_classes;
        Ok(stem + blocks + shortcuts + head)
    }

    /// The same depths, BatchNorm and classes at `widths` (as `workload.widths` would give).
    fn with_widths(&self, widths: &[usize]) -> anyhow::Result<Box<dyn Family>> {
        let a = ModelArgs {
            widths: Some(widths.to_vec()),
            depths: None,
            batch_norm: self.batch_norm,
            num_classes: self.num_classes,
            context: None,
        };
        configured(self.clone(), &a)
    }

    fn drops(&self) -> bool {
        true
    }
}

struct Branch {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
}

struct BasicBlock {
    branch: Option<Branch>,
    shortcut: Option<(Conv2d, BatchNorm)>,
    scale: f64,
    mid_scale: f64,
}

impl BasicBlock {
    fn new(b: &mut Builder, shape: &BlockShape, plan: &BlockPlan, bn: bool) -> Result<Self> {
        let (n, mid) = (&shape.name, plan.channels.len());
        let branch = if plan.residual {
            Some(Branch {
                conv1: Conv2d::new(b, &format!("{n}.conv1"), shape.c_in, mid, 3, shape.stride, 1)?,
                bn1: BatchNorm::new(b, &format!("{n}.bn1"), mid, bn)?,
                conv2: Conv2d::new(b, &format!("{n}.conv2"), mid, shape.c_out, 3, 1, 1)?,
                bn2: BatchNorm::new(b, &format!("{n}.bn2"), shape.c_out, bn)?,
            })
        } else {
            None
        };
        let shortcut = if shape.has_projection() {
            Some((
                Conv2d::new(b, &format!("{n}.shortcut.0"), shape.c_in, shape.c_out, 1, shape.stride, 0)?,
                BatchNorm::new(b, &format!("{n}.shortcut.1"), shape.c_out, bn)?,
            ))
        } else {
            None
        };
        Ok(Self { branch, shortcut, scale: plan.scale, mid_scale: plan.mid_scale })
    }

    fn forward_t(&self, xs: &Tensor, train: bool, drop: &BlockDrop) -> Result<Tensor> {
        let branch = self.branch.as_ref().filter(|_| !drop.skip);
        let skip = match &self.shortcut {
            // Without a branch the block's output is relu(shortcut): fused into the shortcut's BN.
            Some((conv, bn)) => {
                bn.forward_fused(&conv.forward(xs)?, train, &Epilogue { relu: branch.is_none(), ..Default::default() })?
            }
            None if branch.is_none() => xs.relu()?,
            None => xs.clone(),
        };
        let Some(br) = branch else { return Ok(skip) };
        // relu(bn1) * mid_scale = relu(mid_scale * bn1), as mid_scale > 0.
        let epi = Epilogue { scale: self.mid_scale, relu: true, ..Default::default() };
        let ys = br.bn1.forward_fused(&br.conv1.forward(xs)?, train, &epi)?;
        // Channel dropout (baseline): a per-step 0/(1/keep) multiplier per internal channel.
        let ys = match &drop.channels {
            Some(m) => ys.broadcast_mul(&m.to_dtype(ys.dtype())?.reshape((1, m.dim(0)?, 1, 1))?)?,
            None => ys,
        };
        let epi = Epilogue { scale: self.scale, residual: Some(&skip), relu: true };
        br.bn2.forward_fused(&br.conv2.forward(&ys)?, train, &epi)
    }
}

pub struct ResNet {
    pub cfg: ResNetConfig,
    pub plan: Vec<BlockPlan>,
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<BasicBlock>,
    linear: Linear,
    store: ParamStore,
    /// Activation dtype (see [`Builder::with_compute_dtype`]); logits are returned in f32.
    compute: DType,
}

impl ResNet {
    pub fn new(cfg: &ResNetConfig, plan: &[BlockPlan], mut b: Builder) -> Result<Self> {
        let shapes = cfg.blocks();
        if plan.len() != shapes.len() {
            candle_core::bail!("plan has {} blocks, the model {}", plan.len(), shapes.len());
        }
        let conv1 = Conv2d::new(&mut b, "conv1", 3, cfg.widths[0], 3, 1, 1)?;
        let bn1 = BatchNorm::new(&mut b, "bn1", cfg.widths[0], cfg.batch_norm)?;
        let blocks = shapes
            .iter()
            .zip(plan)
            .map(|(s, p)| BasicBlock::new(&mut b, s, p, cfg.batch_norm))
            .collect::<Result<Vec<_>>>()?;
        let c_last = *cfg.widths.last().unwrap_or(&cfg.widths[0]);
        let linear = Linear::new(&mut b, "linear", c_last, cfg.num_classes, true)?;
        let compute = b.compute_dtype();
        Ok(Self { cfg: cfg.clone(), plan: plan.to_vec(), conv1, bn1, blocks, linear, store: b.store, compute })
    }
}

/// Activations a residual branch keeps for backward, per sample: conv1's output and the fused
/// BN-ReLU output (`mid` channels each) and conv2's output (`c_out`); the fused BN-add-ReLU output is
/// the block's output, kept with or without the branch.
fn branch_act_elems(mid: usize, c_out: usize, hw: usize) -> usize {
    (2 * mid + c_out) * hw
}

impl Net for ResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_dropping(xs, train, &[])
    }

    /// Stochastic depth skips a block's branch (its output is relu(shortcut)); channel dropout multiplies
    /// the branch's internal channels (relu(bn1) output) by the mask.
    fn forward_dropping(&self, xs: &Tensor, train: bool, drops: &[BlockDrop]) -> Result<Tensor> {
        let none = BlockDrop::default();
        // (B, 3, 32, 32) -> (B, widths[0], 32, 32)
        let xs = xs.to_dtype(self.compute)?;
        let relu = Epilogue { relu: true, ..Default::default() };
        let mut ys = self.bn1.forward_fused(&self.conv1.forward(&xs)?, train, &relu)?;
        for (b, block) in self.blocks.iter().enumerate() {
            ys = block.forward_t(&ys, train, drops.get(b).unwrap_or(&none))?;
        }
        // (B, C, H, W) -> (B, C) -> (B, classes)
        // The head and the loss run in f32 (standard mixed precision; also, candle's CPU matmul
        // has no bf16).
        let ys = ys.flatten_from(2)?.to_dtype(DType::F32)?.mean(D::Minus1)?;
        self.linear.forward(&ys)
    }

    fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Estimated activation elements per image kept for the backward pass at input size c×h×w: the
    /// outputs of every conv, BatchNorm, ReLU and residual add (an upper-bound style estimate; the
    /// measured peak memory is the real figure).
    fn activation_elems(&self, input: &[usize]) -> usize {
        let &[_, h, w] = input else { return 0 };
        let c0 = self.cfg.widths[0];
        let mut n = 2 * c0 * h * w; // stem conv, fused bn+relu
        let (mut h, mut w) = (h, w);
        for (shape, plan) in self.cfg.blocks().iter().zip(&self.plan) {
            let (ho, wo) = ((h - 1) / shape.stride + 1, (w - 1) / shape.stride + 1);
            let hw = ho * wo;
            if shape.has_projection() {
                n += 2 * shape.c_out * hw; // shortcut conv, bn
            }
            if plan.residual {
                n += branch_act_elems(plan.channels.len(), shape.c_out, hw);
            }
            n += shape.c_out * hw; // the block output: fused bn2+add+relu, or relu(shortcut)
            (h, w) = (ho, wo);
        }
        n + self.cfg.widths.last().copied().unwrap_or(c0) + self.cfg.num_classes
    }
}
