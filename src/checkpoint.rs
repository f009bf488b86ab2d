//! Training checkpoints: everything the next step of a run depends on, so that a killed, interrupted or
//! preempted run resumes where it stopped and ends in the same `metrics.csv` as an uninterrupted one.
//!
//! A checkpoint lives in `<run dir>/checkpoint/` as two files:
//! - `state-<step>.safetensors`: every tensor (model parameters and BatchNorm statistics, each SDP worker's
//!   subnetwork, optimizer state), named `<owner>/<kind>/<state_dict name>` (see [`Tensors`]);
//! - `checkpoint.json`: the position (steps done, the running sums of the epoch in progress), the metrics
//!   rows so far, method state that is not a tensor, and the name of its tensor file.
//!
//! The tensor file is written first, then `checkpoint.json` atomically (temp file, fsync, rename): the JSON
//! is the commit point, so a kill at any moment leaves either the previous checkpoint or the new one, never
//! a mix. Older tensor files are removed only after the new JSON is in place.
//!
//! The data order and augmentation need no saved stream state: every draw is keyed by (seed, epoch, index)
//! (`seed.rs`), so the position (epoch, step within the epoch) restores them exactly. Floating-point values
//! in the JSON are stored as their shortest round-trip decimal strings, because serde_json's default float
//! parser may be one ulp off and a resumed run must match an uninterrupted one bit for bit.

use crate::models::layers::ParamStore;
use crate::optim::Optimizer;
use crate::results::{write_atomic, MetricsRow};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bumped when the layout changes; a checkpoint of another format is ignored (the run starts afresh).
pub const FORMAT: u32 = 1;

/// The state of a training loop at a step boundary.
#[derive(Clone, Debug, Default)]
pub struct TrainState {
    /// Optimizer steps done over the whole run. `step % steps_per_epoch == 0` means an epoch boundary
    /// with that epoch's evaluation (if due) already done.
    pub step: usize,
    /// Sum of the training losses of the epoch in progress (mid-epoch checkpoints; 0 at a boundary).
    pub epoch_loss_sum: f64,
    /// Images of the epoch in progress and the seconds they took (throughput: wall-clock only).
    pub epoch_images: usize,
    pub epoch_secs: f64,
    /// Seconds the run has trained so far (wall-clock only).
    pub wall_s: f64,
    /// Every evaluation so far.
    pub rows: Vec<MetricsRow>,
    /// Method state that is not a tensor (e.g. SDP's gradient alignment records).
    pub method: serde_json::Value,
    pub tensors: Tensors,
}

/// A checkpoint's tensors by name.
pub type Tensors = BTreeMap<String, Tensor>;

/// Adds every parameter and buffer of `store` as `<prefix>/model/<name>`. The tensors share storage with
/// the live model (no copy of the model in memory): write them out before the next step changes them.
pub fn save_store(prefix: &str, store: &ParamStore, out: &mut Tensors) -> Result<()> {
    for (name, v) in store.params.iter().chain(&store.buffers) {
        out.insert(format!("{prefix}/model/{name}"), v.as_tensor().detach());
    }
    Ok(())
}

/// Sets every parameter and buffer of `store` from `<prefix>/model/<name>`; every one must be present
/// with the model's shape.
pub fn restore_store(prefix: &str, store: &ParamStore, tensors: &Tensors) -> Result<()> {
    for (name, v) in store.params.iter().chain(&store.buffers) {
        let key = format!("{prefix}/model/{name}");
        let t = tensors.get(&key).with_context(|| format!("checkpoint has no tensor `{key}`"))?;
        if t.dims() != v.dims() {
            bail!("checkpoint tensor `{key}` has shape {:?}, the model expects {:?}", t.dims(), v.dims());
        }
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?).with_context(|| format!("restoring `{key}`"))?;
    }
    Ok(())
}

/// Adds the optimizer state of every parameter as `<prefix>/opt/<name>/<i>` (shared storage, as
/// [`save_store`]).
pub fn save_optimizer(prefix: &str, opt: &Optimizer, out: &mut Tensors) -> Result<()> {
    for (name, state) in opt.state() {
        for (i, t) in state.iter().enumerate() {
            out.insert(format!("{prefix}/opt/{name}/{i}"), t.detach());
        }
    }
    Ok(())
}

/// Replaces the optimizer's state by the `<prefix>/opt/…` tensors (moved to `device`).
pub fn restore_optimizer(prefix: &str, opt: &mut Optimizer, tensors: &Tensors, device: &Device) -> Result<()> {
    let head = format!("{prefix}/opt/");
    let mut state: BTreeMap<String, BTreeMap<usize, Tensor>> = BTreeMap::new();
    for (key, t) in tensors.range(head.clone()..).take_while(|(k, _)| k.starts_with(&head)) {
        let rest = &key[head.len()..];
        let (name, i) = rest.rsplit_once('/').with_context(|| format!("checkpoint tensor `{key}`: no index"))?;
        let i: usize = i.parse().with_context(|| format!("checkpoint tensor `{key}`: bad index"))?;
        state.entry(name.to_string()).or_default().insert(i, t.to_device(device)?.copy()?);
    }
    let mut out = BTreeMap::new();
    for (name, parts) in state {
        if parts.keys().copied().ne(0..parts.len()) {
            bail!("checkpoint: optimizer state of `{name}` has indices {:?}", parts.keys().collect::<Vec<_>>());
        }
        out.insert(name, parts.into_values().collect());
    }
    opt.set_state(out);
    Ok(())
}

/// Where a run's checkpoint lives.
pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// `checkpoint.json` as stored.
#[derive(Serialize, Deserialize)]
struct Stored {
    format: u32,
    run_id: String,
    step: usize,
    epoch_loss_sum: String,
    epoch_images: usize,
    epoch_secs: String,
    wall_s: String,
    rows: Vec<StoredRow>,
    method: serde_json::Value,
    tensors: String,
    saved: String,
}

/// A metrics row with exact floats.
#[derive(Serialize, Deserialize)]
struct StoredRow {
    epoch: usize,
    step: usize,
    train_loss: String,
    test_loss: String,
    #[serde(alias = "test_acc")]
    test_metric: String,
    lr: String,
    img_per_s: String,
    wall_s: String,
    modes: BTreeMap<String, String>,
}

/// `x` as the shortest decimal that parses back to the same bits.
pub fn exact(x: f64) -> String {
    format!("{x:?}")
}

/// The inverse of [`exact`].
pub fn parse_exact(s: &str) -> Result<f64> {
    s.parse::<f64>().with_context(|| format!("checkpoint: `{s}` is not a number"))
}

impl StoredRow {
    fn of(r: &MetricsRow) -> Self {
        Self {
            epoch: r.epoch,
            step: r.step,
            train_loss: exact(r.train_loss),
            test_loss: exact(r.test_loss),
            test_metric: exact(r.test_metric),
            lr: exact(r.lr),
            img_per_s: exact(r.img_per_s),
            wall_s: exact(r.wall_s),
            modes: r.modes.iter().map(|(k, v)| (k.clone(), exact(*v))).collect(),
        }
    }

    fn row(&self, run_id: &str) -> Result<MetricsRow> {
        Ok(MetricsRow {
            run_id: run_id.to_string(),
            epoch: self.epoch,
            step: self.step,
            train_loss: parse_exact(&self.train_loss)?,
            test_loss: parse_exact(&self.test_loss)?,
            test_metric: parse_exact(&self.test_metric)?,
            lr: parse_exact(&self.lr)?,
            img_per_s: parse_exact(&self.img_per_s)?,
            wall_s: parse_exact(&self.wall_s)?,
            modes: self.modes.iter().map(|(k, v)| Ok((k.clone(), parse_exact(v)?))).collect::<Result<_>>()?,
        })
    }
}

/// Writes `tensors` to `path` as safetensors (on the host), atomically: a temporary file renamed into place.
pub fn write_tensors(path: &Path, tensors: &std::collections::BTreeMap<String, Tensor>) -> Result<()> {
    let host: std::collections::HashMap<String, Tensor> =
        tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> Result<()> {
        candle_core::safetensors::save(&host, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes `state` as the checkpoint of run `run_id` in `run_dir` (see the module docs for the protocol).
pub fn save(run_dir: &Path, run_id: &str, state: &TrainState) -> Result<()> {
    let dir = dir(run_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!("state-{:09}.safetensors", state.step);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let host: std::collections::HashMap<String, Tensor> =
        state.tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    let write = || -> Result<()> {
        candle_core::safetensors::save(&host, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing checkpoint {}", path.display()));
    }
    let stored = Stored {
        format: FORMAT,
        run_id: run_id.to_string(),
        step: state.step,
        epoch_loss_sum: exact(state.epoch_loss_sum),
        epoch_images: state.epoch_images,
        epoch_secs: exact(state.epoch_secs),
        wall_s: exact(state.wall_s),
        rows: state.rows.iter().map(StoredRow::of).collect(),
        method: state.method.clone(),
        tensors: name.clone(),
        saved: crate::results::now(),
    };
    let json = dir.join("checkpoint.json");
    write_atomic(&json, serde_json::to_string_pretty(&stored)?.as_bytes())
        .with_context(|| format!("writing checkpoint {}", json.display()))?;
    // The new checkpoint is committed: older tensor files (and temp files of dead writers) can go.
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n != name && (n.starts_with("state-") || (n.starts_with('.') && n.ends_with(".tmp"))) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// What `checkpoint.json` says, without reading the tensors (for `sdp list`).
#[derive(Clone, Debug)]
pub struct Summary {
    /// Steps done: the run resumes at the next one.
    pub step: usize,
    /// When it was written (RFC 3339).
    pub saved: String,
}

/// The position of the checkpoint in `run_dir`, if it has a readable one.
pub fn peek(run_dir: &Path) -> Option<Summary> {
    let text = std::fs::read_to_string(dir(run_dir).join("checkpoint.json")).ok()?;
    let s: Stored = serde_json::from_str(&text).ok()?;
    Some(Summary { step: s.step, saved: s.saved })
}

/// The checkpoint of run `run_id` in `run_dir`, tensors on `device`; `None` when there is none.
/// A checkpoint of another run or format is an error that says so (the caller starts afresh).
pub fn load(run_dir: &Path, run_id: &str, device: &Device) -> Result<Option<TrainState>> {
    let json = dir(run_dir).join("checkpoint.json");
    let text = match std::fs::read_to_string(&json) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", json.display())),
    };
    let s: Stored = serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    if s.format != FORMAT {
        bail!("{}: checkpoint format {} (this binary reads {FORMAT})", json.display(), s.format);
    }
    if s.run_id != run_id {
        bail!("{}: checkpoint of run {}, not {run_id}", json.display(), s.run_id);
    }
    if s.tensors.contains('/') || s.tensors.starts_with('.') {
        bail!("{}: bad tensor file name `{}`", json.display(), s.tensors);
    }
    let path = dir(run_dir).join(&s.tensors);
    let tensors = candle_core::safetensors::load(&path, device)
        .with_context(|| format!("reading checkpoint {}", path.display()))?
        .into_iter()
        .collect();
    Ok(Some(TrainState {
        step: s.step,
        epoch_loss_sum: parse_exact(&s.epoch_loss_sum)?,
        epoch_images: s.epoch_images,
        epoch_secs: parse_exact(&s.epoch_secs)?,
        wall_s: parse_exact(&s.wall_s)?,
        rows: s.rows.iter().map(|r| r.row(run_id)).collect::<Result<_>>()?,
        method: s.method,
        tensors,
    }))
}

/// Removes a run's checkpoint (after the run is recorded as done, unless checkpoints are kept).
pub fn remove(run_dir: &Path) -> Result<()> {
    let d = dir(run_dir);
    match std::fs::remove_dir_all(&d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", d.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip_exactly() -> Result<()> {
        for x in [0.1, 1.0 / 3.0, f64::MIN_POSITIVE, 2.3025850929940455, 1e300, -0.0] {
            assert_eq!(parse_exact(&exact(x))?.to_bits(), x.to_bits(), "{x}");
        }
        Ok(())
    }

    #[test]
    fn save_then_load_gives_the_same_state_and_keeps_one_tensor_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let dev = Device::Cpu;
        let mut st = TrainState { step: 3, epoch_loss_sum: 0.1 + 0.2, ..Default::default() };
        st.tensors.insert("global/model/w".into(), Tensor::new(&[1.5f32, -2.0], &dev)?);
        st.rows.push(MetricsRow {
            run_id: "r".into(),
            epoch: 1,
            step: 3,
            train_loss: 1.0 / 3.0,
            test_loss: 2.0,
            test_metric: 0.7,
            lr: 0.05,
            img_per_s: 10.0,
            wall_s: 1.0,
            modes: BTreeMap::from([("full".to_string(), 0.7)]),
        });
        save(dir.path(), "r", &st)?;
        st.step = 5;
        save(dir.path(), "r", &st)?;
        let back = load(dir.path(), "r", &dev)?.context("a checkpoint")?;
        assert_eq!((back.step, back.epoch_loss_sum.to_bits()), (5, (0.1f64 + 0.2).to_bits()));
        assert_eq!(back.rows, st.rows);
        assert_eq!(back.tensors["global/model/w"].to_vec1::<f32>()?, [1.5, -2.0]);
        let mut names: Vec<String> = std::fs::read_dir(super::dir(dir.path()))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into()))
            .collect::<Result<_>>()?;
        names.sort();
        assert_eq!(names, ["checkpoint.json", "state-000000005.safetensors"]);
        let e = load(dir.path(), "other", &dev).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(e.contains("checkpoint of run r, not other"), "{e}");
        assert!(load(&dir.path().join("none"), "r", &dev)?.is_none());
        Ok(())
    }
}
