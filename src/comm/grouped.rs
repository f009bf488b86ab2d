//! The averager of a process that hosts some of the K workers: coordinates grouped by holder set into flat
//! host buffers, one all-reduce per group per synchronisation.
//!
//! Worker k lives on rank k mod N (N processes). A coordinate's *group* is the set of ranks whose workers
//! hold it. Per selection every process derives, from all K workers' index maps (the shared seeded
//! selection), each coordinate's holder count and group. Per synchronisation each process sums its own
//! workers' values into a host buffer per tensor, then for each group it belongs to (in one global order)
//! packs the group's coordinates of every tensor into one flat buffer and all-reduces it among the group's
//! ranks only, and divides by the holder count. A coordinate held by the workers of one rank alone is never
//! sent. With [`Layout::Masked`] every held coordinate is instead all-reduced among all ranks in one buffer
//! (zeros where this rank holds nothing): the DP-sized exchange, kept to measure against, and what the
//! backward regime needs (its workers refresh every coordinate of their full models at every sync).

use super::{all_ranks, Averager, Collective, IndexMap, SyncTensor};
use crate::metrics::ring_allreduce_bytes;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::rc::Rc;

/// How coordinates are grouped into all-reduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One buffer per set of ranks holding coordinates: each rank sends only what it holds and shares.
    Grouped,
    /// One buffer over all ranks with every held coordinate (a masked full all-reduce).
    Masked,
}

/// One tensor's plan on this rank.
struct TensorPlan {
    shape: Vec<usize>,
    /// Global flat index of every coordinate a worker of this rank holds, and 1 / its holder count.
    here: Vec<(u32, f32)>,
    /// Coordinates this rank supplies when the global model is assembled: held here with this rank the
    /// lowest of the group, or held by nobody and this rank is 0.
    owned: Vec<u32>,
}

/// The averager of one process among N over a [`Collective`].
pub struct GroupedAverager {
    comm: Rc<dyn Collective>,
    layout: Layout,
    workers: usize,
    /// The global flat index of every local element of each worker hosted here, per tensor (empty for the
    /// workers of other ranks).
    flat: Vec<BTreeMap<String, Vec<u32>>>,
    tensors: BTreeMap<String, TensorPlan>,
    /// Per group (rank bitmask, ascending), per tensor name, the flat indices in that group (ascending).
    groups: BTreeMap<u64, BTreeMap<String, Vec<u32>>>,
    /// Wire bytes so far (see [`Averager::bytes_sent`]).
    sent: f64,
}

impl GroupedAverager {
    /// An averager for `workers` workers over `comm`'s processes (worker k on rank k mod N).
    pub fn new(comm: Rc<dyn Collective>, workers: usize, layout: Layout) -> Result<Self> {
        let n = comm.size();
        anyhow::ensure!(n <= 64, "{n} processes: at most 64 are supported");
        anyhow::ensure!(
            workers.is_multiple_of(n),
            "{workers} workers over {n} processes: the process count must divide the worker count"
        );
        Ok(Self {
            comm,
            layout,
            workers,
            flat: Vec::new(),
            tensors: BTreeMap::new(),
            groups: BTreeMap::new(),
            sent: 0.0,
        })
    }

    /// Whether worker `k` lives in this process.
    pub fn hosts(&self, k: usize) -> bool {
        k % self.comm.size() == self.comm.rank()
    }
}

impl Averager for GroupedAverager {
    fn set_selection(&mut self, maps: &[BTreeMap<String, IndexMap>]) -> Result<()> {
        anyhow::ensure!(maps.len() == self.workers, "{} workers' maps for {} workers", maps.len(), self.workers);
        let (n, rank) = (self.comm.size(), self.comm.rank());
        let flat_of = |m: &BTreeMap<String, IndexMap>| -> BTreeMap<String, Vec<u32>> {
            m.iter()
                .map(|(name, map)| (name.clone(), map.global_flat_indices().into_iter().map(|i| i as u32).collect()))
                .collect()
        };
        let every: Vec<BTreeMap<String, Vec<u32>>> = maps.iter().map(flat_of).collect();
        let mut shapes: BTreeMap<&str, &[usize]> = BTreeMap::new();
        for m in maps {
            for (name, map) in m {
                shapes.insert(name, &map.global_shape);
            }
        }
        self.tensors.clear();
        self.groups.clear();
        let mut every_group = std::collections::BTreeSet::new();
        for (name, shape) in shapes {
            let numel: usize = shape.iter().product();
            let (mut count, mut ranks) = (vec![0u32; numel], vec![0u64; numel]);
            for (k, m) in every.iter().enumerate() {
                if let Some(flat) = m.get(name) {
                    for &i in flat {
                        count[i as usize] += 1;
                        ranks[i as usize] |= 1 << (k % n);
                    }
                }
            }
            let me = 1u64 << rank;
            let mut plan = TensorPlan { shape: shape.to_vec(), here: Vec::new(), owned: Vec::new() };
            for i in 0..numel {
                let group = match self.layout {
                    Layout::Grouped => ranks[i],
                    Layout::Masked if count[i] > 0 => all_ranks(n),
                    Layout::Masked => 0,
                };
                // Every rank gets the sum of the coordinates its groups reduce (masked: every held one).
                if group & me != 0 {
                    plan.here.push((i as u32, 1.0 / count[i] as f32));
                }
                let owner = if count[i] == 0 { 0 } else { ranks[i].trailing_zeros() as usize };
                if owner == rank {
                    plan.owned.push(i as u32);
                }
                if group.count_ones() > 1 {
                    every_group.insert(group);
                }
                if group & me != 0 && group.count_ones() > 1 {
                    self.groups.entry(group).or_default().entry(name.to_string()).or_default().push(i as u32);
                }
            }
            self.tensors.insert(name.to_string(), plan);
        }
        self.flat =
            every.into_iter().enumerate().map(|(k, f)| if self.hosts(k) { f } else { BTreeMap::new() }).collect();
        // Every process makes every group's communicator (a collective call), in one order.
        let all: Vec<u64> = every_group.into_iter().collect();
        self.comm.prepare(&all)
    }

    fn average(&mut self, sync: &[SyncTensor]) -> Result<Vec<Tensor>> {
        // This process's workers' sums, per tensor, on the host.
        let mut sums: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
        for t in sync {
            // A tensor no worker holds keeps its value.
            let Some(plan) = self.tensors.get(t.name) else { continue };
            let mut sum = vec![0f32; plan.shape.iter().product()];
            for (k, local) in &t.contributions {
                let flat = self.flat[*k].get(t.name).with_context(|| format!("worker {k} holds no {} here", t.name))?;
                let v: Vec<f32> = local.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                anyhow::ensure!(
                    v.len() == flat.len(),
                    "worker {k}'s {} has {} values, not {}",
                    t.name,
                    v.len(),
                    flat.len()
                );
                for (&i, x) in flat.iter().zip(v) {
                    sum[i as usize] += x;
                }
            }
            sums.insert(t.name, sum);
        }
        // One all-reduce per group, over the coordinates of every tensor of this sync.
        for (&group, per_tensor) in &self.groups {
            let parts: Vec<(&str, &Vec<u32>)> = per_tensor
                .iter()
                .filter(|(n, _)| sums.contains_key(n.as_str()))
                .map(|(n, ix)| (n.as_str(), ix))
                .collect();
            let mut buf: Vec<f32> = Vec::with_capacity(parts.iter().map(|(_, ix)| ix.len()).sum());
            for (name, ix) in &parts {
                let s = &sums[name];
                buf.extend(ix.iter().map(|&i| s[i as usize]));
            }
            self.comm.all_reduce_sum(group, &mut buf).with_context(|| format!("all-reduce among ranks {group:#b}"))?;
            self.sent += ring_allreduce_bytes(4 * buf.len(), group.count_ones() as usize);
            let mut at = 0;
            for (name, ix) in parts {
                let s = sums.get_mut(name).expect("present");
                for &i in ix {
                    s[i as usize] = buf[at];
                    at += 1;
                }
            }
        }
        sync.iter()
            .map(|t| {
                let (Some(plan), Some(sum)) = (self.tensors.get(t.name), sums.get(t.name)) else {
                    return Ok(t.global.clone());
                };
                let mut out: Vec<f32> = t.global.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                for &(i, inv) in &plan.here {
                    out[i as usize] = sum[i as usize] * inv;
                }
                Ok(Tensor::from_vec(out, plan.shape.as_slice(), t.global.device())?.to_dtype(t.global.dtype())?)
            })
            .collect()
    }

    fn complete(&self) -> bool {
        self.comm.size() == 1 || self.layout == Layout::Masked
    }

    fn assemble(&mut self, tensors: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        if self.complete() {
            return Ok(tensors.iter().map(|(_, t)| t.clone()).collect());
        }
        let mut buf = Vec::new();
        let mut values = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut mine = vec![0f32; v.len()];
            if let Some(plan) = self.tensors.get(*name) {
                for &i in &plan.owned {
                    mine[i as usize] = v[i as usize];
                }
            } else if self.comm.rank() == 0 {
                // Held by no worker: identical everywhere; rank 0 supplies it.
                mine.copy_from_slice(&v);
            }
            values.push(v.len());
            buf.extend(mine);
        }
        let world = all_ranks(self.comm.size());
        self.comm.prepare(&[world])?;
        self.comm.all_reduce_sum(world, &mut buf).context("assembling the global model")?;
        self.sent += ring_allreduce_bytes(4 * buf.len(), self.comm.size());
        let mut at = 0;
        tensors
            .iter()
            .zip(values)
            .map(|((_, t), len)| {
                let part = buf[at..at + len].to_vec();
                at += len;
                Ok(Tensor::from_vec(part, t.shape(), t.device())?.to_dtype(t.dtype())?)
            })
            .collect()
    }

    fn bytes_sent(&self) -> f64 {
        self.sent
    }
}
