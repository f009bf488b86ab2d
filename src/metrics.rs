//! Metrics of the method that do not need a model: communication accounting (docs/design.md §2, "Communication
//! bytes per step") and the spectral gap of the worker–unit averaging graph. Every function here is a pure
//! function of a [`Selection`] and byte counts, so the simulated and the NCCL runs report the same numbers.

use crate::masking::Selection;
use std::collections::BTreeMap;

/// Bytes each member sends (= receives) in a ring all-reduce of `bytes` among `members` ranks:
/// 2(m−1)/m × bytes (reduce-scatter then all-gather, each moving (m−1)/m of the buffer); 0 when m ≤ 1.
pub fn ring_allreduce_bytes(bytes: usize, members: usize) -> f64 {
    if members <= 1 {
        return 0.0;
    }
    2.0 * (members - 1) as f64 / members as f64 * bytes as f64
}

/// Per-worker bytes sent in one synchronization, under the two ways of averaging a masked model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CommBytes {
    /// Every parameter all-reduced among all K workers, non-holders contributing zeros (plus a holder count):
    /// ring_allreduce_bytes(shared + Σ_u bytes_u, K). What a plain DP all-reduce over a masked model costs.
    pub masked_allreduce: f64,
    /// Coordinates grouped by holder set H (the set of workers holding them); each group all-reduced only
    /// among its members (one communicator per holder set, docs/design.md §2). Worker k pays
    /// Σ_{H ∋ k} ring_allreduce_bytes(bytes_H, |H|). Shared parameters join the group of all K workers.
    /// Never more than `masked_allreduce`.
    pub grouped: f64,
}

/// Communication per worker per synchronization for `selection`, where unit u has `unit_bytes[u]` parameter
/// bytes and `shared_bytes` are held by every worker (see [`CommBytes`] for the two schemes).
///
/// # Panics
/// If `workers` differs from the selection's worker count or `unit_bytes` from its unit count (both are
/// programming errors: the caller built the selection from the same units).
pub fn comm_bytes_per_worker(
    selection: &Selection,
    unit_bytes: &[usize],
    shared_bytes: usize,
    workers: usize,
) -> Vec<CommBytes> {
    assert_eq!(selection.workers(), workers, "selection has {} workers, expected {workers}", selection.workers());
    assert!(
        workers == 0 || selection.num_units() == unit_bytes.len(),
        "selection has {} units but {} unit byte counts were given",
        selection.num_units(),
        unit_bytes.len()
    );
    let masked = ring_allreduce_bytes(shared_bytes + unit_bytes.iter().sum::<usize>(), workers);
    let mut groups: BTreeMap<Vec<bool>, usize> = BTreeMap::new();
    *groups.entry(vec![true; workers]).or_default() += shared_bytes;
    for (u, &b) in unit_bytes.iter().enumerate() {
        *groups.entry(selection.holder_set(u)).or_default() += b;
    }
    let mut grouped = vec![0.0; workers];
    for (set, bytes) in &groups {
        let cost = ring_allreduce_bytes(*bytes, set.iter().filter(|&&h| h).count());
        for (k, _) in set.iter().enumerate().filter(|(_, &h)| h) {
            grouped[k] += cost;
        }
    }
    grouped.into_iter().map(|g| CommBytes { masked_allreduce: masked, grouped: g }).collect()
}

/// The worker–unit averaging graph: the K×K matrix A with A_kl = Σ_u bytes_u · [k holds u] · [l holds u]
/// for k ≠ l (parameter bytes that workers k and l both hold, i.e. average together) and A_kk = 0.
/// Only the masked units count (see [`spectral_gap`]).
pub fn averaging_graph(selection: &Selection, unit_bytes: &[usize]) -> Vec<Vec<f64>> {
    let k = selection.workers();
    let mut a = vec![vec![0.0; k]; k];
    for (u, &b) in unit_bytes.iter().enumerate() {
        let holders: Vec<usize> = (0..k).filter(|&w| selection.holds[w][u]).collect();
        for &i in &holders {
            for &j in &holders {
                if i != j {
                    a[i][j] += b as f64;
                }
            }
        }
    }
    a
}

/// Spectral gap of the worker–unit averaging graph: how well one synchronization mixes parameters across
/// workers.
///
/// With A the averaging graph ([`averaging_graph`]: A_kl = bytes held by both k and l, k ≠ l), degrees
/// d_k = Σ_l A_kl and D = diag(d), the normalised Laplacian is
///
/// ```text
///     L = I − D^{-1/2} A D^{-1/2}          (L_kl = δ_kl − A_kl / sqrt(d_k d_l))
/// ```
///
/// whose eigenvalues satisfy 0 = λ_1 ≤ λ_2 ≤ … ≤ λ_K ≤ 2. The **spectral gap is λ_2**. It is 0 exactly when
/// the worker graph is disconnected (some group of workers never shares a parameter with the rest, so
/// averaging can never mix their parameters; e.g. m = 1, where no two workers share anything), and larger
/// means faster mixing; the complete graph with equal weights (C = 1) attains the maximum K/(K−1).
///
/// Only the **masked units** count: shared parameters (stem, head, shortcuts) are held by every worker and
/// would add the same weight to every pair, making every graph complete and hiding the structure the
/// masking creates. (To include them, add `shared_bytes` to every off-diagonal entry of the averaging graph
/// and call [`normalized_laplacian_gap`].) For K ≤ 1 the gap is undefined and reported as 0.
pub fn spectral_gap(selection: &Selection, unit_bytes: &[usize]) -> f64 {
    normalized_laplacian_gap(&averaging_graph(selection, unit_bytes))
}

/// λ_2 of the normalised Laplacian of the weighted undirected graph with symmetric, non-negative adjacency
/// matrix `adj` (diagonal ignored); 0 for a disconnected graph or fewer than two vertices.
pub fn normalized_laplacian_gap(adj: &[Vec<f64>]) -> f64 {
    let n = adj.len();
    if n < 2 || !connected(adj) {
        return 0.0;
    }
    // Connected with n ≥ 2, so every degree is positive.
    let d: Vec<f64> = (0..n).map(|i| (0..n).filter(|&j| j != i).map(|j| adj[i][j]).sum()).collect();
    let l: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 1.0 } else { -adj[i][j] / (d[i] * d[j]).sqrt() }).collect())
        .collect();
    symmetric_eigenvalues(&l)[1].max(0.0)
}

/// Whether the graph (edges where adj > 0, off the diagonal) is connected.
fn connected(adj: &[Vec<f64>]) -> bool {
    let n = adj.len();
    let mut seen = vec![false; n];
    let mut stack = vec![0];
    seen[0] = true;
    while let Some(i) = stack.pop() {
        for j in 0..n {
            if j != i && !seen[j] && adj[i][j] > 0.0 {
                seen[j] = true;
                stack.push(j);
            }
        }
    }
    seen.into_iter().all(|s| s)
}

/// Eigenvalues of a real symmetric matrix, ascending, by the cyclic Jacobi method (sweeps of plane
/// rotations that zero each off-diagonal entry in turn until the off-diagonal mass vanishes). O(n³) per
/// sweep and ~10 sweeps: meant for the K ≤ 64 worker graphs here, not for large matrices.
pub fn symmetric_eigenvalues(m: &[Vec<f64>]) -> Vec<f64> {
    let n = m.len();
    let mut a: Vec<Vec<f64>> = m.to_vec();
    let norm2: f64 = a.iter().flatten().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off <= 1e-30 * norm2.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q] == 0.0 {
                    continue;
                }
                // Rotation by φ with tan φ = t, the smaller root of t² + 2θt − 1 = 0, which zeroes a_pq.
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = c * akp - s * akq;
                    row[q] = s * akp + c * akq;
                }
                let (lo, hi) = a.split_at_mut(q); // p < q: rows p and q borrowed apart
                for (apk, aqk) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    (*apk, *aqk) = (c * *apk - s * *aqk, s * *apk + c * *aqk);
                }
            }
        }
    }
    let mut ev: Vec<f64> = (0..n).map(|i| a[i][i]).collect();
    ev.sort_by(f64::total_cmp);
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * (1.0 + b.abs())
    }

    /// Adjacency of an undirected graph on `n` vertices with unit-weight `edges`.
    fn graph(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<f64>> {
        let mut a = vec![vec![0.0; n]; n];
        for &(i, j) in edges {
            a[i][j] = 1.0;
            a[j][i] = 1.0;
        }
        a
    }

    fn complete(n: usize) -> Vec<Vec<f64>> {
        let edges: Vec<_> = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).collect();
        graph(n, &edges)
    }

    /// A selection from one string per worker, `1` where it holds the unit at that position.
    fn sel(rows: &[&str], m: usize) -> Selection {
        Selection { holds: rows.iter().map(|r| r.chars().map(|c| c == '1').collect()).collect(), m }
    }

    #[test]
    fn ring_formula() {
        assert_eq!(ring_allreduce_bytes(1000, 0), 0.0);
        assert_eq!(ring_allreduce_bytes(1000, 1), 0.0);
        assert_eq!(ring_allreduce_bytes(1000, 2), 1000.0);
        assert_eq!(ring_allreduce_bytes(1000, 4), 1500.0);
        assert_eq!(ring_allreduce_bytes(800, 8), 1400.0);
    }

    #[test]
    fn jacobi_matches_known_spectra() {
        let ev = symmetric_eigenvalues(&[vec![2.0, 1.0], vec![1.0, 2.0]]);
        assert!(close(ev[0], 1.0) && close(ev[1], 3.0), "{ev:?}");
        // Combinatorial Laplacian of the 5-cycle: 2 − 2cos(2πj/5).
        let n = 5;
        let mut l = vec![vec![0.0; n]; n];
        for i in 0..n {
            l[i][i] = 2.0;
            l[i][(i + 1) % n] = -1.0;
            l[(i + 1) % n][i] = -1.0;
        }
        let mut want: Vec<f64> =
            (0..n).map(|j| 2.0 - 2.0 * (2.0 * std::f64::consts::PI * j as f64 / n as f64).cos()).collect();
        want.sort_by(f64::total_cmp);
        let ev = symmetric_eigenvalues(&l);
        for (a, b) in ev.iter().zip(&want) {
            assert!(close(*a, *b), "{ev:?} vs {want:?}");
        }
        assert!(symmetric_eigenvalues(&[]).is_empty());
    }

    #[test]
    fn spectral_gap_known_graphs() {
        // Complete graph K_n: normalised Laplacian eigenvalues 0 and n/(n−1) (multiplicity n−1).
        for n in [2, 3, 4, 8, 64] {
            let gap = normalized_laplacian_gap(&complete(n));
            assert!(close(gap, n as f64 / (n - 1) as f64), "K_{n}: {gap}");
        }
        // Path P_3: normalised Laplacian eigenvalues 0, 1, 2.
        assert!(close(normalized_laplacian_gap(&graph(3, &[(0, 1), (1, 2)])), 1.0));
        // Path P_n: λ_2 = 1 − cos(π/(n−1)).
        let p6 = graph(6, &[(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]);
        assert!(close(normalized_laplacian_gap(&p6), 1.0 - (std::f64::consts::PI / 5.0).cos()));
        // Two disconnected triangles → 0; an isolated vertex → 0; a single vertex → 0.
        let two = graph(6, &[(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5)]);
        assert_eq!(normalized_laplacian_gap(&two), 0.0);
        assert_eq!(normalized_laplacian_gap(&graph(3, &[(0, 1)])), 0.0);
        assert_eq!(normalized_laplacian_gap(&complete(1)), 0.0);
        // Two triangles joined by one weak edge: connected, small but positive gap.
        let mut bridged = two.clone();
        bridged[2][3] = 0.01;
        bridged[3][2] = 0.01;
        let g = normalized_laplacian_gap(&bridged);
        assert!(g > 0.0 && g < 0.05, "{g}");
    }

    #[test]
    fn spectral_gap_of_selections() {
        // m = 1: nobody shares anything → 0. Full coverage with equal units → complete graph, K/(K−1).
        let disjoint = sel(&["10", "01"], 1);
        assert_eq!(spectral_gap(&disjoint, &[10, 10]), 0.0);
        let full = Selection { holds: vec![vec![true; 3]; 4], m: 4 };
        assert!(close(spectral_gap(&full, &[5, 7, 9]), 4.0 / 3.0));
        // K = 4, m = 2, units {0,1} and {2,3} (two disconnected pairs) → 0; adding unit {1,2} connects them.
        let pairs = sel(&["10", "10", "01", "01"], 2);
        assert_eq!(spectral_gap(&pairs, &[4, 4]), 0.0);
        let chain = sel(&["100", "101", "011", "010"], 2);
        let a = averaging_graph(&chain, &[4, 4, 4]);
        assert_eq!(a[1][2], 4.0);
        assert_eq!(a[0][3], 0.0);
        // That chain is the path P_4: λ_2 = 1 − cos(π/3) = 0.5.
        assert!(close(spectral_gap(&chain, &[4, 4, 4]), 0.5));
    }

    #[test]
    fn comm_grouped_never_exceeds_masked() {
        // K = 4, m = 2: unit 0 on {0,1}, unit 1 on {2,3}, unit 2 on {0,1} (same holder set as unit 0).
        let sel = sel(&["101", "101", "010", "010"], 2);
        let c = comm_bytes_per_worker(&sel, &[100, 200, 300], 1000, 4);
        assert_eq!(c.len(), 4);
        for w in &c {
            assert_eq!(w.masked_allreduce, 1.5 * 1600.0);
            assert!(w.grouped <= w.masked_allreduce);
        }
        // Shared: 1.5 × 1000 = 1500 each; group {0,1}: 400 bytes × 2·1/2 = 400; group {2,3}: 200.
        assert_eq!(c[0].grouped, 1900.0);
        assert_eq!(c[1].grouped, 1900.0);
        assert_eq!(c[2].grouped, 1700.0);
        // Full coverage: grouping changes nothing.
        let full = Selection { holds: vec![vec![true; 3]; 4], m: 4 };
        for w in comm_bytes_per_worker(&full, &[100, 200, 300], 1000, 4) {
            assert_eq!(w.grouped, w.masked_allreduce);
        }
        // One worker: nothing to communicate.
        let one = Selection { holds: vec![vec![true; 3]], m: 1 };
        assert_eq!(
            comm_bytes_per_worker(&one, &[1, 2, 3], 4, 1),
            vec![CommBytes { masked_allreduce: 0.0, grouped: 0.0 }]
        );
    }
}
