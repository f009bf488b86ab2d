//! The harness end to end on a tiny model: spec errors, grid expansion and run ids, determinism,
//! skip/resume/interrupt, the CLI's exit codes, and DP with K workers equal to one worker with batch K·b.

mod common;

use anyhow::Result;
use candle_core::Device;
use common::{metrics_without_clock, run_options, TINY};
use sdp::data::augment::{AugmentCfg, PadMode};
use sdp::data::loader::TrainLoader;
use sdp::models;
use sdp::optim::Optimizer;
use sdp::plan;
use sdp::results::{Manifest, Status};
use sdp::runner::{run_all, RunOptions};
use sdp::spec::{self, Experiment};
use sdp::train::dp_step;
use std::path::Path;

fn parse(text: &str, sets: &[&str]) -> Result<Experiment> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    plan::parse(text, Path::new("exp.toml"), &sets)
}

fn parse_err(text: &str, sets: &[&str]) -> String {
    match parse(text, sets) {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            assert!(e.is::<spec::SpecError>(), "not a spec error: {e:#}");
            format!("{e:#}")
        }
    }
}

// ----- spec errors: each names the file, the key and (where known) the line -----

#[test]
fn unknown_key_names_file_key_and_line() {
    let text = TINY.replace("epochs = 2", "epochs = 2\nepocs = 3");
    let e = parse_err(&text, &[]);
    assert!(e.contains("exp.toml:13: key `workload.epocs`"), "{e}");
    assert!(e.contains("unknown field `epocs`"), "{e}");
}

#[test]
fn unknown_table_is_an_error() {
    let e = parse_err(&format!("{TINY}\n[methd]\nworkers = 2\n"), &[]);
    assert!(e.contains("key `methd`") && e.contains("unknown field `methd`"), "{e}");
}

#[test]
fn wrong_type_names_the_key() {
    let e = parse_err(&TINY.replace("epochs = 2", "epochs = \"two\""), &[]);
    assert!(e.contains("exp.toml:12: key `workload.epochs`") && e.contains("invalid type"), "{e}");
}

#[test]
fn unknown_variant_lists_the_choices() {
    let e = parse_err(&TINY.replace("model = \"resnet\"", "model = \"vgg\""), &[]);
    assert!(e.contains("key `workload.model`") && e.contains("unknown variant `vgg`"), "{e}");
    assert!(e.contains("resnet18"), "{e}");
}

/// Each `(spec text, --set overrides, parts)`: parsing fails with a spec error containing every part.
fn expect_errors(cases: &[(&str, &[&str], &[&str])]) {
    for (text, sets, parts) in cases {
        let e = parse_err(text, sets);
        assert!(parts.iter().all(|p| e.contains(p)), "expected {parts:?} in: {e}");
    }
}

#[test]
fn bad_values_are_rejected_with_the_reason() {
    expect_errors(&[
        (
            &TINY.replace("lr = 0.05", "lr = -1.0"),
            &[],
            &["exp.toml:16: key `optim.lr`: must be a positive number, got -1"],
        ),
        (
            &TINY.replace("dataset = \"shapes\"", "dataset = \"mnist\""),
            &[],
            &["key `workload.dataset`: unknown dataset `mnist`"],
        ),
        (
            &TINY.replace("depths = [1, 1]", "depths = [1]"),
            &[],
            &["key `workload.depths`: has 1 stages but workload.widths has 2"],
        ),
        (&TINY.replace("workers = 2", "workers = 0"), &[], &["key `method.workers`: must be at least 1"]),
    ]);
}

#[test]
fn syntax_errors_and_missing_name_are_reported() {
    expect_errors(&[
        ("name = \"x\"\n[workload\n", &[], &["exp.toml: invalid TOML", "line 2"]),
        (&TINY.replace("name = \"tiny\"", ""), &[], &["exp.toml: missing key `name`"]),
        (&TINY.replace("name = \"tiny\"", "name = \"a/b\""), &[], &["key `name`: must be a non-empty string"]),
    ]);
}

#[test]
fn override_errors_name_the_override() {
    expect_errors(&[
        (TINY, &["workload.epochs=zero"], &["key `workload.epochs`", "--set workload.epochs"]),
        (TINY, &["workload.nope=1"], &["unknown field `nope`", "--set workload.nope"]),
        (TINY, &["noequals"], &["--set noequals: expected key.path=value"]),
    ]);
}

// ----- grid expansion and run ids -----

#[test]
fn lists_expand_into_a_grid_times_seeds() -> Result<()> {
    let text = TINY.replace("seeds = [0]", "seeds = [0, 1, 2]").replace("lr = 0.05", "lr = [0.05, 0.1]");
    let e = parse(&text, &[])?;
    assert_eq!(e.runs.len(), 6);
    let ids: std::collections::HashSet<_> = e.runs.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), 6, "run ids must differ");
    assert_eq!(e.runs[0].label, "optim.lr=0.05 seed=0");
    assert_eq!(e.runs[5].label, "optim.lr=0.1 seed=2");
    // Stable: the same spec gives the same ids.
    let again = parse(&text, &[])?;
    assert_eq!(e.runs.iter().map(|r| &r.id).collect::<Vec<_>>(), again.runs.iter().map(|r| &r.id).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn full_coverage_sdp_runs_are_one_run_whatever_the_masking_and_regime() -> Result<()> {
    let text = TINY.replace("[method]\nworkers = 2", "[method]\nkind = \"sdp\"\nworkers = 2")
        + "masking = [\"neuron\", \"block\"]\nregime = [\"forward\", \"backward\"]\ncoverage = [0.5, 1.0]\n";
    let e = parse(&text, &[])?;
    // 2 maskings × 2 regimes at C = 0.5 (m = 1 of K = 2), and one run at C = 1 (m = K).
    assert_eq!(e.runs.len(), 5, "{:?}", e.runs.iter().map(|r| &r.label).collect::<Vec<_>>());
    let full: Vec<_> = e.runs.iter().filter(|r| r.spec.method.coverage == 1.0).collect();
    assert_eq!(full.len(), 1);
    // Its label and spec do not pretend to a masking or regime.
    assert_eq!(full[0].label, "method.coverage=1.0");
    assert_eq!((full[0].spec.method.masking.as_str(), full[0].spec.method.rescale), ("block", false));
    // m = round(C·K): C = 0.8 with K = 2 is also full coverage, and the same computation as C = 1
    // except for the coverage value itself (kept: it is what the user asked for).
    let e = parse(&text, &["method.coverage=0.8", "method.masking=\"neuron\""])?;
    assert_eq!(e.runs.len(), 1);
    assert!(e.runs[0].spec.full_coverage());
    Ok(())
}

#[test]
fn set_replaces_a_list_by_a_scalar_and_list_keys_need_nesting() -> Result<()> {
    let text = TINY.replace("lr = 0.05", "lr = [0.05, 0.1]");
    let e = parse(&text, &["optim.lr=0.1", "seeds=[4, 5]"])?;
    assert_eq!(e.runs.len(), 2);
    assert!(e.runs.iter().all(|r| r.spec.optim.lr == 0.1));
    assert_eq!(e.runs[1].spec.seed, 5);
    // A list at a list-valued key is one value; a list of lists is a grid axis.
    assert_eq!(parse(TINY, &[])?.runs.len(), 1);
    let e = parse(TINY, &["workload.widths=[[4, 8], [8, 16]]"])?;
    assert_eq!(e.runs.len(), 2);
    assert_eq!(e.runs[1].spec.workload.widths, Some(vec![8, 16]));
    // An override matching the file's value gives the same id as no override.
    assert_eq!(parse(TINY, &["optim.lr=0.05"])?.runs[0].id, parse(TINY, &[])?.runs[0].id);
    Ok(())
}

// ----- running -----

#[test]
fn same_spec_and_seed_give_identical_metrics() -> Result<()> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let exp = parse(TINY, &[])?;
    for d in [&a, &b] {
        let out = run_all(std::slice::from_ref(&exp), &run_options(d.path()))?;
        assert_eq!(out.done, 1);
    }
    let id = &exp.runs[0].id;
    let ma = metrics_without_clock(&a.path().join("tiny").join(id).join("metrics.csv"))?;
    let mb = metrics_without_clock(&b.path().join("tiny").join(id).join("metrics.csv"))?;
    assert_eq!(ma.len(), 3, "header + one row per epoch: {ma:?}");
    assert_eq!(
        ma[0],
        ["run_id", "epoch", "step", "train_loss", "test_loss", "test_acc", "lr", "test_acc_full"]
            .map(String::from)
            .to_vec()
    );
    assert_eq!(ma, mb);
    // A different seed trains differently.
    let other = parse(TINY, &["seeds=1"])?;
    run_all(std::slice::from_ref(&other), &run_options(a.path()))?;
    let mc = metrics_without_clock(&a.path().join("tiny").join(&other.runs[0].id).join("metrics.csv"))?;
    assert_ne!(ma[1][3], mc[1][3]);
    Ok(())
}

#[test]
fn bf16_precision_has_its_own_run_id_and_trains_end_to_end() -> Result<()> {
    // `precision = "f32"` is the default and leaves the run id unchanged.
    let f32_id = parse(TINY, &[])?.runs[0].id.clone();
    assert_eq!(parse(TINY, &["workload.precision=\"f32\""])?.runs[0].id, f32_id);
    let exp = parse(TINY, &["workload.precision=\"bf16\""])?;
    assert_ne!(exp.runs[0].id, f32_id);
    let err = parse_err(TINY, &["workload.precision=\"fp8\""]);
    assert!(err.contains("workload.precision") && err.contains("bf16"), "{err}");
    // SDP workers compute in bf16 too; the run finishes with finite losses.
    let exp = parse(TINY, &["workload.precision=\"bf16\"", "method.kind=\"sdp\"", "method.coverage=0.5"])?;
    let dir = tempfile::tempdir()?;
    assert_eq!(run_all(std::slice::from_ref(&exp), &run_options(dir.path()))?.done, 1);
    let rows = metrics_without_clock(&dir.path().join("tiny").join(&exp.runs[0].id).join("metrics.csv"))?;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for row in &rows[1..] {
        let loss: f64 = row[3].parse()?;
        assert!(loss.is_finite() && loss > 0.0, "train loss {loss} in {row:?}");
    }
    Ok(())
}

#[test]
fn finished_runs_are_skipped_and_force_reruns_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exp = parse(TINY, &[])?;
    let run_dir = dir.path().join("tiny").join(&exp.runs[0].id);
    assert_eq!(run_all(std::slice::from_ref(&exp), &run_options(dir.path()))?.done, 1);
    let m = Manifest::read(&run_dir.join("manifest.json"))?;
    assert_eq!(m.status, Status::Done);
    assert!(m.final_metrics.is_some() && m.ended.is_some());
    let summary = std::fs::read_to_string(dir.path().join("tiny/summary.csv"))?;
    assert_eq!(summary.lines().count(), 2, "{summary}");
    assert!(summary.starts_with("run_id,label,seed,dataset,model,method,workers,epochs,final_test_acc"));

    let again = run_all(std::slice::from_ref(&exp), &run_options(dir.path()))?;
    assert_eq!((again.done, again.skipped), (0, 1));
    assert_eq!(Manifest::read(&run_dir.join("manifest.json"))?.started, m.started);

    let forced = run_all(std::slice::from_ref(&exp), &RunOptions { force: true, ..run_options(dir.path()) })?;
    assert_eq!((forced.done, forced.skipped), (1, 0));
    Ok(())
}

#[test]
fn interrupted_run_is_marked_and_rerun() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exp = parse(TINY, &[])?;
    let o = run_options(dir.path());
    o.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let out = run_all(std::slice::from_ref(&exp), &o)?;
    assert!(out.interrupted);
    let run_dir = dir.path().join("tiny").join(&exp.runs[0].id);
    assert_eq!(Manifest::read(&run_dir.join("manifest.json"))?.status, Status::Interrupted);
    assert!(!run_dir.join("metrics.csv").exists(), "no evaluation happened, so no metrics file");
    let leftovers: Vec<_> = std::fs::read_dir(&run_dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert_eq!(leftovers, ["manifest.json"], "no temp files left");
    // The next invocation trains it again.
    assert_eq!(run_all(std::slice::from_ref(&exp), &run_options(dir.path()))?.done, 1);
    Ok(())
}

#[test]
fn a_failing_run_is_recorded_as_failed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // 64 samples cannot fill one step of 2 workers × batch 64.
    let exp = parse(TINY, &["workload.batch_size=64"])?;
    let out = run_all(std::slice::from_ref(&exp), &run_options(dir.path()))?;
    assert_eq!(out.failed, 1);
    let m = Manifest::read(&dir.path().join("tiny").join(&exp.runs[0].id).join("manifest.json"))?;
    match m.status {
        Status::Failed(reason) => assert!(reason.contains("fewer than one step"), "{reason}"),
        s => panic!("status {s}"),
    }
    Ok(())
}

// ----- the command line -----

fn sdp(args: &[&str]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(env!("CARGO_BIN_EXE_sdp")).args(args).output()?)
}

#[test]
fn check_exits_2_naming_an_unknown_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, TINY.replace("batch_size = 8", "batch_size = 8\nbatchsize = 8"))?;
    let out = sdp(&["check", path.to_str().unwrap_or_default()])?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:14: key `workload.batchsize`: unknown field `batchsize`"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, TINY.replace("seeds = [0]", "seeds = [0, 1]"))?;
    let out = sdp(&["check", good.to_str().unwrap_or_default()])?;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    Ok(())
}

#[test]
fn check_exits_2_naming_an_unknown_method() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, TINY.replace("workers = 2", "workers = 2\nkind = \"local_adam\""))?;
    let out = sdp(&["check", path.to_str().unwrap_or_default()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.toml:20: key `method.kind`: unknown method `local_adam`"), "{err}");
    assert!(err.contains("registered: dp, sdp, small_dense, stochastic_depth, dropout") && !err.contains("panicked"));
    Ok(())
}

#[test]
fn cli_usage_errors_exit_2() -> Result<()> {
    assert_eq!(sdp(&["run"])?.status.code(), Some(2));
    assert_eq!(sdp(&["frobnicate"])?.status.code(), Some(2));
    let out = sdp(&["check", "/nonexistent/spec.toml"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading spec /nonexistent/spec.toml"));
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("s.toml");
    std::fs::write(&path, TINY)?;
    let out = sdp(&["run", path.to_str().unwrap_or_default(), "--device", "tpu"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --device `tpu`"));
    let out = sdp(&["memprobe", path.to_str().unwrap_or_default(), "--device", "tpu"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --device `tpu`"));
    // The CPU probe prints its machine-readable line.
    let out = sdp(&["memprobe", path.to_str().unwrap_or_default(), "--steps", "1"])?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("peak_bytes=")));
    Ok(())
}

// ----- data parallelism -----

/// K workers with batch b and averaged gradients take the same steps as one worker with batch K·b
/// (without BatchNorm, whose statistics depend on the per-worker batch).
#[test]
fn dp_with_k_workers_equals_one_worker_with_k_times_the_batch() -> Result<()> {
    let exp = parse(TINY, &["workload.norm=none", "optim.weight_decay=0.001", "optim.nesterov=true"])?;
    let spec = &exp.runs[0].spec;
    let data = sdp::data::load(&spec.workload, Path::new("datasets"))?;
    let aug = AugmentCfg { crop_pad: 4, pad_mode: PadMode::Zero, flip: true, mean: data.mean, std: data.std };
    let train = data.train.clone();
    let dev = Device::Cpu;
    let mut finals = Vec::new();
    for (k, b) in [(4, 4), (1, 16)] {
        let net = models::build(&spec.workload, 10, spec.seed, &dev)?;
        let mut opt = Optimizer::new(&spec.optim);
        let loader = TrainLoader::start(train.clone(), aug, spec.seed, 1, k, b, 0)?;
        assert_eq!(loader.steps, 4);
        for batches in loader {
            dp_step(net.as_ref(), &mut opt, &batches, 0.05, &dev)?;
        }
        finals.push(net.store().param_tensors());
    }
    let mut moved = 0.0f32;
    let init = models::build(&spec.workload, 10, spec.seed, &dev)?.store().param_tensors();
    for (name, a) in &finals[0] {
        let b = &finals[1][name];
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{name}: max |diff| = {diff}");
        moved = moved.max((a - &init[name])?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
    }
    assert!(moved > 1e-3, "parameters should have moved (max change {moved})");
    Ok(())
}
