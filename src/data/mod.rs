//! Datasets, and the loader that turns them into batches.
//!
//! Training reads a [`Dataset`]: two splits of [`examples::Examples`]. Every built-in image dataset, whatever
//! its source format, is decoded once into an [`ImageSet`] per split ([`ImageData`]): images stored
//! N×H×W×C (HWC, u8, the layout every reader and the augmenter share) plus one label per image. Text is
//! read from token shards ([`tokens`]: windows of token ids, read from the files as batches need them).
//! Which datasets exist, and how a spec names them, is the [`source`] registry.

pub mod augment;
pub mod cache;
pub mod cifar;
pub mod examples;
pub mod fetch;
pub mod folder;
pub mod loader;
pub mod registry;
pub mod remote;
pub mod source;
pub mod svhn;
pub mod synthetic;
pub mod tokenize;
pub mod tokens;

use crate::spec::Workload;
use anyhow::{bail, Result};
use examples::Examples;
use std::path::Path;
use std::sync::Arc;

/// One split of a dataset: `n` images of `h`×`w`×`c` u8 pixels (HWC), and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSet {
    pub images: Vec<u8>,
    pub labels: Vec<u32>,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl ImageSet {
    pub fn new(images: Vec<u8>, labels: Vec<u32>, h: usize, w: usize, c: usize) -> Result<Self> {
        if images.len() != labels.len() * h * w * c {
            bail!(
                "image buffer holds {} bytes but {} labels of {h}x{w}x{c} images need {}",
                images.len(),
                labels.len(),
                labels.len() * h * w * c
            );
        }
        Ok(Self { images, labels, h, w, c })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image_bytes(&self) -> usize {
        self.h * self.w * self.c
    }

    /// The HWC bytes of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_bytes();
        &self.images[i * n..(i + 1) * n]
    }

    /// A class-stratified subset of `n` images (all of them when `n >= len`), drawn from `seed`'s data
    /// stream: each class's images are shuffled, then classes are taken round-robin, so the subset keeps
    /// the class balance even when the source is stored class by class (ImageFolder). Kept images stay
    /// in their original order.
    pub fn subset(&self, n: usize, seed: u64) -> Self {
        if n >= self.len() {
            return self.clone();
        }
        let classes = self.labels.iter().max().map_or(0, |&m| m as usize + 1);
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
        for (i, &l) in self.labels.iter().enumerate() {
            by_class[l as usize].push(i);
        }
        let mut r = crate::seed::rng(seed, crate::seed::Stream::Data, u64::MAX, 0);
        for c in &mut by_class {
            rand::seq::SliceRandom::shuffle(c.as_mut_slice(), &mut r);
        }
        let mut keep = Vec::with_capacity(n);
        let mut round = 0;
        while keep.len() < n {
            for c in &by_class {
                if let Some(&i) = c.get(round) {
                    if keep.len() < n {
                        keep.push(i);
                    }
                }
            }
            round += 1;
        }
        keep.sort_unstable();
        let per = self.image_bytes();
        let mut images = Vec::with_capacity(n * per);
        for &i in &keep {
            images.extend_from_slice(self.image(i));
        }
        let labels = keep.iter().map(|&i| self.labels[i]).collect();
        Self { images, labels, ..*self }
    }

    /// Number of images per class, indexed by label.
    pub fn class_counts(&self, classes: usize) -> Vec<usize> {
        let mut counts = vec![0; classes];
        for &l in &self.labels {
            if (l as usize) < classes {
                counts[l as usize] += 1;
            }
        }
        counts
    }
}

/// A dataset of images as the image sources decode it: train and test image sets, class names, and
/// per-channel normalisation constants.
#[derive(Clone, Debug)]
pub struct ImageData {
    /// Name as written in specs (`shapes`, `cifar10`, `folder:<path>` …).
    pub name: String,
    pub train: ImageSet,
    pub test: ImageSet,
    pub classes: Vec<String>,
    /// Per-channel mean and std of the training images, in [0,1] pixel units.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageData {
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}

/// A dataset as training and evaluation read it: its two splits (images, or examples of any other kind:
/// [`examples::Examples`]), its classes (a token workload: its vocabulary), and the normalisation
/// constants of image inputs (unused by other kinds).
#[derive(Clone)]
pub struct Dataset {
    /// Name as written in specs (`shapes`, `cifar10`, `folder:<path>` …).
    pub name: String,
    pub train: Arc<dyn Examples>,
    pub test: Arc<dyn Examples>,
    pub classes: Vec<String>,
    /// Per-channel mean and std of the training images, in [0,1] pixel units.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Dataset {
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dataset({}: {} train, {} test examples)", self.name, self.train.len(), self.test.len())
    }
}

impl From<ImageData> for Dataset {
    fn from(d: ImageData) -> Self {
        Dataset {
            name: d.name,
            train: Arc::new(d.train),
            test: Arc::new(d.test),
            classes: d.classes,
            mean: d.mean,
            std: d.std,
        }
    }
}

/// Per-channel mean and std of u8 HWC images, in [0,1] units (used for datasets without published constants).
pub fn channel_stats(set: &ImageSet) -> ([f32; 3], [f32; 3]) {
    let mut sum = [0f64; 3];
    let mut sq = [0f64; 3];
    let c = set.c.min(3);
    for px in set.images.chunks_exact(set.c) {
        for ch in 0..c {
            let v = px[ch] as f64 / 255.0;
            sum[ch] += v;
            sq[ch] += v * v;
        }
    }
    let n = (set.images.len() / set.c).max(1) as f64;
    let mut mean = [0f32; 3];
    let mut std = [1f32; 3];
    for ch in 0..c {
        let m = sum[ch] / n;
        mean[ch] = m as f32;
        std[ch] = ((sq[ch] / n - m * m).max(1e-12)).sqrt() as f32;
    }
    (mean, std)
}

/// Loads the dataset a workload names (through the [`registry`]), truncated to `train_samples` /
/// `test_samples`.
pub fn load(w: &Workload, data_dir: &Path) -> Result<Dataset> {
    registry::DataRef::parse(&w.dataset)?.load(w, data_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_keeps_classes_balanced_for_class_ordered_sources() -> Result<()> {
        // 3 classes stored class by class, 10 images each, 1×1×1 pixels holding the image index.
        let labels: Vec<u32> = (0..30).map(|i| i / 10).collect();
        let set = ImageSet::new((0..30u8).collect(), labels, 1, 1, 1)?;
        let sub = set.clone().subset(9, 0);
        assert_eq!(sub.class_counts(3), vec![3, 3, 3]);
        // Pixels still belong to their labels, and the subset depends on the seed.
        assert!(sub.images.iter().zip(&sub.labels).all(|(&p, &l)| p as u32 / 10 == l));
        assert_ne!(set.clone().subset(9, 1).images, sub.images);
        assert_eq!(set.clone().subset(9, 0), sub);
        assert_eq!(set.clone().subset(40, 0), set);
        Ok(())
    }
}
