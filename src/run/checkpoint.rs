//! Training checkpoints: everything the next step of a run depends on, so that a killed, interrupted or
//! preempted run resumes where it stopped and ends in the same `metrics.csv` as an uninterrupted one.
//!
//! A checkpoint lives in `<run dir>/checkpoint/`:
//! - `state-<step>.safetensors`: every tensor (model parameters and BatchNorm statistics, each SDP worker's
//!   subnetwork, optimizer state), named `<owner>/<kind>/<state_dict name>` (see [`Tensors`]). A tensor
//!   of worker k is named `worker<k>/…`; every other tensor (the global model, DP's model) is shared.
//! - in a run spread over N processes (worker k on rank k mod N), `state-<step>.rank<r>of<N>.safetensors`
//!   for each rank r > 0 that hosts workers: their tensors. `state-<step>.safetensors` then holds the
//!   shared tensors and rank 0's workers.
//! - `checkpoint.json`: the position (steps done, the running sums of the epoch in progress), the metrics
//!   rows so far, method state that is not a tensor, the worker count K, and every tensor file with the
//!   workers whose tensors it holds.
//!
//! The tensor files are written first, each under a temporary name renamed into place; `checkpoint.json`
//! is written last, atomically (temp file, fsync, rename), by rank 0 once every rank has confirmed its file
//! over a collective ([`save_collective`]): the JSON is the commit point, so a kill of any process at any
//! moment leaves either the previous checkpoint or the new one, never a mix. Older tensor files are removed
//! only after the new JSON is in place. Because state is kept per worker, a checkpoint resumes at any
//! process count that divides K ([`load_collective`]: each rank reads the shared tensors and its own
//! workers', from whichever files hold them), in one process too.
//!
//! The data order and augmentation need no saved stream state: every draw is keyed by (seed, epoch, index)
//! (`seed.rs`), so the position (epoch, step within the epoch) restores them exactly. Floating-point values
//! in the JSON are stored as their shortest round-trip decimal strings, because serde_json's default float
//! parser may be one ulp off and a resumed run must match an uninterrupted one bit for bit.

use crate::comm::{Agreed, World};
use crate::models::layers::ParamStore;
use crate::optim::Optimizer;
use crate::results::{write_atomic, MetricsRow};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bumped when the layout changes; a checkpoint of another format is ignored (the run starts afresh).
/// Format 1 (one tensor file holding every worker, no worker count) is still read.
pub const FORMAT: u32 = 2;

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
    /// Method state that is not a tensor.
    pub method: serde_json::Value,
    /// The run's workers K: tensors `worker<k>/…` (k < K) are worker k's. 0 when unknown (format 1).
    pub workers: usize,
    /// The shared tensors and those of the workers this process hosts (loaded by one process of a run
    /// spread over several: only its own workers').
    pub tensors: Tensors,
}

/// A checkpoint's tensors by name.
pub type Tensors = BTreeMap<String, Tensor>;

/// The worker whose state a checkpoint tensor is (`worker<k>/…`), or `None` for a shared tensor.
pub fn worker_of(key: &str) -> Option<usize> {
    let (head, _) = key.split_once('/')?;
    let k = head.strip_prefix("worker")?;
    if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    k.parse().ok()
}

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
    /// The file with the shared tensors (and rank 0's workers; in format 1, every tensor).
    tensors: String,
    /// Format 2: the run's workers K.
    #[serde(default)]
    workers: Option<usize>,
    /// Format 2: the processes that wrote it, and every tensor file with the workers whose tensors it
    /// holds (`tensors` among them).
    #[serde(default)]
    ranks: Option<usize>,
    #[serde(default)]
    parts: Vec<Part>,
    saved: String,
}

/// One tensor file of a checkpoint and the workers whose tensors it holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Part {
    file: String,
    workers: Vec<usize>,
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

/// The tensor file rank `rank` of `ranks` writes at `step`: rank 0's holds the shared tensors too (and is
/// the only file of a one-process run).
fn part_name(step: usize, rank: usize, ranks: usize) -> String {
    if rank == 0 {
        format!("state-{step:09}.safetensors")
    } else {
        format!("state-{step:09}.rank{rank}of{ranks}.safetensors")
    }
}

/// How long rank 0 waits for another rank's tensor file to show the size that rank wrote (a shared
/// filesystem may show a new file late).
const VISIBLE_WITHIN: Duration = Duration::from_secs(10);

/// Writes `state` as the checkpoint of run `run_id` in `run_dir`, in one process (see the module docs).
pub fn save(run_dir: &Path, run_id: &str, state: &TrainState) -> Result<()> {
    save_collective(&World::solo(), run_dir, run_id, state, true)
}

/// Writes this process's share of `state` into the checkpoint of run `run_id` in `run_dir`: a collective
/// call, made by every process of `world` at the same step. Each rank writes the tensors of the workers it
/// hosts (rank 0 also every shared tensor) to its own file; once every rank has confirmed its file (an
/// all-reduce), rank 0 checks that it sees them and writes `checkpoint.json`, the commit point. `write` is
/// rank 0's say (false: another process took the run over, and no rank writes anything). A rank that
/// cannot write its file fails the checkpoint on every rank with an [`Agreed`] error (its own error on
/// that rank).
pub fn save_collective(world: &World, run_dir: &Path, run_id: &str, state: &TrainState, write: bool) -> Result<()> {
    let (rank, n) = (world.rank(), world.size());
    let mut go = vec![u8::from(write)];
    world.comm.broadcast(0, &mut go)?;
    if go[0] == 0 {
        return Ok(());
    }
    let dir = dir(run_dir);
    let mine: Tensors = state
        .tensors
        .iter()
        .filter(|(k, _)| rank == 0 || worker_of(k).is_some())
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let written = if rank > 0 && mine.is_empty() {
        Ok(0) // nothing of its own (DP: every rank holds the same model, rank 0 writes it)
    } else {
        let path = dir.join(part_name(state.step, rank, n));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating {}", dir.display()))
            .and_then(|()| write_tensors(&path, &mine))
            .and_then(|()| Ok(std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len()))
    };
    // Every rank's outcome to every rank: (failed, bytes written) in slot r.
    let mut all = vec![0.0; 2 * n];
    match &written {
        Ok(bytes) => all[2 * rank + 1] = *bytes as f64,
        Err(_) => all[2 * rank] = 1.0,
    }
    world.comm.all_reduce_sum_f64(&mut all)?;
    if let Some(bad) = (0..n).find(|&r| all[2 * r] > 0.0) {
        let e = match written {
            Err(e) => e,
            Ok(_) => anyhow!("rank {bad} could not write its part of the checkpoint (its log says why)"),
        };
        return Err(if n > 1 {
            e.context(Agreed(format!("checkpoint at step {} not written", state.step)))
        } else {
            e
        });
    }
    if rank > 0 {
        return Ok(()); // rank 0 commits
    }
    let mut parts = Vec::new();
    for r in 0..n {
        let bytes = all[2 * r + 1] as u64;
        if r > 0 && bytes == 0 {
            continue;
        }
        let file = part_name(state.step, r, n);
        let workers: Vec<usize> = if r == 0 {
            let own: std::collections::BTreeSet<usize> = state.tensors.keys().filter_map(|k| worker_of(k)).collect();
            own.into_iter().collect()
        } else {
            visible(&dir.join(&file), bytes, r)?;
            (0..state.workers).filter(|k| k % n == r).collect()
        };
        parts.push(Part { file, workers });
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
        tensors: part_name(state.step, 0, n),
        workers: Some(state.workers),
        ranks: Some(n),
        parts: parts.clone(),
        saved: crate::results::now(),
    };
    let json = dir.join("checkpoint.json");
    write_atomic(&json, serde_json::to_string_pretty(&stored)?.as_bytes())
        .with_context(|| format!("writing checkpoint {}", json.display()))?;
    // The new checkpoint is committed: older tensor files (and temp files of dead writers) can go.
    let keep: Vec<&str> = parts.iter().map(|p| p.file.as_str()).collect();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&n.as_str()) && (n.starts_with("state-") || (n.starts_with('.') && n.ends_with(".tmp"))) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// Waits until rank 0 sees `rank`'s tensor file at `path` with the `bytes` that rank wrote.
fn visible(path: &Path, bytes: u64, rank: usize) -> Result<()> {
    let t = Instant::now();
    loop {
        let seen = std::fs::metadata(path).map(|m| m.len());
        if seen.as_ref().is_ok_and(|&b| b == bytes) {
            return Ok(());
        }
        if t.elapsed() >= VISIBLE_WITHIN {
            let what = match seen {
                Ok(b) => format!("has {b} bytes here"),
                Err(e) => e.to_string(),
            };
            bail!(
                "rank {rank} wrote its part of the checkpoint, {} ({bytes} bytes), but rank 0 does not see it \
                 ({what}): checkpoints of a run spread over nodes need a results folder they share",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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

/// The checkpoint of run `run_id` in `run_dir` with every tensor, on `device`; `None` when there is none.
/// A checkpoint of another run or format is an error that says so (the caller starts afresh).
pub fn load(run_dir: &Path, run_id: &str, device: &Device) -> Result<Option<TrainState>> {
    let json = dir(run_dir).join("checkpoint.json");
    let text = match std::fs::read_to_string(&json) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", json.display())),
    };
    read_state(&json, &text, run_id, None, &|_| true, device).map(Some)
}

/// This process's share of the checkpoint of run `run_id` (of `workers` workers) in `run_dir`, on
/// `device`: a collective call of every process of `world`. Rank 0's reading of `checkpoint.json`
/// decides for every rank; each rank then reads the shared tensors and those of the workers it hosts
/// (k ≡ rank mod N) from whichever files hold them, so a checkpoint written by any number of processes
/// resumes with this one. `None` on every rank when there is none; an error on every rank when one rank
/// cannot read its share (on that rank, its own error, naming the file).
pub fn load_collective(
    world: &World,
    run_dir: &Path,
    run_id: &str,
    workers: usize,
    device: &Device,
) -> Result<Option<TrainState>> {
    let (rank, n) = (world.rank(), world.size());
    let json = dir(run_dir).join("checkpoint.json");
    // b'N': no checkpoint; b'T' + the JSON text; b'E' + why rank 0 could not read it.
    let mut word = Vec::new();
    if rank == 0 {
        word = match std::fs::read(&json) {
            Ok(text) => [&b"T"[..], &text].concat(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => b"N".to_vec(),
            Err(e) => [&b"E"[..], format!("reading {}: {e}", json.display()).as_bytes()].concat(),
        };
    }
    world.comm.broadcast(0, &mut word)?;
    let mine = match word.split_first() {
        Some((b'N', _)) => return Ok(None),
        Some((b'T', text)) => std::str::from_utf8(text)
            .with_context(|| format!("{}: not UTF-8 text", json.display()))
            .and_then(|t| read_state(&json, t, run_id, Some(workers), &|k| k % n == rank, device)),
        Some((_, why)) => Err(anyhow!("{}", String::from_utf8_lossy(why))),
        None => Err(anyhow!("rank 0 said nothing about {}", json.display())),
    };
    let mut failed = vec![0.0; n];
    if mine.is_err() {
        failed[rank] = 1.0;
    }
    world.comm.all_reduce_sum_f64(&mut failed)?;
    match (mine, failed.iter().position(|&f| f > 0.0)) {
        (Ok(state), None) => Ok(Some(state)),
        (Err(e), _) if n > 1 => Err(e.context(format!("rank {rank}"))),
        (Err(e), _) => Err(e),
        (Ok(_), Some(bad)) => Err(anyhow!("rank {bad} could not read its share of the checkpoint (its log says why)")),
    }
}

/// The state `checkpoint.json` at `json` (its text `text`) describes, with the shared tensors and those
/// of the workers `hosted` says this process hosts. `workers`: the run's K, checked against the file's.
fn read_state(
    json: &Path,
    text: &str,
    run_id: &str,
    workers: Option<usize>,
    hosted: &dyn Fn(usize) -> bool,
    device: &Device,
) -> Result<TrainState> {
    let s: Stored = serde_json::from_str(text).with_context(|| format!("parsing {}", json.display()))?;
    if s.format != 1 && s.format != FORMAT {
        bail!("{}: checkpoint format {} (this binary reads 1 and {FORMAT})", json.display(), s.format);
    }
    if s.run_id != run_id {
        bail!("{}: checkpoint of run {}, not {run_id}", json.display(), s.run_id);
    }
    if let (Some(want), Some(have)) = (workers, s.workers) {
        if want != have {
            bail!("{}: a checkpoint of {have} workers, but the run has {want} (method.workers)", json.display());
        }
    }
    // Format 1: one file holds every tensor.
    let one_file = s.parts.is_empty();
    let parts = if one_file { vec![Part { file: s.tensors.clone(), workers: Vec::new() }] } else { s.parts.clone() };
    let mut listed = std::collections::BTreeMap::new();
    for p in &parts {
        if p.file.contains('/') || p.file.starts_with('.') || p.file.is_empty() {
            bail!("{}: bad tensor file name `{}`", json.display(), p.file);
        }
        for &k in &p.workers {
            if s.workers.is_some_and(|kk| k >= kk) {
                bail!("{}: `{}` is said to hold worker {k} of {}", json.display(), p.file, s.workers.unwrap_or(0));
            }
            if let Some(other) = listed.insert(k, &p.file) {
                bail!("{}: worker {k} is in two tensor files, `{other}` and `{}`", json.display(), p.file);
            }
        }
    }
    if !parts.iter().any(|p| p.file == s.tensors) {
        bail!("{}: the shared tensors' file `{}` is not among its tensor files", json.display(), s.tensors);
    }
    if let (false, Some(k)) = (listed.is_empty(), s.workers) {
        if let Some(missing) = (0..k).find(|&w| hosted(w) && !listed.contains_key(&w)) {
            bail!("{}: no tensor file holds worker {missing}", json.display());
        }
    }
    let dir = json.parent().unwrap_or(Path::new("."));
    let mut tensors = Tensors::new();
    for p in &parts {
        let shared = p.file == s.tensors;
        let wanted: std::collections::BTreeSet<usize> = p.workers.iter().copied().filter(|&k| hosted(k)).collect();
        if !shared && wanted.is_empty() {
            continue;
        }
        let path = dir.join(&p.file);
        // SAFETY: checkpoint files are never changed in place: each is written under a temporary name and
        // renamed into place, and an old one is only ever removed (which leaves a mapping valid).
        let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }
            .with_context(|| format!("reading checkpoint {}", path.display()))?;
        let mut found = std::collections::BTreeSet::new();
        for (name, _) in file.tensors() {
            let take = match worker_of(&name) {
                None => shared,
                Some(k) if one_file => hosted(k),
                Some(k) => wanted.contains(&k),
            };
            if take {
                let t =
                    file.load(&name, device).with_context(|| format!("reading `{name}` from {}", path.display()))?;
                found.extend(worker_of(&name));
                tensors.insert(name, t);
            }
        }
        if let Some(k) = wanted.iter().find(|k| !found.contains(k)) {
            bail!("{}: no tensor of worker {k}, which {} says it holds", path.display(), json.display());
        }
    }
    Ok(TrainState {
        step: s.step,
        epoch_loss_sum: parse_exact(&s.epoch_loss_sum)?,
        epoch_images: s.epoch_images,
        epoch_secs: parse_exact(&s.epoch_secs)?,
        wall_s: parse_exact(&s.wall_s)?,
        rows: s.rows.iter().map(|r| r.row(run_id)).collect::<Result<_>>()?,
        method: s.method,
        workers: s.workers.unwrap_or(0),
        tensors,
    })
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
    fn worker_tensors_are_told_from_shared_ones_by_name() {
        assert_eq!(worker_of("worker12/opt/layer1.0.conv1.weight/0"), Some(12));
        assert_eq!(worker_of("worker0/align"), Some(0));
        for shared in
            ["global/model/fc.weight", "net/model/worker3/x", "workers/x", "worker/x", "worker1x/y", "worker2"]
        {
            assert_eq!(worker_of(shared), None, "{shared}");
        }
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
