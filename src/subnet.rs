//! Physical subnetworks: which global coordinates each worker's local tensors hold, and moving values
//! between the global model and the workers (gather to build, scatter to average). DESIGN.md §2.
//!
//! A worker never holds a masked full-size model: dropped blocks have no tensors at all on that worker, and
//! kept internal channels are gathered into narrower dense tensors. An [`IndexMap`] records, per axis of a
//! local tensor, which global indices it holds.

use crate::models::layers::ParamStore;
use crate::models::resnet::{BlockPlan, ResNetConfig};
use crate::models::{Unit, UnitKind};
use candle_core::{Result, Tensor};
use std::collections::BTreeMap;

/// Which global coordinates a local tensor holds: per axis, all of them (`None`) or the listed indices.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexMap {
    pub global_shape: Vec<usize>,
    pub axes: Vec<Option<Vec<u32>>>,
}

impl IndexMap {
    /// The whole tensor.
    pub fn full(shape: &[usize]) -> Self {
        Self { global_shape: shape.to_vec(), axes: vec![None; shape.len()] }
    }

    /// The whole tensor except axis `axis`, of which only `indices` (sorted) are held.
    pub fn narrowed(shape: &[usize], axis: usize, indices: &[usize]) -> Self {
        let mut m = Self::full(shape);
        if indices.len() != shape[axis] {
            m.axes[axis] = Some(indices.iter().map(|&i| i as u32).collect());
        }
        m
    }

    pub fn local_shape(&self) -> Vec<usize> {
        self.global_shape.iter().zip(&self.axes).map(|(&g, a)| a.as_ref().map_or(g, |ix| ix.len())).collect()
    }

    /// Number of scalars held.
    pub fn local_len(&self) -> usize {
        self.local_shape().iter().product()
    }

    pub fn is_full(&self) -> bool {
        self.axes.iter().all(|a| a.is_none())
    }

    /// The local tensor: `global` restricted to the held coordinates.
    pub fn gather(&self, global: &Tensor) -> Result<Tensor> {
        let mut t = global.clone();
        for (axis, ix) in self.axes.iter().enumerate() {
            if let Some(ix) = ix {
                let idx = Tensor::from_slice(ix, ix.len(), global.device())?;
                t = t.index_select(&idx, axis)?;
            }
        }
        if self.is_full() {
            t.copy()
        } else {
            Ok(t)
        }
    }

    /// A global-shaped tensor holding `local` at its coordinates and zeros elsewhere.
    pub fn scatter(&self, local: &Tensor) -> Result<Tensor> {
        let mut t = local.clone();
        let mut shape = self.local_shape();
        // Expand one restricted axis at a time, innermost-first order does not matter.
        for (axis, ix) in self.axes.iter().enumerate() {
            if let Some(ix) = ix {
                shape[axis] = self.global_shape[axis];
                let idx = Tensor::from_slice(ix, ix.len(), local.device())?;
                t = Tensor::zeros(shape.as_slice(), local.dtype(), local.device())?.index_add(&idx, &t, axis)?;
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gather_then_scatter_roundtrips_on_held_coordinates() -> Result<()> {
        let g = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((2, 3, 4))?;
        let m = IndexMap::narrowed(&[2, 3, 4], 1, &[0, 2]);
        let l = m.gather(&g)?;
        assert_eq!(l.dims(), &[2, 2, 4]);
        assert_eq!(l.to_vec3::<f32>()?[1][1], vec![20.0, 21.0, 22.0, 23.0]);
        let s = m.scatter(&l)?;
        let v = s.to_vec3::<f32>()?;
        assert_eq!(v[0][1], vec![0.0; 4]);
        assert_eq!(v[1][2], vec![20.0, 21.0, 22.0, 23.0]);
        Ok(())
    }
}

/// What one worker holds of each ResNet block: the residual branch or not, and which internal channels.
#[derive(Clone, Debug, PartialEq)]
pub struct Keep {
    pub residual: bool,
    pub channels: Vec<usize>,
}

/// Per-worker [`Keep`]s from a selection over `units` (all of one kind) of `cfg`.
pub fn resnet_keeps(cfg: &ResNetConfig, units: &[Unit], holds: &[Vec<bool>]) -> Vec<Vec<Keep>> {
    let blocks = cfg.blocks();
    holds
        .iter()
        .map(|h| {
            let mut keeps: Vec<Keep> =
                blocks.iter().map(|b| Keep { residual: true, channels: (0..b.c_out).collect() }).collect();
            let mut neuron_seen = vec![false; blocks.len()];
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

/// The plan and index maps of a ResNet subnetwork. `shapes` are the full model's parameter and buffer
/// shapes by name; names of dropped branches are absent from the returned maps.
pub fn resnet_subnet(
    cfg: &ResNetConfig,
    shapes: &BTreeMap<String, Vec<usize>>,
    keeps: &[Keep],
    scale: f64,
) -> (Vec<BlockPlan>, BTreeMap<String, IndexMap>) {
    let blocks = cfg.blocks();
    let plan = keeps.iter().map(|k| BlockPlan { residual: k.residual, mid: k.channels.len(), scale }).collect();
    let mut maps = BTreeMap::new();
    for (name, shape) in shapes {
        let owner =
            blocks.iter().enumerate().find_map(|(b, s)| name.strip_prefix(&format!("{}.", s.name)).map(|r| (b, r)));
        let map = match owner {
            None => IndexMap::full(shape),
            Some((_, rest)) if rest.starts_with("shortcut.") => IndexMap::full(shape),
            Some((b, rest)) => {
                let k = &keeps[b];
                if !k.residual {
                    continue;
                }
                if rest == "conv1.weight" || rest.starts_with("bn1.") {
                    IndexMap::narrowed(shape, 0, &k.channels)
                } else if rest == "conv2.weight" {
                    IndexMap::narrowed(shape, 1, &k.channels)
                } else {
                    IndexMap::full(shape)
                }
            }
        };
        maps.insert(name.clone(), map);
    }
    (plan, maps)
}

/// Shapes of every parameter and buffer of a store, by name.
pub fn shapes(store: &ParamStore) -> BTreeMap<String, Vec<usize>> {
    store.params.iter().chain(&store.buffers).map(|(k, v)| (k.clone(), v.dims().to_vec())).collect()
}
