//! The exact in-process averager: all K simulated workers live in this process.

use super::{Averager, IndexMap, SyncTensor};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};

/// How a tensor's coordinates are held, fixed while the selection is (computed at its first average
/// after a new selection).
enum Holders {
    /// Every coordinate is held by the same number of workers (uniform representation: always, for
    /// the registered strategies): the mean is the sum times a scalar.
    Uniform(f64),
    /// Per-coordinate holder counts; coordinates nobody holds keep the global value.
    PerCoordinate { inv_count: Tensor, held: Tensor },
}

/// The exact in-process averager: every worker lives in this process, so every coordinate's holders
/// contribute here and nothing is sent.
///
/// Per tensor and sync it costs one op per contribution (an add, or an `index_add` into the running sum
/// for a narrowed tensor) plus one scaling: 4 + 1 ops for K = 4, where a scatter into zeros, an add per
/// worker and a masked division took 17. `cargo bench --bench averaging` measures it.
#[derive(Default)]
pub struct LocalAverager {
    maps: Vec<BTreeMap<String, IndexMap>>,
    holders: HashMap<String, Holders>,
}

impl LocalAverager {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self, k: usize, name: &str) -> Result<&IndexMap> {
        self.maps.get(k).and_then(|m| m.get(name)).with_context(|| format!("worker {k} holds no part of {name}"))
    }

    fn holders(&mut self, t: &SyncTensor) -> Result<&Holders> {
        if !self.holders.contains_key(t.name) {
            let mut count = Tensor::zeros(t.global.shape(), DType::F32, t.global.device())?;
            for (k, maps) in self.maps.iter().enumerate() {
                if let Some(map) = maps.get(t.name) {
                    let ones = Tensor::ones(map.local_shape().as_slice(), DType::F32, t.global.device())?;
                    count = map.scatter_add(&count, &ones).with_context(|| format!("worker {k}'s {}", t.name))?;
                }
            }
            let (min, max) = (count.min_all()?.to_scalar::<f32>()?, count.max_all()?.to_scalar::<f32>()?);
            let h = if min == max && min > 0.0 {
                Holders::Uniform(min as f64)
            } else {
                let inv_count = count.maximum(1f64)?.recip()?;
                Holders::PerCoordinate { inv_count, held: count.gt(0f64)? }
            };
            self.holders.insert(t.name.to_string(), h);
        }
        Ok(&self.holders[t.name])
    }

    fn average_one(&mut self, t: &SyncTensor) -> Result<Tensor> {
        let Some(((k0, first), rest)) = t.contributions.split_first() else {
            return Ok(t.global.clone());
        };
        let first_map = self.map(*k0, t.name)?;
        if rest.is_empty() && first_map.is_full() {
            return Ok(first.copy()?);
        }
        let mut sum = if first_map.is_full() { first.clone() } else { first_map.scatter(first)? };
        for (k, local) in rest {
            sum = self.map(*k, t.name)?.scatter_add(&sum, local)?;
        }
        Ok(match self.holders(t)? {
            Holders::Uniform(m) => sum.affine(1.0 / m, 0.0)?,
            Holders::PerCoordinate { inv_count, held } => held.where_cond(&(sum * inv_count)?, &t.global)?,
        })
    }
}

impl Averager for LocalAverager {
    fn set_selection(&mut self, maps: &[BTreeMap<String, IndexMap>]) -> Result<()> {
        self.maps = maps.to_vec();
        self.holders.clear();
        Ok(())
    }

    fn average(&mut self, sync: &[SyncTensor]) -> Result<Vec<Tensor>> {
        sync.iter().map(|t| self.average_one(t).with_context(|| format!("averaging {}", t.name))).collect()
    }

    fn complete(&self) -> bool {
        true
    }

    fn assemble(&mut self, tensors: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        Ok(tensors.iter().map(|(_, t)| t.clone()).collect())
    }

    fn bytes_sent(&self) -> f64 {
        0.0
    }
}
