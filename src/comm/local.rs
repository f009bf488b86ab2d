//! The exact in-process averager: all K simulated workers live in this process.

use super::Averager;
use crate::subnet::IndexMap;
use candle_core::{DType, Result, Tensor};

/// How a parameter's coordinates are held, fixed while the selection is (computed at its first
/// average after a new selection).
enum Holders {
    /// Every coordinate is held by the same number of workers (uniform representation: always, for
    /// the registered strategies): the mean is the sum times a scalar.
    Uniform(f64),
    /// Per-coordinate holder counts; coordinates nobody holds keep the global value.
    PerCoordinate { inv_count: Tensor, held: Tensor },
}

/// The exact in-process averager: every worker lives in this process.
///
/// Per parameter and sync it costs one op per contribution (an add, or an `index_add` into the
/// running sum for a narrowed tensor) plus one scaling: 4 + 1 ops for K = 4, where a scatter into
/// zeros, an add per worker and a masked division took 17. `cargo bench --bench averaging` measures it.
#[derive(Default)]
pub struct LocalAverager {
    holders: std::collections::HashMap<String, Holders>,
}

impl LocalAverager {
    pub fn new() -> Self {
        Self::default()
    }

    fn holders(&mut self, name: &str, global: &Tensor, contributions: &[(&IndexMap, Tensor)]) -> Result<&Holders> {
        if !self.holders.contains_key(name) {
            let mut count = Tensor::zeros(global.shape(), DType::F32, global.device())?;
            for (map, t) in contributions {
                count = map.scatter_add(&count, &t.ones_like()?.to_dtype(DType::F32)?)?;
            }
            let (min, max) = (count.min_all()?.to_scalar::<f32>()?, count.max_all()?.to_scalar::<f32>()?);
            let h = if min == max && min > 0.0 {
                Holders::Uniform(min as f64)
            } else {
                let inv_count = count.maximum(1f64)?.recip()?;
                Holders::PerCoordinate { inv_count, held: count.gt(0f64)? }
            };
            self.holders.insert(name.to_string(), h);
        }
        Ok(&self.holders[name])
    }
}

impl Averager for LocalAverager {
    fn average(&mut self, name: &str, global: &Tensor, contributions: &[(&IndexMap, Tensor)]) -> Result<Tensor> {
        let Some(((first_map, first), rest)) = contributions.split_first() else {
            return Ok(global.clone());
        };
        if rest.is_empty() && first_map.is_full() {
            return first.copy();
        }
        let mut sum = if first_map.is_full() { first.clone() } else { first_map.scatter(first)? };
        for (map, t) in rest {
            sum = map.scatter_add(&sum, t)?;
        }
        match self.holders(name, global, contributions)? {
            Holders::Uniform(m) => sum.affine(1.0 / m, 0.0),
            Holders::PerCoordinate { inv_count, held } => held.where_cond(&(sum * inv_count)?, global),
        }
    }
}
