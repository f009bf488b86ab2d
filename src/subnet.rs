//! Physical subnetworks: which global coordinates each worker's local tensors hold, and moving values
//! between the global model and the workers (gather to build, scatter to average). docs/design.md §2.
//!
//! A worker never holds a masked full-size model: dropped blocks have no tensors at all on that worker, and
//! kept internal channels are gathered into narrower dense tensors. An [`IndexMap`] records, per axis of a
//! local tensor, which global indices it holds.

pub use crate::comm::IndexMap;
use crate::models::layers::{Builder, ParamStore};
use crate::models::resnet::{BlockPlan, ResNet, ResNetConfig};
use crate::models::swin::{Swin, SwinBlockPlan, SwinConfig};
use crate::models::{self, Net, Unit, UnitKind};
use crate::spec::{ModelName, Workload};
use candle_core::Result;
use std::collections::BTreeMap;

/// What one worker holds of each ResNet block: the residual branch or not, and which internal channels.
#[derive(Clone, Debug, PartialEq)]
pub struct Keep {
    pub residual: bool,
    pub channels: Vec<usize>,
}

/// A maskable architecture: the model family a worker's subnetwork is built from (docs/design.md §2).
#[derive(Clone, Debug, PartialEq)]
pub enum Arch {
    ResNet(ResNetConfig),
    Swin(SwinConfig),
}

impl Arch {
    /// The architecture a workload names.
    pub fn of(w: &Workload, num_classes: usize) -> anyhow::Result<Self> {
        Ok(match w.model {
            ModelName::SwinT => Self::Swin(models::swin_config(w, num_classes)?),
            _ => Self::ResNet(models::resnet_config(w, num_classes)?),
        })
    }

    pub fn units(&self, kind: UnitKind) -> Vec<Unit> {
        match self {
            Self::ResNet(c) => c.units(kind),
            Self::Swin(c) => c.units(kind),
        }
    }

    /// Internal width of each block (ResNet: conv1 output channels; Swin: MLP hidden units).
    pub fn block_widths(&self) -> Vec<usize> {
        match self {
            Self::ResNet(c) => c.blocks().iter().map(|b| b.c_out).collect(),
            Self::Swin(c) => c.blocks().iter().map(|b| b.mlp_hidden).collect(),
        }
    }

    /// The network holding `keeps` (all blocks at full width: the full model), residual branches scaled
    /// by `scale`, with values from `b`. `rescale[b]` = (branch, internal) multipliers of block b in
    /// training (`method.rescale`); `None`: 1.
    pub fn build(
        &self,
        keeps: Option<&[Keep]>,
        scale: f64,
        rescale: Option<&[(f64, f64)]>,
        b: Builder,
    ) -> Result<Box<dyn Net>> {
        let factor = |i: usize| rescale.and_then(|r| r.get(i)).copied().unwrap_or((1.0, 1.0));
        // Per kept block, whatever the family: (present, hidden units kept, branch scale, hidden scale).
        let kept: Option<Vec<(bool, usize, f64, f64)>> = keeps.map(|k| {
            k.iter()
                .enumerate()
                .map(|(i, k)| (k.residual, k.channels.len(), scale * factor(i).0, factor(i).1))
                .collect()
        });
        Ok(match self {
            Self::ResNet(c) => {
                let plan: Vec<BlockPlan> = match &kept {
                    Some(k) => k
                        .iter()
                        .map(|&(residual, mid, scale, mid_scale)| BlockPlan { residual, mid, scale, mid_scale })
                        .collect(),
                    None => c.full_plan().into_iter().map(|p| BlockPlan { scale, ..p }).collect(),
                };
                Box::new(ResNet::new(c, &plan, b)?)
            }
            Self::Swin(c) => {
                let plan: Vec<SwinBlockPlan> = match &kept {
                    Some(k) => k
                        .iter()
                        .map(|&(present, mlp_hidden, scale, mlp_scale)| SwinBlockPlan {
                            present,
                            mlp_hidden,
                            scale,
                            mlp_scale,
                        })
                        .collect(),
                    None => c.full_plan().into_iter().map(|p| SwinBlockPlan { scale, ..p }).collect(),
                };
                Box::new(Swin::new(c, &plan, b)?)
            }
        })
    }

    /// Index maps of the subnetwork holding `keeps`: for every tensor it has, the global coordinates.
    /// `shapes` are the full model's parameter and buffer shapes by name.
    pub fn maps(&self, shapes: &BTreeMap<String, Vec<usize>>, keeps: &[Keep]) -> BTreeMap<String, IndexMap> {
        // (block name prefix, tensors of the block outside its residual branches, narrowed tensors)
        let (names, shared_suffix, narrowed): (Vec<String>, &[&str], &[(&str, usize)]) = match self {
            Self::ResNet(c) => (
                c.blocks().into_iter().map(|b| b.name).collect(),
                &["shortcut."],
                &[
                    ("conv1.weight", 0),
                    ("bn1.weight", 0),
                    ("bn1.bias", 0),
                    ("bn1.running_mean", 0),
                    ("bn1.running_var", 0),
                    ("conv2.weight", 1),
                ],
            ),
            Self::Swin(c) => (
                c.blocks().into_iter().map(|b| b.name).collect(),
                &[],
                &[("mlp.fc1.weight", 0), ("mlp.fc1.bias", 0), ("mlp.fc2.weight", 1)],
            ),
        };
        let mut maps = BTreeMap::new();
        for (name, shape) in shapes {
            let owner = names.iter().enumerate().find_map(|(b, n)| name.strip_prefix(&format!("{n}.")).map(|r| (b, r)));
            let map = match owner {
                None => IndexMap::full(shape),
                Some((_, rest)) if shared_suffix.iter().any(|p| rest.starts_with(p)) => IndexMap::full(shape),
                Some((b, rest)) => {
                    let k = &keeps[b];
                    if !k.residual {
                        continue;
                    }
                    match narrowed.iter().find(|(t, _)| *t == rest) {
                        Some(&(_, axis)) => IndexMap::narrowed(shape, axis, &k.channels),
                        None => IndexMap::full(shape),
                    }
                }
            };
            maps.insert(name.clone(), map);
        }
        maps
    }
}

/// Per-worker [`Keep`]s from a selection over `units` (all of one kind); `widths[b]` is block b's
/// internal width ([`Arch::block_widths`]).
pub fn keeps(widths: &[usize], units: &[Unit], holds: &[Vec<bool>]) -> Vec<Vec<Keep>> {
    holds
        .iter()
        .map(|h| {
            let mut keeps: Vec<Keep> =
                widths.iter().map(|&w| Keep { residual: true, channels: (0..w).collect() }).collect();
            let mut neuron_seen = vec![false; widths.len()];
            for (u, &held) in units.iter().zip(h) {
                match u.kind {
                    UnitKind::Block => keeps[u.block].residual = held,
                    UnitKind::Neuron => {
                        if !neuron_seen[u.block] {
                            neuron_seen[u.block] = true;
                            keeps[u.block].channels.clear();
                        }
                        if held {
                            keeps[u.block].channels.push(u.index);
                        }
                    }
                }
            }
            for k in &mut keeps {
                k.channels.sort_unstable();
                if k.channels.is_empty() {
                    k.residual = false; // no internal channel held: the branch does not exist on this worker
                }
            }
            keeps
        })
        .collect()
}

/// The plan and index maps of a ResNet subnetwork (see [`Arch::maps`]).
pub fn resnet_subnet(
    cfg: &ResNetConfig,
    shapes: &BTreeMap<String, Vec<usize>>,
    keeps: &[Keep],
    scale: f64,
) -> (Vec<BlockPlan>, BTreeMap<String, IndexMap>) {
    let plan = keeps
        .iter()
        .map(|k| BlockPlan { residual: k.residual, mid: k.channels.len(), scale, mid_scale: 1.0 })
        .collect();
    (plan, Arch::ResNet(cfg.clone()).maps(shapes, keeps))
}

/// Shapes of every parameter and buffer of a store, by name.
pub fn shapes(store: &ParamStore) -> BTreeMap<String, Vec<usize>> {
    store.params.iter().chain(&store.buffers).map(|(k, v)| (k.clone(), v.dims().to_vec())).collect()
}
