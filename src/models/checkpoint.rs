//! Checkpoints: a model's parameters and buffers as one safetensors file, under their `state_dict` names
//! (so a file can be read by PyTorch's `safetensors.torch.load_file` and compared key by key).
//!
//! Writes are atomic (a temporary file in the same directory, then a rename), so an interrupted run never
//! leaves a truncated checkpoint under the final name. Loading is strict, like PyTorch's
//! `load_state_dict(strict=True)`: every parameter and buffer must be present with the model's shape, and
//! the file may hold nothing else; errors name the file and the tensor.

use super::ParamStore;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Saves every parameter and buffer of `store` to `path` (safetensors, f32 as stored).
pub fn save(store: &ParamStore, path: &Path) -> Result<()> {
    let mut tensors: BTreeMap<String, Tensor> = store.param_tensors();
    for (name, t) in store.buffer_tensors().with_context(|| format!("reading buffers for {}", path.display()))? {
        if tensors.insert(name.clone(), t).is_some() {
            bail!("cannot save {}: `{name}` is both a parameter and a buffer", path.display());
        }
    }
    // safetensors wants host tensors; moving also detaches from any device stream.
    let tensors =
        tensors.into_iter().map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?))).collect::<Result<BTreeMap<_, _>>>()?;
    let tmp = temp_path(path);
    let tensors: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Reads every tensor of a safetensors file, by name, onto `device`.
pub fn load_tensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let map = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading checkpoint {}", path.display()))?;
    Ok(map.into_iter().collect())
}

/// Sets every parameter and buffer of `store` from the checkpoint at `path` (converted to the store's
/// dtype and device). Fails, naming the file and the tensor, on a missing, mis-shaped or unexpected tensor;
/// on failure nothing has been changed.
pub fn load(store: &ParamStore, path: &Path) -> Result<()> {
    let tensors = load_tensors(path, &Device::Cpu)?;
    let expected = store.params.iter().chain(&store.buffers);
    let mut updates = Vec::new();
    for (name, var) in expected {
        let Some(t) = tensors.get(name) else {
            bail!("checkpoint {}: missing tensor `{name}` (shape {:?})", path.display(), var.dims());
        };
        if t.dims() != var.dims() {
            bail!(
                "checkpoint {}: tensor `{name}` has shape {:?}, the model expects {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        updates.push((var, t));
    }
    let unexpected: Vec<&String> =
        tensors.keys().filter(|k| !store.params.contains_key(*k) && !store.buffers.contains_key(*k)).collect();
    if !unexpected.is_empty() {
        bail!("checkpoint {}: unexpected tensors {unexpected:?} (not in the model)", path.display());
    }
    for (var, t) in updates {
        let v = t.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&v).with_context(|| format!("setting a tensor from {}", path.display()))?;
    }
    Ok(())
}

/// `dir/.name.tmp-<pid>`: same directory (rename is atomic only within a file system).
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
