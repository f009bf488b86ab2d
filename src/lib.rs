//! `sdp`: a reproducible benchmark suite for Subnetwork Data Parallelism (arXiv 2507.09029).
//!
//! The crate is organised as in docs/design.md §3: specs expand into runs (`spec`), runs train models (`models`,
//! `ops`) on datasets (`data`) with a method (`train`, `optim`, `comm`), and write results (`results`),
//! from which `figures` draws figures and tables.

pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod cost;
pub mod data;
pub mod figures;
pub mod io;
pub mod lock;
pub mod masking;
pub mod memprobe;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod optim;
pub mod peers;
pub mod plan;
pub mod progress;
pub mod registry;
pub mod results;
pub mod runner;
pub mod runtime;
pub mod seed;
pub mod spec;
pub mod subnet;
pub mod task;
pub mod train;
