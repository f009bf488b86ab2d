//! `shapes`: the built-in, procedurally generated 10-class 32×32 RGB dataset.
//!
//! It exists so that the demo and the tests run on any machine, offline, in minutes. The class is the shape
//! (disk, square, triangle, plus, ring, stripes, diamond, X, frame, crescent); colours, position, scale,
//! rotation, a background gradient and pixel noise are nuisance factors drawn per image. Every image comes
//! from its own stream `(seed, Synthetic, split, index)`, so generation is parallel and reproducible.

use super::source::{DataSource, Request, Shape};
use super::{channel_stats, Dataset, ImageData, ImageSet};
use crate::seed::{rng, Stream};
use anyhow::Result;
use rand::Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

pub const CLASSES: [&str; 10] =
    ["disk", "square", "triangle", "plus", "ring", "stripes", "diamond", "x", "frame", "crescent"];

/// Default sizes of the generated splits (`workload.train_samples` / `test_samples` absent).
pub const SHAPES_TRAIN: usize = 10_000;
pub const SHAPES_TEST: usize = 2_000;

const SIZE: usize = 32;
/// Supersampling factor per axis (anti-aliased edges).
const SS: usize = 2;

/// Generates `shapes` with `train` and `test` images from `seed`.
pub fn shapes(seed: u64, train: usize, test: usize) -> Result<ImageData> {
    let train = generate(seed, 0, train)?;
    let test = generate(seed, 1, test)?;
    let (mean, std) = channel_stats(&train);
    Ok(ImageData {
        name: "shapes".into(),
        train,
        test,
        classes: CLASSES.iter().map(|s| s.to_string()).collect(),
        mean,
        std,
    })
}

/// The registered `shapes` source: generated at the sizes a run asks for.
pub struct Shapes;

impl DataSource for Shapes {
    fn shape(&self, req: &Request) -> Result<Shape> {
        let (train, test) = (req.train.unwrap_or(SHAPES_TRAIN), req.test.unwrap_or(SHAPES_TEST));
        Ok(Shape { train, test, classes: CLASSES.len(), hw: (SIZE, SIZE) })
    }

    fn load(&self, req: &Request) -> Result<Dataset> {
        let s = self.shape(req)?;
        Ok(shapes(req.seed, s.train, s.test)?.into())
    }

    fn generated(&self) -> bool {
        true
    }
}

fn generate(seed: u64, split: u64, n: usize) -> Result<ImageSet> {
    let per = SIZE * SIZE * 3;
    let mut images = vec![0u8; n * per];
    let mut labels = vec![0u32; n];
    images.par_chunks_mut(per).zip(labels.par_iter_mut()).enumerate().for_each(|(i, (img, label))| {
        // Balanced classes: image i has class i mod 10, order shuffled by the loader's permutation.
        *label = (i % CLASSES.len()) as u32;
        render(&mut rng(seed, Stream::Synthetic, split, i as u64), *label, img);
    });
    ImageSet::new(images, labels, SIZE, SIZE, 3)
}

/// Whether normalised shape coordinates (u, v) ∈ [-1, 1]² (v up) fall inside shape `class`.
fn inside(class: u32, u: f32, v: f32) -> bool {
    let r = (u * u + v * v).sqrt();
    let m = u.abs().max(v.abs());
    match class {
        0 => r < 0.9,
        1 => m < 0.75,
        2 => v > -0.7 && v < 0.85 && u.abs() < 0.55 * (0.85 - v),
        3 => (u.abs() < 0.25 && v.abs() < 0.9) || (v.abs() < 0.25 && u.abs() < 0.9),
        4 => r > 0.55 && r < 0.9,
        5 => m < 0.85 && ((v + 1.0) * 2.5).rem_euclid(1.0) < 0.5,
        6 => u.abs() + v.abs() < 0.95,
        7 => m < 0.85 && ((u - v).abs() < 0.32 || (u + v).abs() < 0.32),
        8 => m < 0.85 && m > 0.55,
        _ => r < 0.9 && ((u - 0.45) * (u - 0.45) + v * v).sqrt() > 0.6,
    }
}

fn render(rng: &mut impl Rng, class: u32, out: &mut [u8]) {
    // Colours: foreground and background differ by at least 0.9 in summed per-channel distance.
    let bg: [f32; 3] = [rng.random(), rng.random(), rng.random()];
    let fg = loop {
        let c: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        let d: f32 = c.iter().zip(&bg).map(|(a, b)| (a - b).abs()).sum();
        if d > 0.9 {
            break c;
        }
    };
    let grad: [f32; 2] = [rng.random_range(-0.15..0.15), rng.random_range(-0.15..0.15)];
    let half = rng.random_range(8.0f32..13.0); // half-size in pixels
    let cx = rng.random_range(half * 0.8..SIZE as f32 - half * 0.8);
    let cy = rng.random_range(half * 0.8..SIZE as f32 - half * 0.8);
    let theta = rng.random_range(-0.3f32..0.3); // radians, about ±17°
    let (s, c) = theta.sin_cos();
    let noise = Normal::new(0.0f32, 0.04).unwrap_or_else(|_| unreachable!("constant, valid std"));
    for y in 0..SIZE {
        for x in 0..SIZE {
            let mut cover = 0.0f32;
            for sy in 0..SS {
                for sx in 0..SS {
                    let px = x as f32 + (sx as f32 + 0.5) / SS as f32 - cx;
                    let py = y as f32 + (sy as f32 + 0.5) / SS as f32 - cy;
                    // Rotate into the shape frame, normalise by the half-size, flip y so v points up.
                    let u = (c * px + s * py) / half;
                    let v = -(-s * px + c * py) / half;
                    if inside(class, u, v) {
                        cover += 1.0;
                    }
                }
            }
            cover /= (SS * SS) as f32;
            let shade = grad[0] * (x as f32 / SIZE as f32 - 0.5) + grad[1] * (y as f32 / SIZE as f32 - 0.5);
            for ch in 0..3 {
                let v = cover * fg[ch] + (1.0 - cover) * (bg[ch] + shade) + noise.sample(rng);
                out[(y * SIZE + x) * 3 + ch] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_is_reproducible_balanced_and_seed_dependent() -> Result<()> {
        let a = shapes(3, 40, 20)?;
        let b = shapes(3, 40, 20)?;
        let c = shapes(4, 40, 20)?;
        assert_eq!(a.train, b.train);
        assert_eq!(a.test, b.test);
        assert_ne!(a.train.images, c.train.images);
        assert_eq!(a.train.class_counts(10), vec![4; 10]);
        assert_ne!(a.train.images, a.test.images[..].repeat(2));
        Ok(())
    }

    #[test]
    fn every_class_draws_some_foreground() {
        for class in 0..10 {
            let n = (0..64 * 64)
                .filter(|i| inside(class, (i % 64) as f32 / 32.0 - 1.0, (i / 64) as f32 / 32.0 - 1.0))
                .count();
            assert!(n > 200 && n < 64 * 64 - 200, "class {class} covers {n} of 4096 samples");
        }
    }
}
