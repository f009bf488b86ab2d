//! One split of a dataset as training and evaluation read it: a number of examples, the shape of one
//! example's input, and the batch of any of them. The loader (sharding, prefetching), every training
//! method, every evaluation mode and BatchNorm recalibration read splits through [`Examples`] and nothing
//! image-specific; images ([`ImageSet`]: augmented, normalised CHW floats and one label each) are one kind.
//! A split of another kind (token sequences: `u32` ids, one target per position) implements
//! [`Examples`] in its own file and a dataset source returns it; `tests/custom_workload.rs` trains one.

use super::augment::{draw, write_image_with, AugmentCfg, Normalizer};
use super::ImageSet;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// One split's examples.
pub trait Examples: Send + Sync {
    /// How many examples the split holds.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The shape of one example's input (images: `[c, h, w]`; token sequences: `[t]`), which the
    /// activation estimates of the accounting take.
    fn input_shape(&self) -> Vec<usize>;
    /// The batch of examples `indices`, in that order. `cfg` is the run's `workload.augment` (with the
    /// dataset's normalisation constants); `epoch_key` is the epoch's augmentation key for a training
    /// batch and `None` for evaluation. Each example's draws depend only on (key, index), so which worker
    /// builds a batch changes nothing.
    fn batch(&self, indices: &[usize], cfg: &AugmentCfg, epoch_key: Option<u64>) -> Batch;
    /// A subset of `n` examples drawn from `seed`'s data stream (`workload.train_samples`); all of them
    /// when `n >= len`.
    fn subset(&self, n: usize, seed: u64) -> std::sync::Arc<dyn Examples>;
    /// The images, for what only applies to images (`sdp data info`'s image size and class counts).
    fn images(&self) -> Option<&ImageSet> {
        None
    }
}

/// A batch on the host: inputs and targets with their shapes (the batch size first).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub x: Input,
    pub x_dims: Vec<usize>,
    /// One target per example (a class label) or per position (a next token).
    pub y: Vec<u32>,
    pub y_dims: Vec<usize>,
}

/// The values of a batch's inputs: floats (normalised pixels) or ids (tokens).
#[derive(Clone, Debug)]
pub enum Input {
    F32(Vec<f32>),
    U32(Vec<u32>),
}

impl Default for Input {
    fn default() -> Self {
        Input::F32(Vec::new())
    }
}

impl Batch {
    /// Examples in the batch.
    pub fn len(&self) -> usize {
        self.x_dims.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (inputs, targets) as tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let x = match &self.x {
            Input::F32(v) => Tensor::from_slice(v, self.x_dims.as_slice(), device)?,
            Input::U32(v) => Tensor::from_slice(v, self.x_dims.as_slice(), device)?,
        };
        let y = Tensor::from_slice(&self.y, self.y_dims.as_slice(), device)?;
        Ok((x, y))
    }
}

impl Examples for ImageSet {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn input_shape(&self) -> Vec<usize> {
        vec![self.c, self.h, self.w]
    }

    fn batch(&self, indices: &[usize], cfg: &AugmentCfg, epoch_key: Option<u64>) -> Batch {
        make_batch(self, indices, cfg, epoch_key)
    }

    fn subset(&self, n: usize, seed: u64) -> std::sync::Arc<dyn Examples> {
        std::sync::Arc::new(ImageSet::subset(self, n, seed))
    }

    fn images(&self) -> Option<&ImageSet> {
        Some(self)
    }
}

/// The batch of images `indices` of `set`: augmented with the draws of `epoch_key` (`None`: not
/// augmented), normalised, CHW f32, with their labels.
pub fn make_batch(set: &ImageSet, indices: &[usize], cfg: &AugmentCfg, epoch_key: Option<u64>) -> Batch {
    let per = set.c * set.h * set.w;
    let norm = Normalizer::new(cfg, set.c);
    let mut x = vec![0f32; indices.len() * per];
    // An image takes a few microseconds: hand rayon runs of 16 so that scheduling does not dominate.
    x.par_chunks_mut(per).zip(indices.par_iter()).with_min_len(16).for_each(|(out, &i)| {
        write_image_with(set, i, cfg, &norm, epoch_key.map(|k| draw(k, i)), out);
    });
    let y: Vec<u32> = indices.iter().map(|&i| set.labels[i]).collect();
    Batch { x: Input::F32(x), x_dims: vec![indices.len(), set.c, set.h, set.w], y_dims: vec![y.len()], y }
}
