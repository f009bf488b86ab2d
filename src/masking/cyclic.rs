//! `cyclic` masking: the uniform-representation construction in which every block is held by m *consecutive*
//! workers of a ring, so that the worker–unit averaging graph is connected.
//!
//! Why: byte-balanced `block` masking can split the workers into groups that never share a block (ResNet-18
//! at K = 4, C = 0.5: workers {0, 2} and {1, 3} hold disjoint blocks, spectral gap 0), and averaging then
//! never mixes the groups' parameters (only the shared stem and head connect them). Here unit slot p is held
//! by ring positions p, p+1, …, p+m−1 (mod K), and every slot is used, so consecutive windows overlap: with
//! m ≥ 2 and at least K − m units the graph is connected and its spectral gap is positive.
//!
//! Balance: units in decreasing size (equal sizes in a seeded order), each put in the free slot whose window
//! of workers is least loaded (smallest maximum, then smallest sum; ties broken by the seeded RNG). The ring
//! order of the workers is a seeded permutation, so seeds give different (equally balanced) selections.

use super::MaskStrategy;
use crate::models::Unit;
use anyhow::Result;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub struct Cyclic;

impl MaskStrategy for Cyclic {
    fn assign(&self, units: &[Unit], workers: usize, m: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<bool>>> {
        let mut ring: Vec<usize> = (0..workers).collect();
        ring.shuffle(rng);
        // The workers of slot p: ring positions p, p+1, …, p+m−1 (mod K).
        let windows: Vec<Vec<usize>> =
            (0..units.len()).map(|slot| (0..m).map(|j| ring[(slot + j) % workers]).collect()).collect();
        let mut order: Vec<usize> = (0..units.len()).collect();
        order.shuffle(rng);
        // Stable sort: equal sizes keep their shuffled order.
        order.sort_by(|&a, &b| units[b].params.cmp(&units[a].params));
        let mut free: Vec<usize> = (0..units.len()).collect();
        let mut loads = vec![0u64; workers];
        let mut holds = vec![vec![false; units.len()]; workers];
        for u in order {
            let size = units[u].params as u64;
            // One random key per candidate slot, drawn unconditionally, so the stream advances identically.
            let (_, _, _, i) = free
                .iter()
                .enumerate()
                .map(|(i, &slot)| {
                    let max = windows[slot].iter().map(|&k| loads[k]).max().unwrap_or(0);
                    let sum: u64 = windows[slot].iter().map(|&k| loads[k]).sum();
                    (max, sum, rng.random::<u64>(), i)
                })
                .min()
                .unwrap_or_default(); // `free` has a slot for every unit not yet placed
            let slot = free.swap_remove(i);
            for &k in &windows[slot] {
                loads[k] += size;
                holds[k][u] = true;
            }
        }
        Ok(holds)
    }
}
