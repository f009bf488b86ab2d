//! Measuring rather than training (docs/design.md §3): `sdp bench` (a step, the GEMM peak, the loader, and
//! the collectives: comm_bench), `sdp check --cost` (cost), `sdp memprobe` (one worker's peak memory).

pub mod bench;
pub mod comm_bench;
pub mod cost;
pub mod memprobe;
