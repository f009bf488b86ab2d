//! `neuron` masking: each worker holds a subset of every block's internal channels (ResNet: conv1 output /
//! conv2 input channels; Swin: MLP hidden units), so every worker keeps every block, narrowed.

use super::MaskStrategy;
use crate::models::Unit;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// Balances within each block b (units grouped by `Unit::block`): with n_b units and m holders per unit,
/// every worker holds floor(m·n_b/K) or ceil(m·n_b/K) of them, and every unit is held by exactly m workers.
/// Which workers get the ceil is chosen per block as the least-loaded ones (parameter bytes so far, ties
/// broken by the seeded RNG), so the extra units rotate across blocks and overall bytes stay balanced; which
/// channels a worker gets is a seeded shuffle.
///
/// If m·n_b < K some worker would hold none of block b's channels (a zero-width block). That is an **error**
/// naming the block (raise the coverage, use fewer workers or a wider model) rather than a silent
/// violation of uniform representation.
pub struct Neuron;

impl MaskStrategy for Neuron {
    fn assign(&self, units: &[Unit], workers: usize, m: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<bool>>> {
        let mut blocks: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, u) in units.iter().enumerate() {
            blocks.entry(u.block).or_default().push(i);
        }
        // Largest blocks first (by parameters), as in greedy balancing; ties in block order.
        let mut order: Vec<(usize, Vec<usize>)> = blocks.into_iter().collect();
        order.sort_by_key(|(_, us)| std::cmp::Reverse(us.iter().map(|&i| units[i].params).sum::<usize>()));

        let mut holds = vec![vec![false; units.len()]; workers];
        let mut loads = vec![0u64; workers];
        for (b, mut members) in order {
            let n = members.len();
            if m * n < workers {
                let name = units[members[0]].name.split('#').next().unwrap_or_default().to_string();
                bail!(
                    "neuron masking: block {b} ({name:?}) has {n} internal units; with m = {m} holders each and \
                     K = {workers} workers, m·n/K = {:.3} < 1, so some worker would hold none of its channels \
                     (raise the coverage, use fewer workers or a wider model)",
                    (m * n) as f64 / workers as f64
                );
            }
            // Dealing order of the workers: least-loaded first (random ties). Slot t of the m·n unit copies
            // goes to dealing position t mod K, so positions 0..(m·n mod K) get the ceil, and the m copies of
            // a unit (consecutive slots, m ≤ K) land on m distinct workers.
            let mut dealing: Vec<(u64, u64, usize)> =
                loads.iter().enumerate().map(|(k, &l)| (l, rng.random(), k)).collect();
            dealing.sort_unstable();
            members.shuffle(rng);
            for t in 0..m * n {
                let (u, k) = (members[t / m], dealing[t % workers].2);
                holds[k][u] = true;
                loads[k] += units[u].params as u64;
            }
        }
        Ok(holds)
    }
}
