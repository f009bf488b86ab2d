//! Shared invariants of every registered masking strategy (docs/design.md §1): the tests loop over
//! `masking::REGISTRY`, so a newly registered strategy is checked without touching this file.
//! Strategy-specific guarantees (byte balance of `block`, per-block floor/ceil of `neuron`) follow.

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sdp::masking::{holders, strategy, MaskStrategy, Registered, Selection, REGISTRY};
use sdp::models::{Family, Unit, UnitKind};
use sdp::seed::{rng, Stream};

/// ResNet-18 (CIFAR) residual branches: (in channels, channels) per block, forward order.
const RESNET18: [(usize, usize); 8] =
    [(64, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)];

/// Block units of a ResNet-18-like model: a branch is conv3×3 (c_in→c) + BN(c) + conv3×3 (c→c) + BN(c),
/// i.e. 9·c_in·c + 9·c² + 4c parameters (73,984 for layer1.0; 8,393,728 for layer4.1). The projection
/// shortcut is shared, so it is not part of any unit.
fn resnet18_blocks() -> Vec<Unit> {
    RESNET18
        .iter()
        .enumerate()
        .map(|(b, &(cin, c))| Unit {
            kind: UnitKind::Block,
            block: b,
            index: 0,
            name: format!("layer{}.{}", b / 2 + 1, b % 2),
            params: 9 * cin * c + 9 * c * c + 4 * c,
            // conv1 and BN-ReLU outputs (c each) and conv2's (c) at 32², 16², 8², 4² pixels.
            act_elems: 3 * c * (1024 >> (2 * (b / 2))),
        })
        .collect()
}

/// Neuron units of the same model scaled to width `w` (64 → w): internal channel j of a block owns conv1's
/// output-channel slice (9·c_in), bn1's γ, β (2) and conv2's input-channel slice (9·c).
fn resnet18_neurons(w: usize) -> Vec<Unit> {
    let mut units = Vec::new();
    for (b, &(cin, c)) in RESNET18.iter().enumerate() {
        let (cin, c) = (cin * w / 64, c * w / 64);
        for j in 0..c {
            units.push(Unit {
                kind: UnitKind::Neuron,
                block: b,
                index: j,
                name: format!("layer{}.{}#{j}", b / 2 + 1, b % 2),
                params: 9 * cin + 2 + 9 * c,
                act_elems: 2 * (1024 >> (2 * (b / 2))),
            });
        }
    }
    units
}

/// Units of the kind `s` selects among, realistic sizes: full ResNet-18 blocks, or width-16 neurons.
/// Every registered strategy with its name and the units it selects among (ResNet-18's blocks, or the
/// neurons of 16-wide blocks).
fn strategies() -> impl Iterator<Item = (Registered, &'static str, Vec<Unit>)> {
    register_once();
    REGISTRY.all().into_iter().map(|s| {
        let units = match s.kind {
            UnitKind::Block => resnet18_blocks(),
            UnitKind::Neuron => resnet18_neurons(16),
        };
        (s, s.name, units)
    })
}

fn mask_rng(seed: u64) -> ChaCha8Rng {
    rng(seed, Stream::Mask, 0, 0)
}

fn coverage_for(m: usize, k: usize) -> f64 {
    m as f64 / k as f64
}

#[test]
fn every_unit_held_by_exactly_m_workers() -> Result<()> {
    for (s, name, units) in strategies() {
        assert_eq!(strategy(name)?.name, name, "a registered strategy is found by its name");
        for k in [1, 2, 3, 4, 8] {
            for m in 1..=k {
                let c = coverage_for(m, k);
                let sel = s.select(&units, k, c, &mut mask_rng(7))?;
                assert_eq!(sel.m, m, "{name}: K={k} C={c}");
                assert_eq!(sel.m, holders(c, k));
                assert_eq!(sel.workers(), k, "{name}");
                assert_eq!(sel.num_units(), units.len(), "{name}");
                assert_eq!(sel.holder_counts(), vec![m; units.len()], "{name}: K={k} m={m}");
                sel.check_uniform(units.len())?;
                // Uniform representation ⇒ Σ_k units held = m · #units.
                assert_eq!(sel.units_per_worker().iter().sum::<usize>(), m * units.len());
            }
        }
    }
    Ok(())
}

#[test]
fn same_seed_same_selection_different_seeds_differ() -> Result<()> {
    for (s, name, units) in strategies() {
        let a = s.select(&units, 4, 0.5, &mut mask_rng(1))?;
        let b = s.select(&units, 4, 0.5, &mut mask_rng(1))?;
        assert_eq!(a, b, "{name}: same seed gave different selections");
        // A fresh strategy object too (nothing cached between calls).
        assert_eq!(a, strategy(name)?.select(&units, 4, 0.5, &mut mask_rng(1))?, "{name}");
        let differing = (2..10).filter(|&seed| s.select(&units, 4, 0.5, &mut mask_rng(seed)).unwrap() != a).count();
        assert!(differing >= 4, "{name}: only {differing} of 8 other seeds changed the selection");
    }
    Ok(())
}

#[test]
fn full_coverage_holds_everything() -> Result<()> {
    for (s, name, units) in strategies() {
        for k in [1, 2, 3, 8] {
            let sel = s.select(&units, k, 1.0, &mut mask_rng(3))?;
            assert_eq!(sel.m, k);
            assert!(sel.holds.iter().all(|row| row.iter().all(|&h| h)), "{name}: K={k}");
            assert!(sel.param_fraction(&units, 1000).iter().all(|&f| f == 1.0), "{name}");
        }
    }
    Ok(())
}

#[test]
fn bad_arguments_are_errors() -> Result<()> {
    for (s, name, units) in strategies() {
        let e = s.select(&units, 0, 0.5, &mut mask_rng(0)).unwrap_err().to_string();
        assert!(e.contains("workers must be at least 1") && e.contains(name), "{name}: {e}");
        let e = s.select(&units, 4, 1.5, &mut mask_rng(0)).unwrap_err().to_string();
        assert!(e.contains("coverage must be in (0, 1], got 1.5"), "{name}: {e}");
        let e = s.select(&units, 4, f64::NAN, &mut mask_rng(0)).unwrap_err().to_string();
        assert!(e.contains("coverage must be in (0, 1]"), "{name}: {e}");
        // Units of the other kind.
        let other = match s.kind {
            UnitKind::Block => resnet18_neurons(8),
            UnitKind::Neuron => resnet18_blocks(),
        };
        let e = s.select(&other, 4, 0.5, &mut mask_rng(0)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{:?}", other[0].name)) && e.contains(&format!("selects {:?} units", s.kind)),
            "{name}: {e}"
        );
        // No units: an empty selection, not an error.
        let sel = s.select(&[], 4, 0.5, &mut mask_rng(0))?;
        assert_eq!(sel.holds, vec![Vec::<bool>::new(); 4]);
    }
    Ok(())
}

#[test]
fn unknown_strategy_lists_registered_names() {
    let e = strategy("blokc").expect_err("unknown name must be an error").to_string();
    assert!(e.contains("\"blokc\""), "{e}");
    for s in REGISTRY.all() {
        assert!(e.contains(s.name), "{e} does not list {}", s.name);
    }
    assert_eq!(strategy("block").unwrap().name, "block");
}

#[test]
fn block_balances_parameter_bytes() -> Result<()> {
    let s = strategy("block")?;
    let units = resnet18_blocks();
    let largest = units.iter().map(|u| u.params).max().unwrap();
    // Varied sizes as well: 30 units of pseudo-random sizes.
    let varied: Vec<Unit> = (0..30)
        .map(|i| Unit {
            kind: UnitKind::Block,
            block: i,
            index: 0,
            name: format!("b{i}"),
            params: (i * 7919) % 997 + 1,
            act_elems: (i * 31) % 101 + 1,
        })
        .collect();
    for (units, largest) in [(&units, largest), (&varied, 997)] {
        for k in [2, 3, 4, 8] {
            for m in 1..=k {
                for seed in 0..4 {
                    let sel = s.select(units, k, coverage_for(m, k), &mut mask_rng(seed))?;
                    let p = sel.params_per_worker(units);
                    let spread = p.iter().max().unwrap() - p.iter().min().unwrap();
                    assert!(spread <= largest, "K={k} m={m}: per-worker params {p:?} spread {spread} > {largest}");
                }
            }
        }
    }
    // The paper's 87.5 % setting: K = 8, C = 7/8, every worker drops exactly one ResNet-18 block.
    let sel = s.select(&units, 8, 0.875, &mut mask_rng(0))?;
    assert_eq!(sel.units_per_worker(), vec![7; 8]);
    Ok(())
}

#[test]
fn neuron_per_block_counts_are_floor_or_ceil() -> Result<()> {
    let s = strategy("neuron")?;
    let units = resnet18_neurons(16);
    let n_blocks = RESNET18.len();
    let total: usize = units.iter().map(|u| u.params).sum();
    for k in [1, 2, 3, 4, 8] {
        for m in 1..=k {
            let sel = s.select(&units, k, coverage_for(m, k), &mut mask_rng(11))?;
            for b in 0..n_blocks {
                let idx: Vec<usize> = (0..units.len()).filter(|&u| units[u].block == b).collect();
                let n = idx.len();
                let (lo, hi) = ((m * n) / k, (m * n).div_ceil(k));
                for w in 0..k {
                    let held = idx.iter().filter(|&&u| sel.holds[w][u]).count();
                    assert!(held == lo || held == hi, "K={k} m={m} block {b}: worker {w} holds {held} of {n}");
                    assert!(held >= 1, "K={k} m={m} block {b}: worker {w} holds no channel");
                }
            }
            // Overall bytes balanced: within 2 % of the mean (ceil units rotate across blocks).
            let p = sel.params_per_worker(&units);
            let mean = (m * total) as f64 / k as f64;
            for &x in &p {
                assert!((x as f64 - mean).abs() <= 0.02 * mean, "K={k} m={m}: {p:?} vs mean {mean}");
            }
        }
    }
    Ok(())
}

#[test]
fn neuron_errors_when_a_block_would_be_empty() {
    // Width 4: layer1 blocks have 4 channels; K = 8, m = 1 ⇒ m·n/K = 0.5 < 1.
    let units = resnet18_neurons(4);
    let e = strategy("neuron").unwrap().select(&units, 8, 0.125, &mut mask_rng(0)).unwrap_err().to_string();
    assert!(e.contains("block 0 (\"layer1.0\") has 4 internal units") && e.contains("m·n/K = 0.500 < 1"), "{e}");
    // m = 2 makes it exactly 1 each: fine.
    let sel = strategy("neuron").unwrap().select(&units, 8, 0.25, &mut mask_rng(0)).unwrap();
    assert!(sel.units_per_worker().iter().all(|&n| n >= RESNET18.len()));
}

#[test]
fn selection_is_usable_with_plain_chacha_seed() -> Result<()> {
    // Strategies take any ChaCha8Rng, not only a named stream.
    let sel: Selection =
        strategy("random_block")?.select(&resnet18_blocks(), 3, 0.34, &mut ChaCha8Rng::seed_from_u64(5))?;
    assert_eq!(sel.m, 1);
    Ok(())
}

/// Per-worker totals of `f` over the units each worker holds.
fn per_worker(sel: &Selection, units: &[Unit], f: impl Fn(&Unit) -> usize) -> Vec<usize> {
    sel.holds.iter().map(|row| units.iter().zip(row).filter(|(_, &h)| h).map(|(u, _)| f(u)).sum()).collect()
}

#[test]
fn block_act_balances_activations_where_block_balances_parameters() -> Result<()> {
    // The real ResNet-18 unit list (the model's own estimate of each branch's activations).
    let units = sdp::models::resnet::ResNetConfig::resnet18(10).units(UnitKind::Block);
    let largest = units.iter().map(|u| u.act_elems).max().unwrap();
    let (act, blk) = (strategy("block_act")?, strategy("block")?);
    for (k, m) in [(4, 2), (8, 4), (4, 3), (8, 6)] {
        for seed in 0..4 {
            let sel = act.select(&units, k, coverage_for(m, k), &mut mask_rng(seed))?;
            sel.check_uniform(units.len())?;
            let a = per_worker(&sel, &units, |u| u.act_elems);
            let (lo, hi) = (*a.iter().min().unwrap(), *a.iter().max().unwrap());
            assert!(hi - lo <= largest, "K={k} m={m}: activation spread {} > largest unit {largest}", hi - lo);
            // Against `block` on the same draw: the most loaded worker carries fewer activations.
            let by_params = blk.select(&units, k, coverage_for(m, k), &mut mask_rng(seed))?;
            let hi_params = *per_worker(&by_params, &units, |u| u.act_elems).iter().max().unwrap();
            assert!(hi <= hi_params, "K={k} m={m} seed {seed}: block_act max {hi} > block max {hi_params}");
        }
    }
    Ok(())
}

#[test]
fn cyclic_connects_the_workers_block_can_split() -> Result<()> {
    let units = resnet18_blocks();
    let bytes: Vec<usize> = units.iter().map(|u| u.params * 4).collect();
    let gap = |name: &str, k: usize, m: usize, seed: u64| -> Result<f64> {
        let sel = strategy(name)?.select(&units, k, coverage_for(m, k), &mut mask_rng(seed))?;
        Ok(sdp::metrics::spectral_gap(&sel, &bytes))
    };
    // The split this strategy exists for: byte-balanced `block` at K = 4, C = 0.5 leaves two halves.
    let split = (0..8).filter(|&seed| gap("block", 4, 2, seed).unwrap() == 0.0).count();
    assert!(split > 0, "block at K = 4, C = 0.5 was connected for every seed: the motivating case changed");
    for k in 3..=8 {
        for m in 2..k {
            for seed in 0..4 {
                let g = gap("cyclic", k, m, seed)?;
                assert!(g > 1e-9, "cyclic K={k} m={m} seed={seed}: spectral gap {g}");
            }
        }
    }
    // Balanced: at K = 4, m = 2 each worker holds one of the two largest blocks, so the spread of the
    // per-worker parameters stays within the largest block.
    let largest = units.iter().map(|u| u.params).max().unwrap();
    for seed in 0..8 {
        let sel = strategy("cyclic")?.select(&units, 4, 0.5, &mut mask_rng(seed))?;
        let p = sel.params_per_worker(&units);
        let spread = p.iter().max().unwrap() - p.iter().min().unwrap();
        assert!(spread <= largest, "seed {seed}: per-worker params {p:?}");
        let big: Vec<usize> = (0..4).map(|k| sel.held_by(k).into_iter().filter(|&u| u >= 6).count()).collect();
        assert_eq!(big, vec![1; 4], "seed {seed}: stage-4 blocks per worker");
    }
    Ok(())
}

/// A strategy defined outside the crate, as a user adds one: block `u` to workers r+u, r+u+1, …, r+u+m−1
/// (mod K) from a random start r, ignoring sizes (a ring like `cyclic`, without its balancing).
struct Strided;

impl MaskStrategy for Strided {
    fn assign(&self, units: &[Unit], workers: usize, m: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Vec<bool>>> {
        use rand::Rng;
        let r = rng.random_range(0..workers);
        let mut holds = vec![vec![false; units.len()]; workers];
        for u in 0..units.len() {
            for j in 0..m {
                holds[(r + u + j) % workers][u] = true;
            }
        }
        Ok(holds)
    }
}

fn register_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| sdp::masking::register("test_strided", UnitKind::Block, &Strided).expect("registering"));
}

#[test]
fn a_strategy_registered_from_outside_is_named_by_specs_and_names_are_not_taken_twice() -> Result<()> {
    register_once();
    let s = strategy("test_strided")?;
    let sel = s.select(&resnet18_blocks(), 4, 0.5, &mut mask_rng(0))?;
    sel.check_uniform(8)?;
    assert!(sdp::masking::register("block", UnitKind::Block, &Strided).is_err(), "a built-in name is taken");
    // A spec may name it (the plan resolves `method.masking` through the registry).
    let spec = "name = \"x\"\n[workload]\ndataset = \"shapes\"\nmodel = \"resnet18\"\nepochs = 1\nbatch_size = 8\n[method]\nkind = \"sdp\"\nworkers = 2\n\
                masking = \"test_strided\"\ncoverage = 0.5\n";
    let exp = sdp::plan::parse(spec, std::path::Path::new("x.toml"), &[])?;
    assert_eq!(exp.runs[0].spec.method.masking, "test_strided");
    Ok(())
}
