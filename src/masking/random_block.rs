//! `random_block` masking: the worked example of adding a strategy (one file plus one registry line).
//! Each block goes to m workers drawn uniformly at random: uniform representation, no byte balancing,
//! so per-worker memory varies with the draw (a baseline for the balanced `block` strategy).

use super::{check_args, MaskStrategy, Selection};
use crate::models::{Unit, UnitKind};
use anyhow::Result;
use rand_chacha::ChaCha8Rng;

pub struct RandomBlock;

pub fn new() -> Box<dyn MaskStrategy> {
    Box::new(RandomBlock)
}

impl MaskStrategy for RandomBlock {
    fn name(&self) -> &'static str {
        "random_block"
    }

    fn kind(&self) -> UnitKind {
        UnitKind::Block
    }

    fn select(&self, units: &[Unit], workers: usize, coverage: f64, rng: &mut ChaCha8Rng) -> Result<Selection> {
        let m = check_args(self.name(), self.kind(), units, workers, coverage)?;
        let mut holds = vec![vec![false; units.len()]; workers];
        for (u, _) in units.iter().enumerate() {
            for k in rand::seq::index::sample(rng, workers, m) {
                holds[k][u] = true;
            }
        }
        Ok(Selection { holds, m })
    }
}
