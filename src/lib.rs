//! `sdp`: a reproducible benchmark suite for Subnetwork Data Parallelism (arXiv 2507.09029).
//!
//! The crate is organised as in docs/design.md §3: specs expand into runs (`spec`), runs train models (`models`,
//! `ops`) on datasets (`data`) with a method (`train`, `optim`, `comm`), and write results (`results`),
//! from which `figures` draws figures and tables.

pub mod comm;
pub mod data;
pub mod figures;
pub mod io;
pub mod masking;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod optim;
pub mod plan;
pub mod registry;
pub mod results;
pub mod run;
pub mod runtime;
pub mod seed;
pub mod spec;
pub mod subnet;
pub mod task;
pub mod tools;
pub mod train;

// The run room's modules keep their crate-level paths (`sdp::runner::run_all`, `crate::checkpoint`, …).
pub use run::{checkpoint, lock, peers, progress, runner};
// The tools room's modules keep their crate-level paths too (`sdp::cost::estimate`, `crate::memprobe`, …).
pub use tools::{bench, cost, memprobe};
