//! MPI collectives (feature `mpi`): the process group `mpirun` or `srun` started, one MPI communicator per
//! rank group, made once with `MPI_Comm_split` and reused for every synchronisation.

use super::{all_ranks, Collective};
use anyhow::{Context, Result};
use mpi::collective::SystemOperation;
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::cell::RefCell;
use std::collections::HashMap;

/// This process's place in an MPI job.
pub struct MpiComm {
    world: SimpleCommunicator,
    /// Per rank group: the communicator of its ranks (`None` on the ranks outside it).
    groups: RefCell<HashMap<u64, Option<SimpleCommunicator>>>,
    // Finalizes MPI when dropped: declared last, so the communicators above are freed first.
    _universe: mpi::environment::Universe,
}

impl MpiComm {
    /// Initializes MPI (once per process).
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().context("MPI_Init failed, or MPI was initialized twice")?;
        let world = universe.world();
        Ok(Self { world, groups: RefCell::new(HashMap::new()), _universe: universe })
    }
}

impl Collective for MpiComm {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn prepare(&self, groups: &[u64]) -> Result<()> {
        let me = 1u64 << self.rank();
        let mut made = self.groups.borrow_mut();
        for &g in groups {
            if made.contains_key(&g) {
                continue;
            }
            let comm = if g == all_ranks(self.size()) {
                Some(self.world.duplicate())
            } else {
                let color = if g & me != 0 { Color::with_value(0) } else { Color::undefined() };
                self.world.split_by_color(color)
            };
            made.insert(g, comm);
        }
        Ok(())
    }

    fn all_reduce_sum(&self, group: u64, buf: &mut [f32]) -> Result<()> {
        let made = self.groups.borrow();
        let comm = made
            .get(&group)
            .and_then(Option::as_ref)
            .with_context(|| format!("rank {} has no communicator for ranks {group:#b}", self.rank()))?;
        let send = buf.to_vec();
        comm.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        root.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        root.broadcast_into(&mut buf[..]);
        Ok(())
    }

    fn describe(&self) -> String {
        let lib = mpi::environment::library_version().unwrap_or_else(|_| "unknown MPI".into());
        // "Open MPI v4.1.4, package: Debian OpenMPI, …": the name and version.
        format!("mpi, {}", lib.split(',').next().unwrap_or("").trim())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
