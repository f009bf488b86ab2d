//! `block` masking: each worker holds whole residual blocks, with parameter bytes balanced across workers
//! (docs/design.md §1: the paper's block-level subnetworks with uniform representation).

use super::{greedy_balance, MaskStrategy};
use crate::models::Unit;
use anyhow::Result;
use rand_chacha::ChaCha8Rng;

/// Greedy byte balancing over Block units: units in decreasing size (ties ordered by a seeded shuffle),
/// each to the m least-loaded workers (ties broken by the seeded RNG). Every unit is held by exactly m
/// workers, and the per-worker parameter totals differ by at most the largest unit.
pub struct Block;

impl MaskStrategy for Block {
    fn assign(&self, units: &[Unit], workers: usize, m: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<bool>>> {
        // All parameters share one dtype, so balancing parameter counts balances bytes.
        let sizes: Vec<u64> = units.iter().map(|u| u.params as u64).collect();
        let mut loads = vec![0u64; workers];
        Ok(greedy_balance(&sizes, &mut loads, m, rng))
    }
}
