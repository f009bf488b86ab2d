//! The input pipeline: a seeded per-epoch permutation, a disjoint shard per worker, augmented batches
//! prefetched on a background thread.
//!
//! Sharding follows PyTorch's `DistributedSampler`: worker k takes `perm[k], perm[k+K], …`, and its step-s
//! batch is the s-th run of `b` indices of its shard. The union of the K step-s batches is therefore
//! `perm[s·K·b .. (s+1)·K·b]`, exactly the step-s batch of one worker with batch K·b.

use super::augment::{draw, write_image, AugmentCfg};
use super::ImageSet;
use crate::seed::{rng, Stream};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A batch of normalised CHW images and their labels, on the host.
#[derive(Clone, Debug)]
pub struct Batch {
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// (images (B, C, H, W) f32, labels (B,) u32) on `device`.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let x = Tensor::from_slice(&self.x, (self.len(), self.c, self.h, self.w), device)?;
        let y = Tensor::from_slice(&self.y, self.len(), device)?;
        Ok((x, y))
    }
}

/// Builds the batch of `indices` from `set`; `epoch_key` = `None` disables augmentation (evaluation).
pub fn make_batch(set: &ImageSet, indices: &[usize], cfg: &AugmentCfg, epoch_key: Option<u64>) -> Batch {
    let per = set.c * set.h * set.w;
    let mut x = vec![0f32; indices.len() * per];
    x.par_chunks_mut(per).zip(indices.par_iter()).for_each(|(out, &i)| {
        write_image(set, i, cfg, epoch_key.map(|k| draw(k, i)), out);
    });
    let y = indices.iter().map(|&i| set.labels[i]).collect();
    Batch { x, y, c: set.c, h: set.h, w: set.w }
}

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

/// One epoch of training batches — a `Vec<Batch>` with one batch per worker for each step — produced on a
/// background thread, two steps ahead.
pub struct TrainLoader {
    rx: Receiver<Vec<Batch>>,
    handle: Option<JoinHandle<()>>,
    pub steps: usize,
}

impl TrainLoader {
    pub fn start(
        set: Arc<ImageSet>,
        cfg: AugmentCfg,
        seed: u64,
        epoch: usize,
        workers: usize,
        batch: usize,
    ) -> Result<Self> {
        let steps = steps_per_epoch(set.len(), workers, batch)?;
        let (tx, rx) = sync_channel(2);
        let handle = std::thread::Builder::new().name("sdp-loader".into()).spawn(move || {
            let perm = permutation(seed, epoch, set.len());
            let key = epoch_key(seed, epoch);
            for step in 0..steps {
                let batches = (0..workers)
                    .map(|k| make_batch(&set, &worker_indices(&perm, workers, batch, k, step), &cfg, Some(key)))
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

/// Un-augmented batches of `batch` images over the whole of `set`, in order (evaluation).
pub fn eval_batches<'a>(set: &'a ImageSet, cfg: &'a AugmentCfg, batch: usize) -> impl Iterator<Item = Batch> + 'a {
    (0..set.len()).step_by(batch.max(1)).map(move |start| {
        let idx: Vec<usize> = (start..(start + batch).min(set.len())).collect();
        make_batch(set, &idx, cfg, None)
    })
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
    fn too_small_dataset_is_an_error() {
        let e = steps_per_epoch(10, 4, 8).unwrap_err().to_string();
        assert!(e.contains("10 training samples are fewer than one step of 4 workers × batch 8"), "{e}");
    }
}
