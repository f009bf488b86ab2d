//! `sdp check --cost` on a tiny model: the estimate is positive and follows the spec's steps and
//! evaluations, measured figures are cached and reused, and bad input is an error that names it.

mod common;

use anyhow::Result;
use common::tiny_with;
use sdp::cost::{data_sizes, estimate, CostOptions, CostReport};
use sdp::plan;
use sdp::spec::{self, Experiment};
use std::path::{Path, PathBuf};

/// The shared tiny experiment, as DP and SDP (C = 0.5) with a smaller test split and batch.
fn tiny() -> String {
    tiny_with(&[
        ("name = \"tiny\"", "name = \"tiny-cost\""),
        ("test_samples = 40", "test_samples = 16"),
        ("batch_size = 8", "batch_size = 4\neval_batch_size = 8"),
        ("[method]\nworkers = 2\n", "[method]\nkind = [\"dp\", \"sdp\"]\nworkers = 2\ncoverage = 0.5\n"),
    ])
}

fn parse(sets: &[&str]) -> Result<Experiment> {
    common::parse_with(&tiny(), sets)
}

fn opts(cache: &Path) -> Result<CostOptions> {
    let mut o = CostOptions::new("cpu", Some(cache.to_path_buf()), Path::new("datasets"))?;
    (o.warmup, o.steps) = (1, 1);
    Ok(o)
}

fn run_s(r: &CostReport, i: usize) -> (f64, f64, f64) {
    (r.runs[i].train_s, r.runs[i].eval_s, r.runs[i].probe_s)
}

#[test]
fn estimate_is_positive_and_scales_with_epochs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let o = opts(&dir.path().join("times.json"))?;
    let two = estimate(&[parse(&[])?], &o)?;
    let four = estimate(&[parse(&["workload.epochs=4"])?], &o)?;
    assert_eq!(two.runs.len(), 2);
    for i in 0..2 {
        let ((t2, e2, p2), (t4, e4, p4)) = (run_s(&two, i), run_s(&four, i));
        assert!(t2 > 0.0 && e2 > 0.0 && p2 > 0.0, "run {i}: {t2} {e2} {p2}");
        // 64 / (2 workers × 4) = 8 steps an epoch; one evaluation per epoch; one probe per run.
        assert_eq!((two.runs[i].steps, two.runs[i].evals), (16, 2));
        assert_eq!((four.runs[i].steps, four.runs[i].evals), (32, 4));
        // Training is linear in the steps, plus a fixed part (the model build and the cold first steps).
        let timing = &two.runs[i].timing;
        let fixed = timing.build_s + timing.warmup_extra_s;
        assert!(timing.step_s > 0.0 && fixed > 0.0, "{timing:?}");
        assert!((t2 - fixed - 16.0 * timing.step_s).abs() <= 1e-9 * t2, "training: {t2}, {timing:?}");
        assert!((t4 - t2 - 16.0 * timing.step_s).abs() <= 1e-9 * t4, "training: {t2} then {t4}");
        assert!((e4 - 2.0 * e2).abs() <= 1e-9 * e4, "evaluation: {e2} then {e4}");
        // The second estimate reads the timing back from the cache file, and serde_json's default float
        // parser may round the last bit differently (it is not the exact `float_roundtrip` parser).
        assert!((p2 - p4).abs() <= 1e-9 * p2, "the memory probe does not depend on the epochs: {p2} then {p4}");
    }
    // SDP evaluates five modes: more forward passes than DP's one on the same test set.
    assert!(two.runs[1].timing.subnets_s_per_image > 0.0 && two.runs[0].timing.subnets_s_per_image == 0.0);
    Ok(())
}

#[test]
fn cached_timings_are_reused_and_new_configurations_measured() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("sub").join("times.json");
    let o = opts(&cache)?;
    let first = estimate(&[parse(&[])?], &o)?;
    assert_eq!((first.measured, first.reused), (2, 0));
    assert!(cache.exists(), "the cache file is written");
    let second = estimate(&[parse(&[])?], &o)?;
    assert_eq!((second.measured, second.reused), (0, 2));
    // The cached figures are the measured ones (to the last bits of a JSON float round trip).
    let (a, b) = (&second.runs[0].timing, &first.runs[0].timing);
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(y.abs());
    for (x, y) in [
        (a.step_s, b.step_s),
        (a.build_s, b.build_s),
        (a.warmup_extra_s, b.warmup_extra_s),
        (a.eval_fixed_s, b.eval_fixed_s),
        (a.eval_s_per_image, b.eval_s_per_image),
        (a.subnets_s_per_image, b.subnets_s_per_image),
        (a.recal_s_per_image, b.recal_s_per_image),
    ] {
        assert!(close(x, y), "cached {a:?}\nmeasured {b:?}");
    }
    assert_eq!((a.timed_steps, &a.measured_at), (b.timed_steps, &b.measured_at));
    assert!(second.render().lines().any(|l| l == "measured=0 cached=2"), "{}", second.render());
    // More epochs or another seed: the same configuration. Another batch size: a new one.
    let epochs = estimate(&[parse(&["workload.epochs=3", "seeds=[5]"])?], &o)?;
    assert_eq!((epochs.measured, epochs.reused), (0, 2));
    let batch = estimate(&[parse(&["workload.batch_size=2", "method.kind=dp"])?], &o)?;
    assert_eq!((batch.measured, batch.reused), (1, 0));
    // Remeasuring measures each configuration once, then reuses what it just measured.
    let again = CostOptions { remeasure: true, ..o };
    let twice = estimate(&[parse(&[])?, parse(&["seeds=[7]"])?], &again)?;
    assert_eq!((twice.measured, twice.reused), (2, 2));
    Ok(())
}

#[test]
fn flop_matched_sdp_trains_epochs_over_coverage() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let o = opts(&dir.path().join("times.json"))?;
    let r = estimate(&[parse(&["method.kind=sdp", "method.budget=flop_matched"])?], &o)?;
    // 2 epochs / C = 0.5 → 4 epochs of 8 steps.
    assert_eq!((r.runs[0].epochs, r.runs[0].steps, r.runs[0].evals), (4, 32, 4));
    Ok(())
}

#[test]
fn dataset_sizes_are_read_or_assumed_and_said() -> Result<()> {
    let w = |text: &str| -> Result<spec::Workload> {
        let toml = tiny().replace("dataset = \"shapes\"\ntrain_samples = 64\ntest_samples = 16", text);
        Ok(plan::parse(&toml, Path::new("t.toml"), &[])?.runs.remove(0).spec.workload)
    };
    let d = data_sizes(&w("dataset = \"cifar10\"")?, Path::new("datasets"))?;
    assert_eq!((d.train, d.test, d.classes), (50_000, 10_000, 10));
    let note = d.assumption.unwrap_or_default();
    assert!(note.contains("train_samples and test_samples absent") && note.contains("50,000 train"), "{note}");
    let d = data_sizes(&w("dataset = \"svhn\"\ntrain_samples = 1000")?, Path::new("datasets"))?;
    assert_eq!((d.train, d.test), (1000, 26_032));
    assert!(d.assumption.is_some_and(|a| a.contains("test_samples absent") && a.contains("26,032 test")));
    let d = data_sizes(&w("dataset = \"cifar100\"\ntrain_samples = 100\ntest_samples = 10")?, Path::new("x"))?;
    assert_eq!((d.train, d.test, d.classes, d.assumption), (100, 10, 100, None));
    let e = data_sizes(&w("dataset = \"folder:no/such/tree\"")?, Path::new("/nonexistent"))
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(e.contains("folder:no/such/tree") && e.contains("/nonexistent/no/such/tree"), "{e}");
    Ok(())
}

#[test]
fn a_folder_dataset_is_counted_not_decoded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    common::image_tree(dir.path(), &[("train", 3), ("test", 2)], &["a", "b"], 8)?;
    let toml = tiny().replace(
        "dataset = \"shapes\"\ntrain_samples = 64\ntest_samples = 16",
        &format!("dataset = \"folder:{}\"", dir.path().display()),
    );
    let w = plan::parse(&toml, Path::new("t.toml"), &[])?.runs.remove(0).spec.workload;
    let d = data_sizes(&w, Path::new("datasets"))?;
    assert_eq!((d.train, d.test, d.classes, d.hw), (6, 4, 2, (8, 8)));
    Ok(())
}

#[test]
fn too_few_samples_for_one_step_is_an_error_naming_the_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exp = parse(&["workload.train_samples=4", "method.kind=dp"])?;
    let e = estimate(&[exp], &opts(&dir.path().join("t.json"))?).err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(
        e.contains("tiny-cost run") && e.contains("4 training samples are fewer than one step of 2 workers × batch 4"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_bad_device_is_an_error_naming_it() -> Result<()> {
    let e = CostOptions::new("tpu:3", None, Path::new("datasets")).err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(e.contains("invalid --device `tpu:3`"), "{e}");
    // The command line: a usage error (exit code 2), before any spec is read.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdp"))
        .args(["check", "--cost", "--device", "tpu:3", "no-such-spec.toml"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid --device `tpu:3`"), "{stderr}");
    Ok(())
}

#[test]
fn the_command_prints_runs_totals_and_the_cache_counter() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = dir.path().join("tiny.toml");
    std::fs::write(&spec, tiny())?;
    let cache: PathBuf = dir.path().join("times.json");
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sdp"))
            .arg("check")
            .arg(&spec)
            .args(["--cost", "--set", "method.kind=dp", "--cost-cache"])
            .arg(&cache)
            .output()
    };
    let (first, second) = (check()?, check()?);
    let (a, b) = (String::from_utf8_lossy(&first.stdout), String::from_utf8_lossy(&second.stdout));
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let run = a.lines().find(|l| l.starts_with("tiny-cost\t")).unwrap_or_default();
    let cols: Vec<&str> = run.split('\t').collect();
    assert_eq!(cols.len(), 11, "{run}");
    assert_eq!((cols[3], cols[4], cols[10]), ("steps=16", "evals=2", "measured"), "{run}");
    assert!(a.contains("# tiny-cost: 1 run(s), 16 steps") && a.contains("# total on device cpu"), "{a}");
    assert!(a.lines().any(|l| l == "measured=1 cached=0"), "{a}");
    assert!(b.lines().any(|l| l == "measured=0 cached=1"), "{b}");
    assert!(b.lines().any(|l| l.ends_with("\tcached")), "{b}");
    Ok(())
}

#[test]
fn jobs_take_the_next_run_in_order() {
    use sdp::cost::jobs_wall_s;
    assert_eq!(jobs_wall_s(&[3.0, 1.0, 1.0, 1.0], 1), 6.0);
    // Job 0 takes the 3 s run; job 1 the three 1 s runs.
    assert_eq!(jobs_wall_s(&[3.0, 1.0, 1.0, 1.0], 2), 3.0);
    assert_eq!(jobs_wall_s(&[1.0, 1.0, 1.0, 3.0], 2), 4.0);
    assert_eq!(jobs_wall_s(&[], 4), 0.0);
}

#[test]
fn the_report_gives_the_wall_clock_of_several_jobs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut o = opts(&dir.path().join("cache.json"))?;
    o.jobs = 2;
    let r = estimate(&[parse(&[])?], &o)?;
    let text = r.render();
    assert!(text.contains("# wall clock with --jobs 2"), "{text}");
    let one = estimate(&[parse(&[])?], &opts(&dir.path().join("cache.json"))?)?.render();
    assert!(!one.contains("wall clock with --jobs"), "{one}");
    Ok(())
}
