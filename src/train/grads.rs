//! Gradients of a training step: the task's loss and every parameter's gradient (what DP, SDP, the
//! baselines, the memory probe and the bench all take), and sums and scalings of named gradient maps.

use crate::models::{Net, ParamStore};
use crate::ops::profile::{self, Part};
use crate::task::Task;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::BTreeMap;

/// The task's loss of a training-mode forward pass on (x, y), and the gradient of every parameter.
pub fn loss_and_grads(
    task: &dyn Task,
    net: &dyn Net,
    x: &Tensor,
    y: &Tensor,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let out = {
        let _forward = profile::scope(Part::Forward);
        net.forward_t(x, true)?
    };
    loss_and_grads_of(task, net.store(), &out, y)
}

/// The task's loss of outputs `out` against `y`, and the gradient of every parameter of `store`.
pub fn loss_and_grads_of(
    task: &dyn Task,
    store: &ParamStore,
    out: &Tensor,
    y: &Tensor,
) -> Result<(f64, BTreeMap<String, Tensor>)> {
    let (loss, value) = {
        let _loss = profile::scope(Part::Loss);
        let loss = task.loss(out, y)?;
        let value = loss.to_scalar::<f32>()? as f64;
        (loss, value)
    };
    if !value.is_finite() {
        anyhow::bail!("training loss is {value}: the run diverged (try a smaller optim.lr)");
    }
    let _backward = profile::scope(Part::Backward);
    let mut gs = loss.backward()?;
    let mut grads = BTreeMap::new();
    for (name, var) in &store.params {
        if let Some(g) = gs.remove(var.as_tensor()) {
            grads.insert(name.clone(), g.detach());
        }
    }
    Ok((value, grads))
}

/// Adds every tensor of `add` to the one of the same name in `sum` (or inserts it).
pub fn accumulate(sum: &mut BTreeMap<String, Tensor>, add: BTreeMap<String, Tensor>) -> Result<()> {
    for (k, v) in add {
        let next = match sum.remove(&k) {
            Some(s) => (s + v)?,
            None => v,
        };
        sum.insert(k, next);
    }
    Ok(())
}

/// Every tensor of `map` times `s`.
pub fn scale(map: BTreeMap<String, Tensor>, s: f64) -> Result<BTreeMap<String, Tensor>> {
    map.into_iter().map(|(k, v)| Ok((k, (v * s)?))).collect()
}
