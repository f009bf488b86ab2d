//! Models: the trait every trainable network implements, and construction from a spec.

pub mod checkpoint;
pub mod info;
pub mod layers;
pub mod resnet;
pub mod swin;

use crate::spec::{ModelName, Norm, Workload};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
pub use layers::{Builder, ParamStore};
use resnet::ResNetConfig;
use swin::SwinConfig;

/// A trainable network: a forward pass (train mode updates BatchNorm running statistics) and its
/// parameters and buffers by name.
pub trait Net: Send {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    fn store(&self) -> &ParamStore;
    /// Estimated activation elements per image kept for the backward pass at input size h×w (0: unknown).
    fn activation_elems(&self, _h: usize, _w: usize) -> usize {
        0
    }
}

/// The ResNet-family configuration a workload names (with its width/depth overrides applied).
pub fn resnet_config(w: &Workload, num_classes: usize) -> Result<ResNetConfig> {
    let mut cfg = match w.model {
        ModelName::Resnet18 | ModelName::Resnet => ResNetConfig::resnet18(num_classes),
        ModelName::Wrn18 => ResNetConfig::wrn18(num_classes),
        ModelName::SwinT => bail!("workload.model = \"swin_t\" is not a ResNet"),
    };
    if let Some(ws) = &w.widths {
        cfg.widths = ws.clone();
    }
    if let Some(ds) = &w.depths {
        cfg.depths = ds.clone();
    }
    if cfg.widths.len() != cfg.depths.len() {
        bail!("workload.widths has {} stages but workload.depths has {}", cfg.widths.len(), cfg.depths.len());
    }
    cfg.batch_norm = w.norm == Norm::Batch;
    Ok(cfg)
}

/// The Swin configuration a workload names: Swin-T, with `widths` as per-stage dims and `depths` as
/// per-stage block counts when given. Heads follow the dims: dim / 32 per stage (Swin-T's head dim of 32;
/// see [`swin::default_heads`] for dims below 32 or not divisible), so `swin_t` without overrides keeps
/// heads 3/6/12/24. `workload.norm` does not apply (Swin's LayerNorms are always present).
pub fn swin_config(w: &Workload, num_classes: usize) -> Result<SwinConfig> {
    let base = SwinConfig::swin_t(num_classes);
    let dims = w.widths.clone().unwrap_or_else(|| base.dims.clone());
    let depths = w.depths.clone().unwrap_or_else(|| base.depths.clone());
    let cfg = SwinConfig::with_dims(dims, depths, num_classes);
    if let Err(e) = cfg.validate() {
        bail!("workload.widths/depths for swin_t: {e}");
    }
    Ok(cfg)
}

/// Builds the full model a workload names, initialised from `seed`'s init stream, on `device` (the
/// subnetwork builder of `subnet::Arch` with every unit kept).
pub fn build(w: &Workload, num_classes: usize, seed: u64, device: &Device) -> Result<Box<dyn Net>> {
    let b = Builder::from_seed(seed, device).with_compute_dtype(w.precision.dtype());
    Ok(crate::subnet::Arch::of(w, num_classes)?.build(None, 1.0, None, b)?)
}

/// The two kinds of maskable unit (docs/design.md §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitKind {
    /// A residual branch (ResNet BasicBlock branch; a Swin block's attention + MLP branches). Dropping it
    /// leaves the skip path (and a downsampling block's projection shortcut, which is shared).
    Block,
    /// One internal channel of a block: a ResNet block's conv1 output / conv2 input channel; a Swin block's
    /// MLP hidden unit.
    Neuron,
}

/// A maskable unit: which block it belongs to, and the parameter slices it owns.
#[derive(Clone, Debug, PartialEq)]
pub struct Unit {
    pub kind: UnitKind,
    /// Index of the block (forward order) the unit belongs to.
    pub block: usize,
    /// Block units: 0. Neuron units: the channel / hidden-unit index inside the block.
    pub index: usize,
    /// Human-readable name: `layer1.0` (block) or `layer1.0#17` (neuron 17 of that block).
    pub name: String,
    /// Scalar parameters this unit owns (its share of the block's parameters).
    pub params: usize,
    /// Activation elements per input sample (at the model's input size) that holding the unit adds to
    /// what a training step keeps for its backward pass: an estimate from the layer shapes, used to
    /// balance activation memory across workers (`block_act` masking) and for accounting.
    pub act_elems: usize,
}
