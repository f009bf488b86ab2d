//! `sdp info model`: where a model's parameters are (per unit group: stem / patch embedding, each block's
//! residual branch, shortcuts and patch mergings, head) and how many maskable units of each kind it has.
//!
//! Counts come from the built model's [`ParamStore`] (not from a formula), so they check the model code
//! itself against docs/design.md §7; the unit listing is cross-checked against the same store.

use super::{family, Builder, ModelArgs, ParamGroup, ParamStore, Unit, UnitKind};
use anyhow::{bail, Result};
use candle_core::Device;
use std::fmt::Write;

/// Parameter counts of a full-size model, by group in forward order, and its units.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub model: String,
    pub num_classes: usize,
    /// (group name, parameters, owned by a Block unit).
    pub groups: Vec<(String, usize, bool)>,
    pub total: usize,
    pub block_units: Vec<Unit>,
    pub neuron_units: Vec<Unit>,
}

/// Builds the registered model `model` (`resnet18`, `wrn18`, `swin_t`, …) at full size on the CPU and
/// counts its parameters.
pub fn model_info(model: &str, num_classes: usize) -> Result<ModelInfo> {
    let family = family(model, &ModelArgs::named(num_classes))?;
    let net = family.build_full(1.0, Builder::from_seed(0, &Device::Cpu))?;
    let store = net.store();
    Ok(ModelInfo {
        model: model.to_string(),
        num_classes,
        groups: group_params(store, &family.param_groups())?,
        total: store.num_params(),
        block_units: family.units(UnitKind::Block),
        neuron_units: family.units(UnitKind::Neuron),
    })
}

/// Sums the store's parameters into the groups; every parameter must fall in exactly one group.
fn group_params(store: &ParamStore, specs: &[ParamGroup]) -> Result<Vec<(String, usize, bool)>> {
    let mut counts = vec![0usize; specs.len()];
    for (name, var) in &store.params {
        let hits: Vec<usize> = specs
            .iter()
            .enumerate()
            .filter(|(_, (_, prefixes, _))| prefixes.iter().any(|p| name.starts_with(p.as_str())))
            .map(|(i, _)| i)
            .collect();
        match hits.as_slice() {
            [i] => counts[*i] += var.elem_count(),
            [] => bail!("parameter `{name}` belongs to no group"),
            _ => bail!("parameter `{name}` belongs to several groups"),
        }
    }
    Ok(specs.iter().zip(counts).map(|((n, _, owned), c)| (n.clone(), c, *owned)).collect())
}

/// `12345678` → `12,345,678`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The report `sdp info model` prints: one line per group, the total, and unit counts per kind with the
/// parameters they own and the parameters shared by every worker.
pub fn info_report(model: &str, classes: usize) -> Result<String> {
    let info = model_info(model, classes)?;
    let mut s = String::new();
    let w = info.groups.iter().map(|g| g.0.len()).max().unwrap_or(0).max(24);
    writeln!(s, "{} ({} classes)", info.model, info.num_classes)?;
    for (name, count, owned) in &info.groups {
        let tag = if *owned { "block unit" } else { "shared" };
        writeln!(s, "  {name:<w$} {:>12}  {tag}", thousands(*count))?;
    }
    writeln!(s, "  {:<w$} {:>12}", "total parameters", thousands(info.total))?;
    for (kind, units) in [("block", &info.block_units), ("neuron", &info.neuron_units)] {
        let owned: usize = units.iter().map(|u| u.params).sum();
        writeln!(
            s,
            "  {kind} units: {} (own {} parameters, {} shared)",
            thousands(units.len()),
            thousands(owned),
            thousands(info.total - owned.min(info.total))
        )?;
    }
    Ok(s)
}
