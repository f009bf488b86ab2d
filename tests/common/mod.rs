//! Fixtures and helpers shared by the integration tests: the tiny experiment they train, run options on the
//! CPU, and the error-message checks. Each test binary compiles its own copy of this module and uses only
//! part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod family;
pub mod mlp;

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use sdp::runner::RunOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The tiny experiment: a ResNet of widths [4, 8] and one block per stage on 64 `shapes` images, two epochs,
/// DP with two workers; seconds on the CPU. Spec-error tests name its line numbers (`exp.toml:16` is `lr`).
pub const TINY: &str = r#"# tiny
name = "tiny"
seeds = [0]

[workload]
dataset = "shapes"
train_samples = 64
test_samples = 40
model = "resnet"
widths = [4, 8]
depths = [1, 1]
epochs = 2
batch_size = 8

[optim]
lr = 0.05

[method]
workers = 2
"#;

/// [`TINY`] with each `(old, new)` applied in order; every `old` must occur in the text, so a fixture cannot
/// silently stop applying an edit.
pub fn tiny_with(edits: &[(&str, &str)]) -> String {
    let mut text = TINY.to_string();
    for (old, new) in edits {
        assert!(text.contains(old), "the tiny spec has no {old:?}");
        text = text.replacen(old, new, 1);
    }
    text
}

/// `text` parsed as the spec file `tiny.toml` with `--set` overrides.
pub fn parse_with(text: &str, sets: &[&str]) -> Result<sdp::spec::Experiment> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    sdp::plan::parse(text, Path::new("tiny.toml"), &sets)
}

/// The arguments of `sdp run SPEC --results-dir RESULTS`, then `extra`.
pub fn run_args<'a>(spec: &'a Path, results: &'a Path, extra: &[&'a str]) -> Result<Vec<&'a str>> {
    let mut args = vec!["run", spec.to_str().context("spec path")?, "--results-dir", results.to_str().context("path")?];
    args.extend_from_slice(extra);
    Ok(args)
}

/// An ImageFolder tree under `root`: for each `(split, n)`, `n` PNGs of `side`×`side` pixels per class,
/// named `0.png`, `1.png` …; the pixels are a function of the class and the index, so classes differ.
pub fn image_tree(root: &Path, splits: &[(&str, usize)], classes: &[&str], side: u32) -> Result<()> {
    for (split, n) in splits {
        for (c, class) in classes.iter().enumerate() {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d)?;
            for i in 0..*n {
                let px =
                    (0..side * side * 3).map(|j| (j as u8).wrapping_mul(c as u8 + 1).wrapping_add(i as u8)).collect();
                image::RgbImage::from_raw(side, side, px).context("image")?.save(d.join(format!("{i}.png")))?;
            }
        }
    }
    Ok(())
}

/// Options for `run_all` into `results` on the CPU, with no memory probe.
pub fn run_options(results: &Path) -> RunOptions {
    RunOptions {
        results_dir: results.to_path_buf(),
        data_dir: PathBuf::from("datasets"),
        device: Device::Cpu,
        device_name: "cpu".into(),
        force: false,
        only: None,
        stop: Arc::new(AtomicBool::new(false)),
        memprobe: None,
        save_model: false,
        world: sdp::comm::World::solo(),
    }
}

/// The whole context chain of an error that must occur.
pub fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => format!("{e:#}"),
    }
}

/// Fails unless `msg` contains every one of `parts`.
pub fn check_contains(msg: &str, parts: &[&str]) -> Result<()> {
    for p in parts {
        ensure!(msg.contains(p), "error message {msg:?} does not contain {p:?}");
    }
    Ok(())
}

/// metrics.csv without the wall-clock columns (img_per_s, wall_s): what must be equal between two runs of
/// the same spec and seed.
pub fn metrics_without_clock(path: &Path) -> Result<Vec<Vec<String>>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = r.headers()?.clone();
    let keep: Vec<usize> = (0..headers.len()).filter(|&i| !matches!(&headers[i], "img_per_s" | "wall_s")).collect();
    let mut rows = vec![keep.iter().map(|&i| headers[i].to_string()).collect()];
    for rec in r.records() {
        let rec = rec?;
        rows.push(keep.iter().map(|&i| rec[i].to_string()).collect());
    }
    Ok(rows)
}
