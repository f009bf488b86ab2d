//! Masking strategies: which worker holds which maskable unit (docs/design.md §1 "Coverage C", §2).
//!
//! A strategy turns the model's unit list, the worker count K and the coverage C into a [`Selection`]:
//! `holds[k][u]` says whether worker k holds unit u. Every rank computes every worker's mask from the same
//! arguments and the same seeded `Stream::Mask` generator, so selection never communicates.
//!
//! # Adding a masking strategy: one new file plus one registry line
//!
//! 1. Write `src/masking/<name>.rs` with a unit struct implementing [`MaskStrategy`] (its `assign`: see
//!    `random_block.rs`, the smallest example). Arguments arrive checked; reuse [`greedy_balance`] /
//!    [`least_loaded`] for byte balancing.
//! 2. Add `mod <name>;` below and one line to [`BUILT_IN`]: its spec name, the unit kind it selects among
//!    (`UnitKind::Block` or `UnitKind::Neuron`) and the struct. (From outside the crate: [`register`].)
//!
//! `tests/masking.rs` loops over [`REGISTRY`], so the new strategy is checked against the shared invariants
//! automatically. Every registered strategy must satisfy them:
//!
//! - **Uniform representation**: with m = [`holders`]`(C, K)`, every unit is held by exactly m workers (so every
//!   coordinate is trained, and averaging among holders divides by the same m everywhere).
//! - **Purity**: the selection is a function of `(units, workers, coverage, rng state)` only: the same seed
//!   gives the identical selection on every rank; different seeds usually give different selections.
//! - **Shape**: `holds` has K rows of `units.len()` entries, and `m` is the holder count used.
//! - **Full coverage**: C = 1 gives every worker every unit (SDP then equals data parallelism).
//! - **Bad input is an error, not a panic**: K = 0, C outside (0, 1] or a unit of the wrong kind.

mod block;
mod block_act;
mod cyclic;
mod neuron;
mod random_block;

use crate::models::{Unit, UnitKind};
use crate::registry::{Named, Registry};
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Which worker holds which unit: `holds[k][u]` for worker k and unit u (units in the order given to
/// [`Registered::select`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub holds: Vec<Vec<bool>>,
    /// The number of workers holding each unit (m = round(C·K) clamped to [1, K]).
    pub m: usize,
}

impl Selection {
    /// Number of workers K.
    pub fn workers(&self) -> usize {
        self.holds.len()
    }

    /// Number of units the selection covers.
    pub fn num_units(&self) -> usize {
        self.holds.first().map_or(0, Vec::len)
    }

    /// Indices of the units worker `k` holds, in unit order.
    pub fn held_by(&self, k: usize) -> Vec<usize> {
        self.holds[k].iter().enumerate().filter(|(_, &h)| h).map(|(u, _)| u).collect()
    }

    /// Number of units each worker holds.
    pub fn units_per_worker(&self) -> Vec<usize> {
        self.holds.iter().map(|row| row.iter().filter(|&&h| h).count()).collect()
    }

    /// Number of workers holding each unit (m for every unit under uniform representation).
    pub fn holder_counts(&self) -> Vec<usize> {
        (0..self.num_units()).map(|u| self.holds.iter().filter(|row| row[u]).count()).collect()
    }

    /// The workers holding unit `u`, as a K-long membership mask (the unit's *holder set*).
    pub fn holder_set(&self, u: usize) -> Vec<bool> {
        self.holds.iter().map(|row| row[u]).collect()
    }

    /// Scalar parameters of the masked units each worker holds (`units` as given to `select`).
    pub fn params_per_worker(&self, units: &[Unit]) -> Vec<usize> {
        self.holds.iter().map(|row| units.iter().zip(row).filter(|(_, &h)| h).map(|(u, _)| u.params).sum()).collect()
    }

    /// Fraction of the whole model's parameters each worker holds: (shared + held unit params) / (shared +
    /// all unit params). `shared_params` counts the parameters every worker holds (stem, head, shortcuts…).
    /// This is the *achieved* coverage to report next to the nominal C.
    pub fn param_fraction(&self, units: &[Unit], shared_params: usize) -> Vec<f64> {
        let total = shared_params + units.iter().map(|u| u.params).sum::<usize>();
        self.params_per_worker(units)
            .into_iter()
            .map(|p| if total == 0 { 1.0 } else { (shared_params + p) as f64 / total as f64 })
            .collect()
    }

    /// Checks the uniform-representation rule and the shape against `num_units`; the error names the first
    /// offending unit.
    pub fn check_uniform(&self, num_units: usize) -> Result<()> {
        for (k, row) in self.holds.iter().enumerate() {
            if row.len() != num_units {
                bail!("selection row of worker {k} has {} entries, expected {num_units} units", row.len());
            }
        }
        for (u, c) in self.holder_counts().into_iter().enumerate() {
            if c != self.m {
                bail!("unit {u} is held by {c} workers, expected exactly m = {}", self.m);
            }
        }
        Ok(())
    }
}

/// A way of assigning maskable units to workers.
pub trait MaskStrategy: Send + Sync {
    /// `holds[k][u]`: whether worker k holds unit u, every unit held by exactly `m` of the `workers`. The
    /// arguments are checked already (K ≥ 1, 1 ≤ m ≤ K, every unit of the registered kind). Must be a pure
    /// function of its arguments (every rank computes every mask without communicating).
    fn assign(&self, units: &[Unit], workers: usize, m: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<bool>>>;
}

/// A registered strategy: the name a spec gives (`method.masking`), the unit kind it selects among, and
/// the strategy.
#[derive(Clone, Copy)]
pub struct Registered {
    pub name: &'static str,
    pub kind: UnitKind,
    pub strategy: &'static dyn MaskStrategy,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registered({})", self.name)
    }
}

impl Registered {
    /// The selection for K = `workers` at coverage C: the arguments checked ([`check_args`]), then the
    /// strategy's assignment with m = [`holders`]`(C, K)`.
    pub fn select(&self, units: &[Unit], workers: usize, coverage: f64, rng: &mut ChaCha8Rng) -> Result<Selection> {
        let m = check_args(self.name, self.kind, units, workers, coverage)?;
        Ok(Selection { holds: self.strategy.assign(units, workers, m, rng)?, m })
    }
}

impl Named for Registered {
    fn name(&self) -> &'static str {
        self.name
    }
}

/// Every built-in masking strategy. One line per strategy.
pub const BUILT_IN: &[Registered] = &[
    Registered { name: "block", kind: UnitKind::Block, strategy: &block::Block },
    Registered { name: "block_act", kind: UnitKind::Block, strategy: &block_act::BlockAct },
    Registered { name: "cyclic", kind: UnitKind::Block, strategy: &cyclic::Cyclic },
    Registered { name: "neuron", kind: UnitKind::Neuron, strategy: &neuron::Neuron },
    Registered { name: "random_block", kind: UnitKind::Block, strategy: &random_block::RandomBlock },
];

/// The built-in strategies, then those registered while the program runs ([`register`]).
pub static REGISTRY: Registry<Registered> = Registry::new("masking strategy", BUILT_IN);

/// Registers a strategy defined outside this crate under `name`, selecting among units of `kind`, after
/// which specs may name it (`method.masking`). A name already taken is an error.
pub fn register(name: &'static str, kind: UnitKind, strategy: &'static dyn MaskStrategy) -> Result<()> {
    REGISTRY.register(Registered { name, kind, strategy })
}

/// The registered strategy called `name`; an unknown name is an error listing the registered names.
pub fn strategy(name: &str) -> Result<Registered> {
    match REGISTRY.find(name) {
        Some(r) => Ok(r),
        None => bail!("unknown masking strategy {name:?}; registered strategies: {}", REGISTRY.names().join(", ")),
    }
}

/// The number of workers holding each unit: m = round(C·K) clamped to [1, K] (0 when K = 0).
pub fn holders(coverage: f64, workers: usize) -> usize {
    if workers == 0 {
        return 0;
    }
    let m = (coverage * workers as f64).round();
    // `as` saturates (NaN → 0), and the clamp then keeps m in [1, K].
    (m as usize).clamp(1, workers)
}

/// Validates the arguments every strategy receives and returns m. Errors: K = 0, C not in (0, 1], or a
/// unit whose kind is not `kind` (named in the message).
pub fn check_args(strategy: &str, kind: UnitKind, units: &[Unit], workers: usize, coverage: f64) -> Result<usize> {
    if workers == 0 {
        bail!("masking {strategy:?}: workers must be at least 1");
    }
    if !(coverage > 0.0 && coverage <= 1.0) {
        bail!("masking {strategy:?}: coverage must be in (0, 1], got {coverage}");
    }
    if let Some(u) = units.iter().find(|u| u.kind != kind) {
        bail!("masking {strategy:?} selects {kind:?} units, but unit {:?} is a {:?} unit", u.name, u.kind);
    }
    Ok(holders(coverage, workers))
}

/// Picks the `m` least-loaded workers (ties broken by `rng`), adds `size` to their loads and returns them in
/// increasing worker order.
pub fn least_loaded(loads: &mut [u64], m: usize, size: u64, rng: &mut ChaCha8Rng) -> Vec<usize> {
    // One random key per worker, drawn unconditionally, so the RNG advances identically whatever the loads.
    let mut order: Vec<(u64, u64, usize)> = loads.iter().enumerate().map(|(k, &l)| (l, rng.random(), k)).collect();
    order.sort_unstable();
    let mut chosen: Vec<usize> = order.iter().take(m).map(|&(_, _, k)| k).collect();
    chosen.sort_unstable();
    for &k in &chosen {
        loads[k] += size;
    }
    chosen
}

/// Greedy byte balancing (docs/design.md §1): units in decreasing size (ties ordered by a seeded shuffle), each
/// given to the m least-loaded workers (ties among workers broken by `rng`). `loads` holds each worker's
/// running total and is updated. Returns `holds[k][u]`.
///
/// Invariant (by induction over units): the spread max − min of the loads never exceeds the largest size.
pub fn greedy_balance(sizes: &[u64], loads: &mut [u64], m: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<bool>> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.shuffle(rng);
    // Stable sort: equal sizes keep their shuffled order.
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]));
    let mut holds = vec![vec![false; sizes.len()]; loads.len()];
    for u in order {
        for k in least_loaded(loads, m, sizes[u], rng) {
            holds[k][u] = true;
        }
    }
    holds
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn holders_rounds_and_clamps() {
        // (C, K, m); 1.5 rounds half away from zero; out-of-range C clamps to [1, K].
        let (rounded, clamped) =
            ([(0.5, 4, 2), (0.875, 8, 7), (0.5, 3, 2)], [(0.01, 8, 1), (2.0, 3, 3), (f64::NAN, 3, 1)]);
        for (c, k, m) in rounded.into_iter().chain(clamped).chain([(1.0, 3, 3), (0.5, 0, 0)]) {
            assert_eq!(holders(c, k), m, "C = {c}, K = {k}");
        }
    }

    #[test]
    fn least_loaded_picks_minimum_loads() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut loads = vec![5, 1, 3, 1];
        assert_eq!(least_loaded(&mut loads, 2, 10, &mut rng), vec![1, 3]);
        assert_eq!(loads, vec![5, 11, 3, 11]);
        assert_eq!(least_loaded(&mut loads, 1, 1, &mut rng), vec![2]);
    }

    #[test]
    fn greedy_balance_spread_bounded_by_largest() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let sizes: Vec<u64> = (1..40).map(|i| (i * 7919 % 1000) as u64 + 1).collect();
        for k in 1..=6 {
            for m in 1..=k {
                let mut loads = vec![0; k];
                let holds = greedy_balance(&sizes, &mut loads, m, &mut rng);
                let spread = loads.iter().max().unwrap() - loads.iter().min().unwrap();
                assert!(spread <= *sizes.iter().max().unwrap(), "k={k} m={m} loads={loads:?}");
                let sel = Selection { holds, m };
                sel.check_uniform(sizes.len()).unwrap();
            }
        }
    }

    #[test]
    fn check_args_messages() {
        let u = Unit { kind: UnitKind::Neuron, block: 0, index: 1, name: "layer1.0#1".into(), params: 3, act_elems: 2 };
        let e = check_args("block", UnitKind::Block, &[u], 2, 0.5).unwrap_err().to_string();
        assert!(e.contains("layer1.0#1") && e.contains("Neuron"), "{e}");
        let e = check_args("block", UnitKind::Block, &[], 0, 0.5).unwrap_err().to_string();
        assert!(e.contains("workers must be at least 1"), "{e}");
        let e = check_args("block", UnitKind::Block, &[], 2, 1.5).unwrap_err().to_string();
        assert!(e.contains("coverage must be in (0, 1], got 1.5"), "{e}");
        let e = check_args("block", UnitKind::Block, &[], 2, 0.0).unwrap_err().to_string();
        assert!(e.contains("got 0"), "{e}");
    }

    #[test]
    fn selection_helpers() {
        let units: Vec<Unit> = (0..3)
            .map(|i| Unit {
                kind: UnitKind::Block,
                block: i,
                index: 0,
                name: format!("b{i}"),
                params: 10 * (i + 1),
                act_elems: 0,
            })
            .collect();
        let sel = Selection { holds: vec![vec![true, false, true], vec![false, true, true]], m: 1 };
        assert_eq!(sel.workers(), 2);
        assert_eq!(sel.num_units(), 3);
        assert_eq!(sel.held_by(0), vec![0, 2]);
        assert_eq!(sel.units_per_worker(), vec![2, 2]);
        assert_eq!(sel.holder_counts(), vec![1, 1, 2]);
        assert_eq!(sel.holder_set(2), vec![true, true]);
        assert_eq!(sel.params_per_worker(&units), vec![40, 50]);
        assert_eq!(sel.param_fraction(&units, 40), vec![0.8, 0.9]);
        let e = sel.check_uniform(3).unwrap_err().to_string();
        assert!(e.contains("unit 2 is held by 2 workers, expected exactly m = 1"), "{e}");
    }
}
