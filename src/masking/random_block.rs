//! `random_block` masking: the worked example of adding a strategy (one file plus one registry line).
//! Each block goes to m workers drawn uniformly at random: uniform representation, no byte balancing,
//! so per-worker memory varies with the draw (a baseline for the balanced `block` strategy).

use super::MaskStrategy;
use crate::models::Unit;
use anyhow::Result;
use rand_chacha::ChaCha8Rng;

pub struct RandomBlock;

impl MaskStrategy for RandomBlock {
    fn assign(&self, units: &[Unit], workers: usize, m: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<bool>>> {
        let mut holds = vec![vec![false; units.len()]; workers];
        for (u, _) in units.iter().enumerate() {
            for k in rand::seq::index::sample(rng, workers, m) {
                holds[k][u] = true;
            }
        }
        Ok(holds)
    }
}
