//! Averaging among holders: the collective every SDP synchronisation goes through (docs/design.md §2).
//!
//! The trait is shaped like a collective so that the in-process simulation ([`local::LocalAverager`]) and a
//! process-per-GPU implementation (NCCL, one communicator per holder set) are interchangeable.

pub mod local;

use crate::subnet::IndexMap;
use candle_core::{Result, Tensor};
pub use local::LocalAverager;

/// The collective that averages each coordinate among the workers holding it (docs/design.md §2).
///
/// `contributions` are the local tensors of the workers *this process hosts* that hold the parameter, with
/// their index maps: all holders for the in-process simulation, one (its own) for a process-per-GPU
/// implementation, which all-reduces the scattered sums and holder counts within the holder group.
pub trait Averager {
    /// The new global value: at each coordinate, the mean of the holders' values; coordinates that no
    /// worker holds keep `global`'s value.
    fn average(&mut self, name: &str, global: &Tensor, contributions: &[(&IndexMap, Tensor)]) -> Result<Tensor>;
}
