//! How this process was started: alone (`sdp run`), or as one of N ranks of an MPI job (`mpirun -np N sdp
//! run …`, `srun sdp run …`). Worker k of a run lives on rank k mod N.

use super::{Collective, Solo};
use anyhow::Result;
use std::rc::Rc;

/// This process's place among the processes of a job.
#[derive(Clone)]
pub struct World {
    pub comm: Rc<dyn Collective>,
    /// Rank among the processes on this node (picks the GPU of `--device cuda`).
    pub local_rank: usize,
}

impl World {
    /// A process on its own.
    pub fn solo() -> Self {
        Self { comm: Rc::new(Solo), local_rank: 0 }
    }

    /// The world a launcher set up: MPI where the environment says this process is one of several ranks,
    /// else a process on its own. An MPI launch of a build without the `mpi` feature is an error, not N
    /// independent copies of the same run.
    pub fn from_env() -> Result<Self> {
        let Some((launcher, size)) = launched_size() else { return Ok(Self::solo()) };
        if size <= 1 {
            return Ok(Self::solo());
        }
        Self::mpi(launcher, size)
    }

    #[cfg(feature = "mpi")]
    fn mpi(launcher: &str, size: usize) -> Result<Self> {
        let comm = super::mpi::MpiComm::init()?;
        anyhow::ensure!(
            comm.size() == size,
            "{launcher} started {size} processes but MPI sees {} (srun needs an MPI plugin: `srun --mpi=pmix`)",
            comm.size()
        );
        Ok(Self { comm: Rc::new(comm), local_rank: local_rank() })
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi(launcher: &str, size: usize) -> Result<Self> {
        anyhow::bail!(
            "{launcher} started {size} processes, but this sdp was built without MPI: build it with \
             `cargo build --release --features mpi` (needs an MPI library, e.g. Debian's libopenmpi-dev)"
        )
    }

    /// The device a `--device` flag names for this process: with several processes, plain `cuda` becomes
    /// `cuda:<local rank>` (one GPU per rank on a node); anything else is kept.
    pub fn device_name(&self, flag: &str) -> String {
        if self.size() > 1 && flag == "cuda" {
            format!("cuda:{}", self.local_rank)
        } else {
            flag.to_string()
        }
    }

    /// This world with its parameter sums run by NCCL on `device`'s GPU, where the build has the `nccl`
    /// feature, `device` is a GPU, and there are several processes (or `always`: a benchmark at one rank).
    /// Otherwise unchanged: MPI sums host buffers (GPU ranks stage them through host memory).
    pub fn on_device(self, device: &candle_core::Device, always: bool) -> Result<Self> {
        if !device.is_cuda() || (self.size() == 1 && !always) {
            return Ok(self);
        }
        self.nccl(device)
    }

    #[cfg(feature = "nccl")]
    fn nccl(self, device: &candle_core::Device) -> Result<Self> {
        let comm = super::nccl::NcclComm::new(self.comm.clone(), device)?;
        Ok(Self { comm: Rc::new(comm), local_rank: self.local_rank })
    }

    #[cfg(not(feature = "nccl"))]
    fn nccl(self, _device: &candle_core::Device) -> Result<Self> {
        Ok(self)
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Whether this process writes the run's results (rank 0).
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// The launcher and process count the environment announces, if any.
fn launched_size() -> Option<(&'static str, usize)> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok());
    [
        ("mpirun (Open MPI)", "OMPI_COMM_WORLD_SIZE"),
        ("an MPI launcher (PMI)", "PMI_SIZE"),
        ("an MPI launcher (PMIx)", "PMIX_SIZE"),
    ]
    .into_iter()
    .find_map(|(who, k)| var(k).map(|n| (who, n)))
    .or_else(|| std::env::var("SLURM_STEP_ID").ok().and(var("SLURM_NTASKS")).map(|n| ("srun", n)))
}

#[cfg(feature = "mpi")]
fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
