//! Averaging among holders: the collective boundary every SDP synchronisation goes through
//! (docs/design.md §2).
//!
//! - [`IndexMap`]: which global coordinates a worker's local tensor holds.
//! - [`Averager`]: averages a whole synchronisation at once (every tensor's coordinates, each among the
//!   workers holding it). Two implementations:
//!   - [`LocalAverager`]: every worker lives in this process (the exact one-device simulation).
//!   - [`GroupedAverager`]: this process hosts some of the workers; the coordinates of every tensor are
//!     grouped by the set of processes (ranks) whose workers hold them into one flat host buffer per set,
//!     and each buffer is summed with one all-reduce among exactly those ranks per synchronisation.
//! - [`Collective`]: the all-reduce among a group of ranks the grouped averager runs on: [`Solo`] (one
//!   process: nothing to exchange), with the `mpi` feature [`mpi::MpiComm`] (MPI communicators, one per
//!   rank group, made once), and with the `nccl` feature `nccl::NcclComm` (the sums on the GPUs, NCCL
//!   communicators one per rank group, control still over MPI).
//! - [`launch`]: which of these a process gets, from how it was started (`mpirun`, `srun`, or plain).

pub mod grouped;
pub mod index_map;
pub mod launch;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

use anyhow::Result;
use candle_core::Tensor;
use std::collections::BTreeMap;

pub use grouped::{GroupedAverager, Layout};
pub use index_map::IndexMap;
pub use launch::World;
pub use local::LocalAverager;

/// One tensor of a synchronisation: its current global value and the local values of the workers this
/// process hosts that hold part of it.
pub struct SyncTensor<'a> {
    pub name: &'a str,
    pub global: Tensor,
    /// (worker index, its local tensor: the held coordinates, in the worker's local shape).
    pub contributions: Vec<(usize, Tensor)>,
}

/// The collective that averages each coordinate among the workers holding it.
pub trait Averager {
    /// A new selection: every worker's index maps (all K workers, hosted here or not), so that every
    /// process knows every coordinate's holders.
    fn set_selection(&mut self, maps: &[BTreeMap<String, IndexMap>]) -> Result<()>;

    /// Averages one synchronisation. Returns, per tensor in order, the new global value: at every
    /// coordinate a worker hosted here holds, the mean of all its holders' values; coordinates no worker
    /// holds keep `global`'s value. Other coordinates are current only where [`Averager::complete`] says so.
    fn average(&mut self, sync: &[SyncTensor]) -> Result<Vec<Tensor>>;

    /// Whether `average` leaves every coordinate of the global model current in this process (then
    /// [`Averager::assemble`] is not needed before reading the global model).
    fn complete(&self) -> bool;

    /// The whole global model, current and identical in every process (before evaluation, a checkpoint or
    /// the end of a run): each coordinate from one process that holds it.
    fn assemble(&mut self, tensors: &[(&str, Tensor)]) -> Result<Vec<Tensor>>;

    /// Bytes this process has put on the wire so far: for each all-reduce of b bytes among g processes,
    /// 2(g-1)/g × b (the ring all-reduce that MPI and NCCL use for large messages; 0 within one process).
    fn bytes_sent(&self) -> f64;
}

/// Element-wise sums among groups of processes: the primitive the grouped averager needs.
///
/// A group is a bitmask of ranks (bit r: rank r). Every process must call the collective methods in the
/// same order with the same groups (all of them derive groups from the shared, seeded selection).
pub trait Collective {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Makes the groups ready (a collective call over every process; groups already made are reused).
    fn prepare(&self, groups: &[u64]) -> Result<()>;
    /// Sums `buf` element-wise over the ranks of `group` (which contains this rank), in place.
    fn all_reduce_sum(&self, group: u64, buf: &mut [f32]) -> Result<()>;
    /// Sums `buf` element-wise over every process, in place (metrics, counters).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// The bytes of `buf` on `root`, in every process.
    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<()>;
    /// What runs the collectives (for logs and manifests): `solo`, `mpi, Open MPI v4.1.4`.
    fn describe(&self) -> String;
    /// Ends every process of the job with exit code `code` (a rank that failed while the others wait in
    /// a collective for it).
    fn abort(&self, code: i32) -> !;
}

/// The collective of a process that is the whole world: sums over one rank change nothing.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn prepare(&self, _groups: &[u64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum(&self, group: u64, _buf: &mut [f32]) -> Result<()> {
        anyhow::ensure!(group == 1, "group {group:#b} names ranks a one-process run does not have");
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _root: usize, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "solo".into()
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Marks an error that every process of a run met at the same collective call (a checkpoint file a rank
/// could not write): every rank knows of it and none waits for another in a collective, so no rank needs
/// to end the job; rank 0 records the run as failed and every rank goes on to the next run.
#[derive(Debug)]
pub struct Agreed(pub String);

impl std::fmt::Display for Agreed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `e` is an [`Agreed`] error.
pub fn agreed(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Agreed>().is_some()
}

/// The bitmask of every rank of a world of `size` processes.
pub fn all_ranks(size: usize) -> u64 {
    if size >= 64 {
        u64::MAX
    } else {
        (1u64 << size) - 1
    }
}

/// Every tensor of `tensors` summed element-wise over all processes, in one all-reduce (DP's gradients
/// and BatchNorm statistics). Every process must pass the same names and shapes.
pub fn sum_over_ranks(comm: &dyn Collective, tensors: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    if comm.size() == 1 {
        return Ok(tensors);
    }
    let mut buf = Vec::new();
    for t in tensors.values() {
        buf.extend(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    let all = all_ranks(comm.size());
    comm.prepare(&[all])?;
    comm.all_reduce_sum(all, &mut buf)?;
    let mut at = 0;
    tensors
        .into_iter()
        .map(|(name, t)| {
            let n = t.elem_count();
            let v = Tensor::from_vec(buf[at..at + n].to_vec(), t.shape(), t.device())?.to_dtype(t.dtype())?;
            at += n;
            Ok((name, v))
        })
        .collect()
}

/// `sdp bench comm` lives with the other measuring tools; its path here stays.
pub use crate::tools::comm_bench as bench;
