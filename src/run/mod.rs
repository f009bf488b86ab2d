//! Running experiments (docs/design.md §3): the runner (skip, claim, resume, record), what a run reports as it
//! trains (progress), one owner per run folder (lock), checkpoints, the watch over a spread run's ranks (peers),
//! and the options all of them take.

pub mod checkpoint;
pub mod lock;
pub mod options;
pub mod peers;
pub mod progress;
pub mod runner;
