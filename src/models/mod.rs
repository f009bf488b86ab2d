//! Models: the trait every trainable network implements, the trait every model family implements, and the
//! registry of families by their spec names (`workload.model`).

pub mod checkpoint;
pub mod info;
pub mod layers;
pub mod llama;
pub mod resnet;
pub mod swin;

use crate::registry::{Named, Registry};
use crate::spec::{Norm, Workload};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
pub use layers::{Builder, ParamStore};

/// A trainable network: a forward pass (train mode updates BatchNorm running statistics) and its
/// parameters and buffers by name.
pub trait Net: Send {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    fn store(&self) -> &ParamStore;
    /// Estimated activation elements per example kept for the backward pass, for one example's input of
    /// shape `input` (images: `[c, h, w]`; 0: unknown).
    fn activation_elems(&self, _input: &[usize]) -> usize {
        0
    }
    /// The forward pass with per-step random drops (the `stochastic_depth` and `dropout` baselines):
    /// `drops[b]` for block b in forward order (missing entries drop nothing; an empty slice is
    /// [`Net::forward_t`]). A network that implements it says so with [`Family::drops`]; the default only
    /// accepts drops that drop nothing.
    fn forward_dropping(&self, xs: &Tensor, train: bool, drops: &[BlockDrop]) -> candle_core::Result<Tensor> {
        if drops.iter().any(|d| !d.is_none()) {
            candle_core::bail!("this model does not implement per-step drops (Net::forward_dropping)");
        }
        self.forward_t(xs, train)
    }
}

/// Per-step random drops of one block, used by the stochastic-depth and dropout baselines.
#[derive(Clone, Debug, Default)]
pub struct BlockDrop {
    /// Skip the residual branch this step (the block is its skip path only, as without the Block unit).
    pub skip: bool,
    /// Multiplier per internal channel (0 or 1/keep), shape (width,): the block's Neuron units.
    pub channels: Option<Tensor>,
}

impl BlockDrop {
    /// Drops nothing.
    pub fn is_none(&self) -> bool {
        !self.skip && self.channels.is_none()
    }
}

/// A model family (docs/design.md §2, §7): a configured architecture whose blocks are the maskable units,
/// which builds the full model or any worker's subnetwork from one [`BlockPlan`] per block.
pub trait Family: Send + Sync {
    /// The blocks, in forward order, with what their units own.
    fn maskable(&self) -> Vec<MaskableBlock>;
    /// The network holding `plan` (one entry per block), with values from `b`.
    fn build(&self, plan: &[BlockPlan], b: Builder) -> candle_core::Result<Box<dyn Net>>;
    /// The block tensors a worker holds narrowed to its kept internal channels: (name after the block
    /// prefix, axis of the channels).
    fn narrowed(&self) -> &'static [(&'static str, usize)];
    /// Name prefixes (after the block prefix) of block tensors outside the residual branch, which every
    /// worker holds whole (ResNet: the projection shortcut).
    fn shared(&self) -> &'static [&'static str];
    /// The parameter groups `sdp model info` reports, in forward order.
    fn param_groups(&self) -> Vec<ParamGroup>;
    /// Per-stage widths and block counts (what distinguishes configurations of the family).
    fn stages(&self) -> (Vec<usize>, Vec<usize>);

    /// Parameters of the full model (what the `small_dense` baseline matches). The default counts them on
    /// a full model built on the CPU; a family with a formula overrides it.
    fn param_count(&self) -> candle_core::Result<usize> {
        Ok(self.build_full(1.0, Builder::from_seed(0, &Device::Cpu))?.store().num_params())
    }

    /// The family configured as this one but with per-stage `widths` (the `small_dense` baseline's narrowed
    /// model): what the family's registered constructor makes of [`ModelArgs::widths`]. The default: the
    /// family cannot be narrowed (an error; specs asking for `small_dense` are rejected).
    fn with_widths(&self, _widths: &[usize]) -> Result<Box<dyn Family>> {
        bail!("this model family cannot be narrowed (Family::with_widths)")
    }

    /// Its networks implement [`Net::forward_dropping`] (the `stochastic_depth` and `dropout` baselines).
    fn drops(&self) -> bool {
        false
    }

    /// Parameter-name prefix of each block, in forward order.
    fn block_names(&self) -> Vec<String> {
        self.maskable().into_iter().map(|b| b.name).collect()
    }

    /// Full internal width of each block.
    fn block_widths(&self) -> Vec<usize> {
        self.maskable().iter().map(|b| b.width).collect()
    }

    /// The maskable units of `kind` (docs/design.md §1), in forward order: one Block unit per block, or one
    /// Neuron unit per internal channel of each block.
    fn units(&self, kind: UnitKind) -> Vec<Unit> {
        let mut out = Vec::new();
        for (i, b) in self.maskable().into_iter().enumerate() {
            match kind {
                UnitKind::Block => {
                    out.push(Unit { kind, block: i, index: 0, name: b.name, params: b.params, act_elems: b.act_elems })
                }
                UnitKind::Neuron => out.extend((0..b.width).map(|c| Unit {
                    kind,
                    block: i,
                    index: c,
                    name: format!("{}#{c}", b.name),
                    params: b.neuron_params,
                    act_elems: b.neuron_act_elems,
                })),
            }
        }
        out
    }

    /// The full model's plan: every block present at full width.
    fn full_plan(&self) -> Vec<BlockPlan> {
        self.block_widths().into_iter().map(BlockPlan::full).collect()
    }

    /// The full model, its residual branches scaled by `scale`, with values from `b`.
    fn build_full(&self, scale: f64, b: Builder) -> candle_core::Result<Box<dyn Net>> {
        let plan: Vec<BlockPlan> = self.full_plan().into_iter().map(|p| BlockPlan { scale, ..p }).collect();
        self.build(&plan, b)
    }
}

/// One block as SDP masks it: its name, its internal width, and what its units own.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskableBlock {
    /// Parameter-name prefix (`layer1.0`, `layers.0.blocks.1`).
    pub name: String,
    /// Internal channels at full size, one Neuron unit each (ResNet: conv1 outputs; Swin: MLP hidden units).
    pub width: usize,
    /// Parameters the Block unit (the residual branch) owns.
    pub params: usize,
    /// Activation elements per sample the residual branch keeps for backward ([`Unit::act_elems`]).
    pub act_elems: usize,
    /// Parameters one Neuron unit owns.
    pub neuron_params: usize,
    /// Activation elements per sample one internal channel keeps for backward.
    pub neuron_act_elems: usize,
}

/// What one block holds in one network. The full model holds every block at full width; a worker's
/// subnetwork may lack a block's residual branch (its tensors do not exist there) and hold fewer internal
/// channels (gathered into narrower tensors, docs/design.md §2).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockPlan {
    /// The residual branch exists (ResNet: conv1 to bn2; Swin: the attention and MLP branches). false: the
    /// block is its skip path only.
    pub residual: bool,
    /// Internal channels held, as ascending global indices (ResNet: conv1 outputs; Swin: MLP hidden units).
    pub channels: Vec<usize>,
    /// Multiplier of the internal activations (1; `1/keep` with `method.rescale`, HeteroFL-style).
    pub mid_scale: f64,
    /// Multiplier of the residual branch output (1 in training; holder fraction in scaled evaluation).
    pub scale: f64,
}

impl BlockPlan {
    /// A block held whole: its residual branch with all `width` internal channels, unscaled.
    pub fn full(width: usize) -> Self {
        Self { residual: true, channels: (0..width).collect(), mid_scale: 1.0, scale: 1.0 }
    }
}

/// A parameter group of `sdp model info`: its name, the parameter-name prefixes it covers, and whether a
/// Block unit owns it.
pub type ParamGroup = (String, Vec<String>, bool);

/// What a family is configured from: the `[workload]` fields that shape a model, and the class count.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelArgs {
    /// Per-stage widths overriding the named model's (`workload.widths`).
    pub widths: Option<Vec<usize>>,
    /// Per-stage block counts overriding the named model's (`workload.depths`).
    pub depths: Option<Vec<usize>>,
    /// BatchNorm layers, where the family has them (`workload.norm`).
    pub batch_norm: bool,
    pub num_classes: usize,
    /// Tokens per sequence (`workload.context`), for families of sequence models; their activation
    /// estimates take it (`None`: the family's own default).
    pub context: Option<usize>,
}

impl ModelArgs {
    /// The arguments a workload gives.
    pub fn of(w: &Workload, num_classes: usize) -> Self {
        Self {
            widths: w.widths.clone(),
            depths: w.depths.clone(),
            batch_norm: w.norm == Norm::Batch,
            num_classes,
            context: w.context,
        }
    }

    /// The named model at its own size, with BatchNorm.
    pub fn named(num_classes: usize) -> Self {
        Self { widths: None, depths: None, batch_norm: true, num_classes, context: None }
    }
}

/// Configures a family from its arguments (the message of an error names the offending field).
pub type Constructor = fn(&ModelArgs) -> Result<Box<dyn Family>>;

impl Named for (&'static str, Constructor) {
    fn name(&self) -> &'static str {
        self.0
    }
}

/// Every model by its spec name (`workload.model`): a new family is a file and a line here; families
/// defined outside the crate are added with [`register`].
static REGISTRY: Registry<(&'static str, Constructor)> = Registry::new(
    "model family",
    &[
        ("resnet", resnet::resnet),
        ("resnet18", resnet::resnet18),
        ("wrn18", resnet::wrn18),
        ("swin_t", swin::swin_t),
        ("llama_tiny", llama::llama_tiny),
        ("llama_134m", llama::llama_134m),
    ],
);

/// Registers a family defined outside this crate (a downstream crate, a test) under `name`, after which
/// specs may name it like a built-in one. A name already taken is an error.
pub fn register(name: &'static str, new: Constructor) -> Result<()> {
    REGISTRY.register((name, new))
}

/// The registered model names.
pub fn names() -> Vec<&'static str> {
    REGISTRY.names()
}

/// The family registered as `name`, configured from `args`.
pub fn family(name: &str, args: &ModelArgs) -> Result<Box<dyn Family>> {
    match REGISTRY.find(name) {
        Some((_, new)) => new(args),
        None => bail!("unknown model `{name}` (expected one of {})", names().join(", ")),
    }
}

/// The family a workload names, configured by its overrides.
pub fn of(w: &Workload, num_classes: usize) -> Result<Box<dyn Family>> {
    family(w.model.as_str(), &ModelArgs::of(w, num_classes))
}

/// Builds the full model a workload names, initialised from `seed`'s init stream, on `device`.
pub fn build(w: &Workload, num_classes: usize, seed: u64, device: &Device) -> Result<Box<dyn Net>> {
    let b = Builder::from_seed(seed, device).with_compute_dtype(w.precision.dtype());
    Ok(of(w, num_classes)?.build_full(1.0, b)?)
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
