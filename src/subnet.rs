//! Physical subnetworks: which global coordinates each worker's local tensors hold, and moving values
//! between the global model and the workers (gather to build, scatter to average). docs/design.md §2.
//!
//! A worker never holds a masked full-size model: dropped blocks have no tensors at all on that worker, and
//! kept internal channels are gathered into narrower dense tensors. An [`IndexMap`] records, per axis of a
//! local tensor, which global indices it holds.

pub use crate::comm::IndexMap;
use crate::models::layers::ParamStore;
use crate::models::{BlockPlan, Family, Unit, UnitKind};
use std::collections::BTreeMap;

/// Index maps of the subnetwork of `family` holding `plan`: for every tensor it has, the global
/// coordinates. `shapes` are the full model's parameter and buffer shapes by name.
pub fn maps(
    family: &dyn Family,
    shapes: &BTreeMap<String, Vec<usize>>,
    plan: &[BlockPlan],
) -> BTreeMap<String, IndexMap> {
    let (names, shared, narrowed) = (family.block_names(), family.shared(), family.narrowed());
    let mut maps = BTreeMap::new();
    for (name, shape) in shapes {
        let owner = names.iter().enumerate().find_map(|(b, n)| name.strip_prefix(&format!("{n}.")).map(|r| (b, r)));
        let map = match owner {
            None => IndexMap::full(shape),
            Some((_, rest)) if shared.iter().any(|p| rest.starts_with(p)) => IndexMap::full(shape),
            Some((b, rest)) => {
                let p = &plan[b];
                if !p.residual {
                    continue;
                }
                match narrowed.iter().find(|(t, _)| *t == rest) {
                    Some(&(_, axis)) => IndexMap::narrowed(shape, axis, &p.channels),
                    None => IndexMap::full(shape),
                }
            }
        };
        maps.insert(name.clone(), map);
    }
    maps
}

/// Per-worker plans from a selection over `units` (all of one kind); `widths[b]` is block b's internal
/// width ([`Family::block_widths`]).
pub fn plans(widths: &[usize], units: &[Unit], holds: &[Vec<bool>]) -> Vec<Vec<BlockPlan>> {
    holds
        .iter()
        .map(|h| {
            let mut plan: Vec<BlockPlan> = widths.iter().map(|&w| BlockPlan::full(w)).collect();
            let mut neuron_seen = vec![false; widths.len()];
            for (u, &held) in units.iter().zip(h) {
                match u.kind {
                    UnitKind::Block => plan[u.block].residual = held,
                    UnitKind::Neuron => {
                        if !neuron_seen[u.block] {
                            neuron_seen[u.block] = true;
                            plan[u.block].channels.clear();
                        }
                        if held {
                            plan[u.block].channels.push(u.index);
                        }
                    }
                }
            }
            for p in &mut plan {
                p.channels.sort_unstable();
                if p.channels.is_empty() {
                    p.residual = false; // no internal channel held: the branch does not exist on this worker
                }
            }
            plan
        })
        .collect()
}

/// Shapes of every parameter and buffer of a store, by name.
pub fn shapes(store: &ParamStore) -> BTreeMap<String, Vec<usize>> {
    store.params.iter().chain(&store.buffers).map(|(k, v)| (k.clone(), v.dims().to_vec())).collect()
}
