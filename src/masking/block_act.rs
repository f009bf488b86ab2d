//! `block_act` masking: whole residual blocks, like `block`, but balancing each worker's activation
//! memory instead of its parameter bytes.
//!
//! Why: at realistic batch sizes activations, not parameters, set a worker's memory, and in a ResNet
//! the early, high-resolution blocks hold few parameters but most activations. `block` then gives one
//! worker several parameter-cheap but activation- and FLOP-heavy blocks: on an H200 (ResNet-18, K = 4,
//! C = 0.5, batch 128) its largest worker used 0.92× a DP worker's memory while the mean was 0.66×.
//!
//! Measured on the CPU (`sdp bench step --model resnet18 --batch 128 --masking S --coverage 0.5
//! --workers 4 --worker k`, 2 cores, loaded): the step times of the four workers go from 4.2/1.5/5.0/1.8 s
//! (`block`) to 3.2/3.2/3.7/3.2 s, so the synchronous step (the slowest worker) is about a quarter
//! shorter; peak RSS goes from 961/806/950/797 MB to 945/881/917/870 MB (DP: 1142 MB), i.e. the largest
//! worker barely moves on the CPU, where allocator caching and per-thread conv buffers blur the
//! activation estimate. The GPU memory effect is still to be measured (scripts/gpu_sdp_memory.sh).

use super::{greedy_balance, MaskStrategy};
use crate::models::Unit;
use anyhow::Result;
use rand_chacha::ChaCha8Rng;

/// Greedy balancing of per-sample activation elements over Block units (ties by parameters, then by
/// the seeded shuffle): every unit is held by exactly m workers, and the per-worker activation totals
/// differ by at most the largest unit's.
pub struct BlockAct;

impl MaskStrategy for BlockAct {
    fn assign(&self, units: &[Unit], workers: usize, m: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<bool>>> {
        // Activations first; parameters break ties between blocks of equal activation size (in the
        // low bits: a ResNet block has at most ~10^7 parameters and ~10^5 activation elements).
        let sizes: Vec<u64> = units.iter().map(|u| ((u.act_elems as u64) << 24) + (u.params as u64 >> 8)).collect();
        let mut loads = vec![0u64; workers];
        Ok(greedy_balance(&sizes, &mut loads, m, rng))
    }
}
