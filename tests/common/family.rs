//! The invariants every model family must satisfy, shared by tests/families.rs (built-in families) and
//! tests/custom_family.rs (a family registered from outside the crate).

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use sdp::models::{self, BlockPlan, Builder, Family, ModelArgs, Net, UnitKind};
use sdp::subnet;
use std::collections::BTreeMap;

/// Two stages of one and two blocks, widths 8 and 16: small enough for every family's constraints.
pub fn small(classes: usize) -> ModelArgs {
    ModelArgs {
        widths: Some(vec![8, 16]),
        depths: Some(vec![1, 2]),
        batch_norm: true,
        num_classes: classes,
        context: None,
    }
}

/// The subnetwork holding `plan`, gathered from the full model's values, checked against its index maps.
fn subnet_of(family: &dyn Family, full: &dyn Net, plan: &[BlockPlan]) -> Result<Box<dyn Net>> {
    let shapes = subnet::shapes(full.store());
    let maps = subnet::maps(family, &shapes, plan);
    let values = full.store().values();
    let local: BTreeMap<String, Tensor> =
        maps.iter().map(|(n, m)| Ok((n.clone(), m.gather(&values[n])?))).collect::<Result<_>>()?;
    let sub = family.build(plan, Builder::from_tensors(&local, &Device::Cpu))?;
    let held = subnet::shapes(sub.store());
    ensure!(held.keys().eq(maps.keys()), "tensors {:?} vs index maps {:?}", held.keys(), maps.keys());
    for (name, map) in &maps {
        ensure!(held[name] == map.local_shape(), "{name}: {:?} vs map {:?}", held[name], map.local_shape());
    }
    Ok(sub)
}

/// A small configuration of the family registered as `name`, an input batch of two examples for it, and the
/// shape of its outputs: images of 32×32 and class logits, or, for the decoders (`llama_*`, configured by
/// `[d]` and `[layers]`), five token ids and next-token logits.
fn small_case(name: &str, classes: usize) -> Result<(ModelArgs, Tensor, Vec<usize>)> {
    if name.starts_with("llama") {
        let args = ModelArgs { widths: Some(vec![8]), depths: Some(vec![3]), ..small(classes) };
        let ids = Tensor::new(&[[0u32, 2, 1, 1, 0], [1, 1, 2, 0, 2]], &Device::Cpu)?;
        return Ok((args, ids, vec![2, 5, classes]));
    }
    Ok((small(classes), Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu)?, vec![2, classes]))
}

/// What SDP relies on from the family registered as `name`, on a small configuration (docs at the top of
/// tests/families.rs).
pub fn check_family(name: &str) -> Result<()> {
    let classes = 3;
    let (args, xs, out) = small_case(name, classes)?;
    let family = models::family(name, &args).with_context(|| name.to_string())?;
    let full = family.build_full(1.0, Builder::from_seed(0, &Device::Cpu))?;
    ensure!(full.forward_t(&xs, false)?.dims() == out, "{name}: logits shape");
    let (widths, blocks) = (family.block_widths(), family.units(UnitKind::Block));
    ensure!(blocks.len() == family.block_names().len() && blocks.len() == widths.len(), "{name}: blocks");
    let neurons = family.units(UnitKind::Neuron);
    ensure!(neurons.len() == widths.iter().sum::<usize>(), "{name}: one neuron unit per internal channel");
    let total = full.store().num_params();
    // Without block 0's branch: its Block unit's parameters are gone.
    let mut plan = family.full_plan();
    plan[0].residual = false;
    let sub = subnet_of(family.as_ref(), full.as_ref(), &plan)?;
    ensure!(total - sub.store().num_params() == blocks[0].params, "{name}: block 0 owns its parameters");
    ensure!(sub.forward_t(&xs, true)?.dims() == out, "{name}: subnetwork logits");
    // Every block at its odd channels: the even channels' Neuron units' parameters are gone.
    let mut plan = family.full_plan();
    for p in &mut plan {
        p.channels.retain(|c| c % 2 == 1);
    }
    let sub = subnet_of(family.as_ref(), full.as_ref(), &plan)?;
    let dropped: usize = neurons.iter().filter(|u| u.index % 2 == 0).map(|u| u.params).sum();
    ensure!(total - sub.store().num_params() == dropped, "{name}: neuron units own their parameters");
    ensure!(sub.forward_t(&xs, true)?.dims() == out, "{name}: narrowed logits");
    Ok(())
}
