//! The input pipeline: a seeded per-epoch permutation, a disjoint shard per worker, batches of any split
//! ([`Examples`]: augmented images, token sequences, …) prefetched on a background thread.
//!
//! Sharding follows PyTorch's `DistributedSampler`: worker k takes `perm[k], perm[k+K], …`, and its step-s
//! batch is the s-th run of `b` indices of its shard. The union of the K step-s batches is therefore
//! `perm[s·K·b .. (s+1)·K·b]`, exactly the step-s batch of one worker with batch K·b.

use super::augment::AugmentCfg;
use super::examples::Examples;
pub use super::examples::{make_batch, Batch};
use super::ImageSet;
use crate::seed::{rng, Stream};
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The seeded permutation of `n` training samples for `epoch`.
pub fn permutation(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rng(seed, Stream::Data, epoch as u64, 0));
    perm
}

/// The augmentation key of `epoch`.
pub fn epoch_key(seed: u64, epoch: usize) -> u64 {
    rng(seed, Stream::Augment, epoch as u64, 0).random()
}

/// Optimizer steps per epoch when K workers each take `batch` samples per step (the last partial step
/// is dropped, as with `drop_last=True`).
pub fn steps_per_epoch(n: usize, workers: usize, batch: usize) -> Result<usize> {
    let steps = n / (workers * batch);
    if steps == 0 {
        bail!("{n} training samples are fewer than one step of {workers} workers × batch {batch}");
    }
    Ok(steps)
}

/// The indices worker `k` of `workers` uses at `step`.
pub fn worker_indices(perm: &[usize], workers: usize, batch: usize, k: usize, step: usize) -> Vec<usize> {
    (0..batch).map(|j| perm[k + workers * (step * batch + j)]).collect()
}

/// Which workers' batches a process builds: all `workers` in one process; in a run spread over `ranks`
/// processes, the workers `k ≡ rank (mod ranks)` it hosts (the others' entries are left empty: no process
/// augments a batch it does not train on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shards {
    pub workers: usize,
    pub batch: usize,
    pub rank: usize,
    pub ranks: usize,
}

impl Shards {
    /// Every worker, in this process.
    pub fn all(workers: usize, batch: usize) -> Self {
        Self { workers, batch, rank: 0, ranks: 1 }
    }

    /// Whether this process builds worker `k`'s batches.
    pub fn hosts(&self, k: usize) -> bool {
        k % self.ranks.max(1) == self.rank
    }
}

/// One epoch of training batches — a `Vec<Batch>` with one entry per worker for each step (empty for the
/// workers another process hosts) — produced on a background thread, two steps ahead.
pub struct TrainLoader {
    rx: Receiver<Vec<Batch>>,
    handle: Option<JoinHandle<()>>,
    pub steps: usize,
}

impl TrainLoader {
    /// Starts the loader of `epoch` at its step `first` (0; later for a run resumed mid-epoch: the same
    /// batches as the uninterrupted epoch's from that step on, since every draw is keyed by (seed, epoch,
    /// index)).
    pub fn start(
        set: Arc<dyn Examples>,
        cfg: AugmentCfg,
        seed: u64,
        epoch: usize,
        workers: usize,
        batch: usize,
        first: usize,
    ) -> Result<Self> {
        Self::start_for(set, cfg, seed, epoch, Shards::all(workers, batch), first)
    }

    /// [`TrainLoader::start`] building only the batches of the workers `shards` says this process hosts.
    pub fn start_for(
        set: Arc<dyn Examples>,
        cfg: AugmentCfg,
        seed: u64,
        epoch: usize,
        shards: Shards,
        first: usize,
    ) -> Result<Self> {
        let Shards { workers, batch, .. } = shards;
        let steps = steps_per_epoch(set.len(), workers, batch)?;
        if first > steps {
            bail!("cannot start epoch {epoch} at step {first}: it has {steps} steps");
        }
        let (tx, rx) = sync_channel(2);
        let handle = std::thread::Builder::new().name("sdp-loader".into()).spawn(move || {
            let perm = permutation(seed, epoch, set.len());
            let key = epoch_key(seed, epoch);
            for step in first..steps {
                let batches = (0..workers)
                    .map(|k| match shards.hosts(k) {
                        true => set.batch(&worker_indices(&perm, workers, batch, k, step), &cfg, Some(key)),
                        false => Batch::default(),
                    })
                    .collect();
                if tx.send(batches).is_err() {
                    return; // the consumer stopped early (interrupt or error)
                }
            }
        })?;
        Ok(Self { rx, handle: Some(handle), steps })
    }
}

impl Iterator for TrainLoader {
    type Item = Vec<Batch>;
    fn next(&mut self) -> Option<Vec<Batch>> {
        self.rx.recv().ok()
    }
}

impl Drop for TrainLoader {
    fn drop(&mut self) {
        // Unblock the producer by dropping the receiver first, then join it.
        let (_, dummy) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, dummy));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Un-augmented batches of `batch` examples over the whole of `set`, in order (evaluation).
pub fn eval_batches<'a>(set: &'a dyn Examples, cfg: &'a AugmentCfg, batch: usize) -> impl Iterator<Item = Batch> + 'a {
    (0..set.len()).step_by(batch.max(1)).map(move |start| {
        let idx: Vec<usize> = (start..(start + batch).min(set.len())).collect();
        set.batch(&idx, cfg, None)
    })
}

/// `n` random `h`×`w`×`c` images with random labels in `0..10`, drawn from the synthetic stream of `seed`
/// (input for throughput measurements; the pixel values do not affect the loader's cost).
pub fn random_images(seed: u64, n: usize, h: usize, w: usize, c: usize) -> Result<ImageSet> {
    let mut r = rng(seed, Stream::Synthetic, u64::MAX, 0);
    let mut images = vec![0u8; n * h * w * c];
    r.fill(&mut images[..]);
    let labels = (0..n).map(|_| r.random_range(0..10u32)).collect();
    ImageSet::new(images, labels, h, w, c)
}

/// Augmented images per second that [`TrainLoader`] delivers over `epochs` epochs of `set` with `workers`
/// workers of batch `batch`; the consumer only receives the batches (as a training loop would, minus the step).
pub fn bench(set: Arc<dyn Examples>, cfg: AugmentCfg, workers: usize, batch: usize, epochs: usize) -> Result<f64> {
    let start = std::time::Instant::now();
    let mut images = 0usize;
    for epoch in 1..=epochs {
        for batches in TrainLoader::start(set.clone(), cfg, 0, epoch, workers, batch, 0)? {
            images += batches.iter().map(Batch::len).sum::<usize>();
        }
    }
    Ok(images as f64 / start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_disjoint_and_cover_the_large_batch() {
        let perm = permutation(7, 3, 100);
        let (k, b) = (4, 5);
        for step in 0..steps_per_epoch(100, k, b).unwrap() {
            let mut union: Vec<usize> = (0..k).flat_map(|w| worker_indices(&perm, k, b, w, step)).collect();
            let mut big = worker_indices(&perm, 1, k * b, 0, step);
            union.sort();
            big.sort();
            assert_eq!(union, big);
            union.dedup();
            assert_eq!(union.len(), k * b);
        }
    }

    #[test]
    fn a_process_builds_only_the_batches_of_the_workers_it_hosts() -> Result<()> {
        let set: Arc<dyn Examples> = Arc::new(random_images(3, 48, 4, 4, 3)?);
        let cfg = AugmentCfg {
            crop_pad: 1,
            pad_mode: crate::spec::PadMode::Zero,
            flip: true,
            mean: [0.5; 3],
            std: [0.25; 3],
        };
        let all: Vec<Vec<Batch>> = TrainLoader::start(set.clone(), cfg, 7, 2, 3, 4, 0)?.collect();
        let shards = Shards { workers: 3, batch: 4, rank: 1, ranks: 2 };
        let mine: Vec<Vec<Batch>> = TrainLoader::start_for(set, cfg, 7, 2, shards, 0)?.collect();
        assert_eq!(mine.len(), all.len());
        for (a, m) in all.iter().zip(&mine) {
            assert_eq!(m.len(), 3);
            // Rank 1 of 2 hosts worker 1 only: the same batch as the one-process loader's, the others empty.
            assert!(m[0].is_empty() && m[2].is_empty());
            assert_eq!((format!("{:?}", m[1].x), &m[1].y), (format!("{:?}", a[1].x), &a[1].y));
        }
        Ok(())
    }

    #[test]
    fn too_small_dataset_is_an_error() {
        let e = steps_per_epoch(10, 4, 8).unwrap_err().to_string();
        assert!(e.contains("10 training samples are fewer than one step of 4 workers × batch 8"), "{e}");
    }
}
