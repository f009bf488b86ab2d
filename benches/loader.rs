//! Throughput of the training input pipeline on CIFAR-sized data: 50,000 random 32×32×3 images, random
//! crop (pad 4) + horizontal flip + normalisation, HWC u8 → CHW f32, batch 128.
//!
//! `cargo bench --bench loader` prints augmented images/s (criterion's `thrpt`) for
//! - `loader/train_epoch`: one epoch through the real [`TrainLoader`] (background thread, K = 1 and K = 2
//!   workers of batch 128), the loader's target (≥ 50,000 images/s on 2 cores);
//! - `loader/make_batch`: one batch of 128 built on the calling thread (spread over rayon's pool), without the
//!   channel;
//! - `loader/write_image`: one image on one thread.
//!
//! Synthetic pixels, so it runs without `../shared`; the loader's cost does not depend on pixel values.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sdp::data::augment::{draw, write_image_with, AugmentCfg, Normalizer, PadMode};
use sdp::data::loader::{epoch_key, make_batch, random_images, steps_per_epoch, TrainLoader};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const N: usize = 50_000;
const BATCH: usize = 128;

fn cfg() -> AugmentCfg {
    // The CIFAR-10 constants; crop pad 4 and flip as in the paper's recipe.
    AugmentCfg {
        crop_pad: 4,
        pad_mode: PadMode::Zero,
        flip: true,
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    }
}

fn loader(c: &mut Criterion) {
    let set = Arc::new(random_images(0, N, 32, 32, 3).expect("random set has consistent sizes"));
    let mut g = c.benchmark_group("loader");
    g.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(10));

    for workers in [1, 2] {
        let images = steps_per_epoch(N, workers, BATCH).expect("50,000 ≥ one step") * workers * BATCH;
        g.throughput(Throughput::Elements(images as u64));
        let mut epoch = 0;
        g.bench_with_input(BenchmarkId::new("train_epoch", format!("K{workers}_b{BATCH}")), &workers, |b, &k| {
            b.iter(|| {
                epoch += 1;
                let mut seen = 0usize;
                for batches in TrainLoader::start(set.clone(), cfg(), 0, epoch, k, BATCH, 0).expect("valid loader") {
                    seen += black_box(&batches).iter().map(|b| b.len()).sum::<usize>();
                }
                assert_eq!(seen, images);
            })
        });
    }

    g.throughput(Throughput::Elements(BATCH as u64));
    let key = epoch_key(0, 1);
    let mut start = 0;
    g.bench_function(BenchmarkId::new("make_batch", format!("b{BATCH}")), |b| {
        b.iter(|| {
            let idx: Vec<usize> = (start..start + BATCH).collect();
            start = (start + BATCH) % (N - BATCH);
            black_box(make_batch(&set, &idx, &cfg(), Some(key)))
        })
    });

    // One image on one thread, the unit of work the batch spreads over the cores.
    g.throughput(Throughput::Elements(1));
    let norm = Normalizer::new(&cfg(), 3);
    let mut out = vec![0f32; 3 * 32 * 32];
    let mut i = 0;
    g.bench_function("write_image", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            write_image_with(&set, i, &cfg(), &norm, Some(draw(key, i)), &mut out);
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, loader);
criterion_main!(benches);
