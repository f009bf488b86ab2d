//! What a batch of runs is run with: where results and data live, the device, the stop flag, the processes
//! ([`RunOptions`]), and how runs are checkpointed, claimed, reported and shared out ([`Policy`], [`Shard`]).
//! None of it changes what a run computes.

use crate::spec::SpecError;
use candle_core::Device;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Where a batch of runs reads and writes, on what, and how it is stopped.
pub struct RunOptions {
    pub results_dir: PathBuf,
    pub data_dir: PathBuf,
    pub device: Device,
    pub device_name: String,
    pub force: bool,
    pub only: Option<String>,
    /// Set (by the signal handler) to stop after the current step; checked at every step.
    pub stop: Arc<AtomicBool>,
    /// The `sdp` binary to run `sdp memprobe` with after each run (CPU runs); `None` disables probing.
    pub memprobe: Option<PathBuf>,
    /// Write each finished run's final global model to `<run>/model.safetensors`.
    pub save_model: bool,
    /// The processes this run is spread over (`mpirun`/`srun`; one process otherwise).
    pub world: crate::comm::World,
}

/// How runs are checkpointed, claimed, reported and shared out. Nothing here changes what a run computes,
/// so none of it is part of the spec or the run id.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Checkpoint at the end of every N-th epoch (0: not by epoch count).
    pub checkpoint_every: usize,
    /// Checkpoint when this long has passed since the last checkpoint (`None`: not by time).
    pub checkpoint_interval: Option<Duration>,
    /// Checkpoint every N optimizer steps (0: not by step count; for drills and tests).
    pub checkpoint_steps: usize,
    /// Keep the checkpoint of a finished run (by default it is removed once the run is recorded done).
    pub keep_checkpoints: bool,
    /// A lock with no heartbeat for this long is stale and taken over.
    pub stale_after: Duration,
    /// When stderr is not a terminal, a progress line this often.
    pub progress_every: Duration,
    /// Only the runs of this slice of the grid.
    pub shard: Option<Shard>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            checkpoint_every: 1,
            checkpoint_interval: Some(Duration::from_secs(600)),
            checkpoint_steps: 0,
            keep_checkpoints: false,
            stale_after: Duration::from_secs(300),
            progress_every: Duration::from_secs(30),
            shard: None,
        }
    }
}

impl Policy {
    /// Whether any checkpoint trigger is on.
    pub fn checkpoints(&self) -> bool {
        self.checkpoint_every > 0 || self.checkpoint_interval.is_some() || self.checkpoint_steps > 0
    }

    /// How often the lock's heartbeat is written: often enough that a live owner never looks stale.
    pub(crate) fn beat(&self) -> Duration {
        (self.stale_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }
}

/// Slice `index` of `count` of a grid: the runs whose position in the expanded list (after `--only`)
/// is `index` modulo `count`. Every process given the same specs computes the same slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = SpecError;
    fn from_str(s: &str) -> std::result::Result<Self, SpecError> {
        let bad = || SpecError(format!("--shard `{s}`: expected I/N with 0 <= I < N, e.g. 0/4"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) =
            (i.trim().parse::<usize>().map_err(|_| bad())?, n.trim().parse::<usize>().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}
