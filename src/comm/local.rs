//! The exact in-process averager: all K simulated workers live in this process.

use super::Averager;
use crate::subnet::IndexMap;
use candle_core::{DType, Result, Tensor};

/// The exact in-process averager: every worker lives in this process.
#[derive(Default)]
pub struct LocalAverager {
    /// Holder counts per coordinate, by parameter name (fixed while the selection is).
    counts: std::collections::HashMap<String, Tensor>,
}

impl LocalAverager {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Averager for LocalAverager {
    fn average(&mut self, name: &str, global: &Tensor, contributions: &[(&IndexMap, Tensor)]) -> Result<Tensor> {
        if contributions.is_empty() {
            return Ok(global.clone());
        }
        if contributions.len() == 1 && contributions[0].0.is_full() {
            return contributions[0].1.copy();
        }
        let mut sum = Tensor::zeros(global.shape(), DType::F32, global.device())?;
        for (map, t) in contributions {
            sum = (sum + map.scatter(t)?)?;
        }
        let count = match self.counts.get(name) {
            Some(c) => c.clone(),
            None => {
                let mut c = Tensor::zeros(global.shape(), DType::F32, global.device())?;
                for (map, t) in contributions {
                    c = (c + map.scatter(&t.ones_like()?)?)?;
                }
                self.counts.insert(name.to_string(), c.clone());
                c
            }
        };
        let held = count.gt(0f64)?;
        let mean = (sum / count.maximum(1f64)?)?;
        held.where_cond(&mean, global)
    }
}
