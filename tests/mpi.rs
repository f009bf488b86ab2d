//! One process per group of workers over MPI: `mpirun -np N sdp run` (N = 2 and 4 CPU ranks, K = 4 workers)
//! computes what the one-process simulation computes, for DP and for SDP block and neuron masking at C = 0.5
//! in both regimes; `sdp bench comm` measures what the model predicts; a rank that cannot load its data
//! fails the run on every rank, naming it; a spread run interrupted by a signal to one rank or to the
//! launcher resumes at 4, 2 or 1 process(es) (and a one-process checkpoint at 4); a rank that dies, on
//! rank 0's node or on another, is recorded. Needs Open MPI's `mpirun` (`.ci/run` installs it).
#![cfg(feature = "mpi")]

mod common;

use anyhow::{ensure, Context, Result};
use candle_core::{safetensors, Device};
use common::tiny_with;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The tiny experiment with K = 4 workers: 64 images, 4 × 8 per step, 2 steps per epoch.
fn spec(method: &str, epochs: usize) -> String {
    tiny_with(&[("epochs = 2", &format!("epochs = {epochs}")), ("[method]\nworkers = 2\n", method)])
}

/// `sdp ARGS` over `np` processes (`mpirun` when np > 1), one CPU thread each, not yet started.
fn sdp_command<S: AsRef<std::ffi::OsStr>>(np: usize, args: &[S]) -> Command {
    let exe = env!("CARGO_BIN_EXE_sdp");
    let mut cmd = if np == 1 {
        Command::new(exe)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-np", &np.to_string(), exe]);
        c
    };
    cmd.args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1");
    cmd
}

fn sdp(np: usize, args: &[&str]) -> Result<Output> {
    sdp_command(np, args).output().context("starting sdp (is Open MPI's mpirun on the PATH?)")
}

/// Trains `spec_text` with `np` processes into `dir`; returns the run folder.
fn train(np: usize, spec_text: &str, dir: &Path) -> Result<std::path::PathBuf> {
    let spec = dir.join("exp.toml");
    std::fs::create_dir_all(dir)?;
    std::fs::write(&spec, spec_text)?;
    let results = dir.join("results");
    let out = sdp(np, &common::run_args(&spec, &results, &["--save-model", "--no-memprobe"])?)?;
    ensure!(out.status.success(), "np {np}: {}", String::from_utf8_lossy(&out.stderr));
    let exp = results.join("tiny");
    let run = std::fs::read_dir(&exp)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .with_context(|| format!("no run folder in {}", exp.display()))?;
    Ok(run)
}

fn max_model_diff(a: &Path, b: &Path) -> Result<f32> {
    let (ta, tb) = (safetensors::load(a, &Device::Cpu)?, safetensors::load(b, &Device::Cpu)?);
    ensure!(ta.len() == tb.len() && !ta.is_empty(), "{} vs {} tensors", ta.len(), tb.len());
    let mut worst = 0f32;
    for (name, x) in &ta {
        let y = tb.get(name).with_context(|| format!("{name} missing"))?;
        let d = (x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        worst = worst.max(d);
    }
    Ok(worst)
}

fn metrics(run: &Path) -> Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(run.join("metrics.csv"))?;
    Ok(text.lines().map(|l| l.split(',').map(str::to_string).collect()).collect())
}

const METHODS: [(&str, &str); 5] = [
    ("dp", "[method]\nkind = \"dp\"\nworkers = 4\n"),
    ("block forward", "[method]\nkind = \"sdp\"\nworkers = 4\nmasking = \"block\"\ncoverage = 0.5\n"),
    ("neuron forward", "[method]\nkind = \"sdp\"\nworkers = 4\nmasking = \"neuron\"\ncoverage = 0.5\n"),
    (
        "block backward",
        "[method]\nkind = \"sdp\"\nworkers = 4\nmasking = \"block\"\ncoverage = 0.5\nregime = \"backward\"\n",
    ),
    (
        "neuron backward",
        "[method]\nkind = \"sdp\"\nworkers = 4\nmasking = \"neuron\"\ncoverage = 0.5\nregime = \"backward\"\n",
    ),
];

/// After the first steps (one epoch: 2 steps) the model of 2 and of 4 processes equals the simulation's.
#[test]
fn ranks_compute_what_the_simulation_computes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (what, method) in METHODS {
        let text = spec(method, 1);
        let one = train(1, &text, &tmp.path().join(format!("{what}-1")))?;
        for np in [2, 4] {
            let many = train(np, &text, &tmp.path().join(format!("{what}-{np}")))?;
            let d = max_model_diff(&one.join("model.safetensors"), &many.join("model.safetensors"))?;
            assert!(d < 1e-5, "{what}, {np} processes: parameters differ by {d}");
        }
    }
    Ok(())
}

/// Over a whole run (2 epochs) the metrics of 2 and of 4 processes agree with the simulation's: the losses,
/// and the headline metric and every evaluation mode's (full, recal, scaled, ensemble, subnet_mean) to
/// within one test image of 40.
#[test]
fn final_metrics_agree_over_a_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (what, method) in [METHODS[0], METHODS[1], METHODS[2]] {
        let text = spec(method, 2);
        let one = metrics(&train(1, &text, &tmp.path().join(format!("{what}-1")))?)?;
        let col = |name: &str| one[0].iter().position(|c| c == name).context("column");
        let accs: Vec<&String> = one[0].iter().filter(|c| c.starts_with("test_acc")).collect();
        if what != "dp" {
            ensure!(accs.len() == 6, "{what}: the headline and five mode columns, got {accs:?}");
        }
        for np in [2, 4] {
            let many = metrics(&train(np, &text, &tmp.path().join(format!("{what}-{np}")))?)?;
            assert_eq!(one[0], many[0], "{what}, {np} processes: headers");
            assert_eq!(one.len(), many.len(), "{what}, {np} processes: rows");
            for (a, b) in one[1..].iter().zip(&many[1..]) {
                for name in ["train_loss", "test_loss"] {
                    let (x, y): (f64, f64) = (a[col(name)?].parse()?, b[col(name)?].parse()?);
                    assert!((x - y).abs() <= 1e-3 * x.abs().max(1.0), "{what}, {np} processes: {name} {x} vs {y}");
                }
                for name in &accs {
                    let (x, y): (f64, f64) = (a[col(name)?].parse()?, b[col(name)?].parse()?);
                    assert!((x - y).abs() <= 1.0 / 40.0 + 1e-9, "{what}, {np} processes: {name} {x} vs {y}");
                }
            }
        }
    }
    Ok(())
}

/// The grouped exchange of 4 ranks sends what workers.csv's model says, and less than DP.
#[test]
fn bench_comm_matches_the_model() -> Result<()> {
    let out = sdp(4, &["bench", "comm", "--set", "workload.widths=[8,16,32,64]", "--syncs", "2"])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let rows: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 12, "{text}");
    for r in &rows {
        let ratio: f64 = r[5].parse().with_context(|| format!("{r:?}"))?;
        assert!((ratio - 1.0).abs() < 0.01, "{r:?}");
    }
    let wire =
        |ex: &str| -> f64 { rows.iter().filter(|r| r[0] == ex).map(|r| r[3].parse::<f64>().unwrap_or(0.0)).sum() };
    assert!(wire("sdp-grouped") < 0.6 * wire("dp"), "{text}");
    // The collective's own check: the model's parameters summed over 4 ranks come back 4 times themselves.
    let log = String::from_utf8(out.stderr)?;
    ensure!(log.contains("check: all-reduce of the whole model") && log.contains("over 4 rank(s)"), "{log}");
    Ok(())
}

/// In one process (every worker hosted here) the grouped averager gives what the simulation's local
/// averager gives, on a sync where every worker holds different values (the bench fails otherwise).
#[test]
fn bench_comm_grouped_equals_local_in_one_process() -> Result<()> {
    for masking in ["block", "neuron"] {
        let args = ["bench", "comm", "--masking", masking, "--workers", "4", "--syncs", "1"];
        let out = sdp(1, &[&args[..], &["--set", "workload.widths=[8,16,32,64]"]].concat())?;
        let log = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "{masking}: {log}");
        ensure!(log.contains("check: grouped averager vs the one-process (local) averager"), "{log}");
    }
    Ok(())
}

/// A rank that cannot load the dataset (here rank 1 is pointed at an empty folder) fails the run on every
/// rank within a minute; rank 0 records the run as failed, naming rank 1; a re-run with the data trains it.
#[test]
fn a_rank_without_its_data_fails_the_run_naming_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    // A 4-class ImageFolder tree of 8x8 PNGs: 32 train and 8 test images.
    common::image_tree(&dir.join("data/tree"), &[("train", 8), ("test", 2)], &["c0", "c1", "c2", "c3"], 8)?;
    std::fs::create_dir_all(dir.join("empty"))?;
    let text = tiny_with(&[
        ("dataset = \"shapes\"", "dataset = \"folder:tree\""),
        ("train_samples = 64", "train_samples = 32"),
        ("test_samples = 40", "test_samples = 8"),
        ("[method]\nworkers = 2\n", "[method]\nworkers = 2\n"),
    ]);
    std::fs::write(dir.join("exp.toml"), &text)?;
    let (spec, results) = (dir.join("exp.toml"), dir.join("r"));
    let rank = |data: &str| -> Vec<String> {
        let s = |p: &Path| p.to_string_lossy().into_owned();
        [
            "-np",
            "1",
            env!("CARGO_BIN_EXE_sdp"),
            "run",
            &s(&spec),
            "--results-dir",
            &s(&results),
            "--data-dir",
            &s(&dir.join(data)),
            "--no-memprobe",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let mpmd = |second: &str| -> Result<Output> {
        let mut c = Command::new("mpirun");
        c.arg("--oversubscribe").args(rank("data")).arg(":").args(rank(second));
        c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        Ok(c.output()?)
    };
    let started = std::time::Instant::now();
    let out = mpmd("empty")?;
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed().as_secs() < 60, "took {:?}", started.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rank 1"), "{stderr}");
    let run = std::fs::read_dir(results.join("tiny"))?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.is_dir());
    let manifest = std::fs::read_to_string(run.context("no run folder")?.join("manifest.json"))?;
    assert!(manifest.contains("failed") && manifest.contains("rank 1"), "{manifest}");
    // With the data on both ranks the same command trains it.
    let again = mpmd("data")?;
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let done = std::fs::read_dir(results.join("tiny"))?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.is_dir());
    let manifest = std::fs::read_to_string(done.context("no run folder")?.join("manifest.json"))?;
    assert!(manifest.contains("\"done\""), "{manifest}");
    Ok(())
}

/// A rank killed with SIGKILL mid-run ends every other rank within a minute; rank 0 records the run as
/// failed, naming the dead rank (Open MPI's launcher names it too), so the next `sdp run` trains it again.
#[test]
fn a_killed_rank_ends_the_job_and_a_rerun_trains_the_run() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    // Long enough to be killed mid-run (thousands of steps on the tiny model).
    let text = spec(METHODS[1].1, 400);
    std::fs::write(dir.join("exp.toml"), &text)?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (spec_path, results) = (s(&dir.join("exp.toml")), s(&dir.join("r")));
    let mut job = Command::new("mpirun")
        .args(["--oversubscribe", "-np", "2", env!("CARGO_BIN_EXE_sdp"), "run", &spec_path])
        .args(["--results-dir", &results, "--no-memprobe", "--progress-secs", "0.2"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Rank 1: the child of mpirun whose environment says so.
    let rank1 = (0..200)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            child_with_env(job.id(), "OMPI_COMM_WORLD_RANK=1")
        })
        .context("rank 1 never started")?;
    std::thread::sleep(std::time::Duration::from_secs(2)); // training by now
    let killed = std::time::Instant::now();
    // SAFETY: signalling a process this test started (a child of its mpirun).
    unsafe { libc::kill(rank1 as i32, libc::SIGKILL) };
    let status = loop {
        if let Some(st) = job.try_wait()? {
            break st;
        }
        ensure!(killed.elapsed().as_secs() < 60, "the job outlived its killed rank by a minute");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut job.stderr.take().context("stderr")?, &mut stderr)?;
    assert!(stderr.contains("rank 1"), "{stderr}");
    // Recorded failed, naming the rank.
    let run = std::fs::read_dir(dir.join("r/tiny"))?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.is_dir());
    let manifest = std::fs::read_to_string(run.context("no run folder")?.join("manifest.json"))?;
    assert!(manifest.contains("failed: rank 1 (pid") && manifest.contains("died while the run trained"), "{manifest}");
    Ok(())
}

/// The pid of a child of `parent` whose environment contains `entry`.
fn child_with_env(parent: u32, entry: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Field 4 (after the parenthesised command) is the parent pid.
        let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        if env.split(|&b| b == 0).any(|v| v == entry.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

// ----- checkpoints of a spread run -----

/// The tiny SDP run (K = 4, block masking, C = 0.5, forward regime) with augmentation, momentum, weight
/// decay and a cosine schedule, so that a resumed run must restore every piece of state: `epochs` epochs of
/// 2 steps.
fn resumable(method: &str, epochs: usize) -> String {
    tiny_with(&[
        (
            "epochs = 2\nbatch_size = 8\n",
            &format!("epochs = {epochs}\nbatch_size = 8\naugment = {{ crop_pad = 2, flip = true }}\n"),
        ),
        ("lr = 0.05\n", "lr = 0.05\nmomentum = 0.9\nweight_decay = 5e-4\nschedule = \"cosine\"\n"),
        ("[method]\nworkers = 2\n", method),
    ])
}

/// `sdp run SPEC --results-dir RESULTS --no-memprobe EXTRA…` as owned strings.
fn run_args(spec: &Path, results: &Path, extra: &[&str]) -> Vec<String> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mut v = vec!["run".to_string(), s(spec), "--results-dir".into(), s(results), "--no-memprobe".into()];
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

/// Runs `sdp run` over `np` processes to its end; returns its stderr.
fn finish(np: usize, spec: &Path, results: &Path) -> Result<String> {
    let out = sdp_command(np, &run_args(spec, results, &[])).output()?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "np {np}: {log}");
    Ok(log)
}

/// Where a signal goes.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// One rank (under mpirun), or the process itself.
    Rank(usize),
    /// `mpirun` itself (which passes a SIGTERM on to every rank).
    Launcher,
}

/// Starts `sdp run` over `np` processes checkpointing every step; once its checkpoint is at step `at` or
/// later, sends `signal` to `target` and waits for the job to end.
fn interrupt(
    np: usize,
    spec: &Path,
    results: &Path,
    run_dir: &Path,
    at: usize,
    signal: i32,
    target: Target,
) -> Result<()> {
    let mut job = sdp_command(np, &run_args(spec, results, &["--checkpoint-steps", "1"]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let t = std::time::Instant::now();
    while sdp::checkpoint::peek(run_dir).is_none_or(|c| c.step < at) {
        if let Some(st) = job.try_wait()? {
            anyhow::bail!("np {np}: the run ended ({st}) before its checkpoint reached step {at}");
        }
        ensure!(t.elapsed().as_secs() < 120, "np {np}: no checkpoint at step {at} after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let pid = match target {
        Target::Rank(r) if np > 1 => child_with_env(job.id(), &format!("OMPI_COMM_WORLD_RANK={r}"))
            .with_context(|| format!("rank {r} not found"))?,
        _ => job.id(),
    };
    // SAFETY: signalling a process this test started (or a child of its mpirun).
    unsafe { libc::kill(pid as i32, signal) };
    let out = job.wait_with_output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(log.contains("interrupted (resumes from its checkpoint)"), "np {np}, {target:?}: {log}");
    Ok(())
}

/// Writes `text` as `dir/exp.toml` and trains it uninterrupted over 4 processes into `dir/reference`:
/// the spec's path and the reference run's folder (named by its run id).
fn reference(dir: &Path, text: &str) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let spec = dir.join("exp.toml");
    std::fs::write(&spec, text)?;
    let reference = dir.join("reference");
    finish(4, &spec, &reference)?;
    Ok((spec, run_folder(&reference)?))
}

/// The run folder of the one run in `results`.
fn run_folder(results: &Path) -> Result<std::path::PathBuf> {
    let exp = results.join("tiny");
    std::fs::read_dir(&exp)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .with_context(|| format!("no run folder in {}", exp.display()))
}

/// A copy of `from`'s results folder at `to`.
fn copy_results(from: &Path, to: &Path) -> Result<()> {
    let out = Command::new("cp").arg("-r").arg(from).arg(to).output()?;
    ensure!(out.status.success(), "cp: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// metrics.csv of two runs agree: the same rows and columns, losses to `rel` (relative), every accuracy
/// column to one test image in 40; `rel = 0` asks for the same text (bit for bit), clock columns aside.
fn agree(a: &Path, b: &Path, rel: f64, what: &str) -> Result<()> {
    let (x, y) = (common::metrics_without_clock(a)?, common::metrics_without_clock(b)?);
    if rel == 0.0 {
        ensure!(x == y, "{what}: metrics differ:\n{x:?}\n{y:?}");
        return Ok(());
    }
    ensure!(x[0] == y[0] && x.len() == y.len(), "{what}: {:?} vs {:?}", x[0], y[0]);
    for (r, s) in x[1..].iter().zip(&y[1..]) {
        for (i, name) in x[0].iter().enumerate() {
            let (p, q): (f64, f64) = match (r[i].parse(), s[i].parse()) {
                (Ok(p), Ok(q)) => (p, q),
                _ => {
                    ensure!(r[i] == s[i], "{what}: {name} {} vs {}", r[i], s[i]);
                    continue;
                }
            };
            let tol = if name.starts_with("test_acc") { 1.0 / 40.0 + 1e-9 } else { rel * p.abs().max(1.0) };
            ensure!((p - q).abs() <= tol, "{what}: {name} {p} vs {q}");
        }
    }
    Ok(())
}

/// The checkpoint's tensor files.
fn tensor_files(run: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoint"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.retain(|n| n.starts_with("state-"));
    names.sort();
    Ok(names)
}

/// A 4-rank SDP run stopped by SIGTERM to rank 2 checkpoints every rank's workers at one step (a file per
/// rank) and ends `interrupted`. Resumed at 4 ranks it ends in the uninterrupted 4-rank run's metrics.csv
/// bit for bit (clock columns aside). The same checkpoint resumed at 2 ranks and in one process (workers
/// re-hosted) ends equal to within float rounding: N processes sum each coordinate's holders in another
/// order (each rank sums its own workers, then the ranks' sums are added), so the steps after the
/// resumption round differently (seen over 19 steps: losses within 3e-5 relative, accuracies equal; checked
/// to 1e-4; the difference grows with the steps trained after the resumption). A one-process checkpoint
/// resumes at 4 ranks the same way.
#[test]
fn a_spread_run_resumes_at_any_process_count() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (spec, reference) = reference(dir, &resumable(METHODS[1].1, 12))?;
    let want = reference.join("metrics.csv");
    let run_dir = |results: &Path| -> Result<std::path::PathBuf> {
        let id = want.parent().and_then(|p| p.file_name()).context("run id")?;
        Ok(results.join("tiny").join(id))
    };

    let first = dir.join("first");
    interrupt(4, &spec, &first, &run_dir(&first)?, 5, libc::SIGTERM, Target::Rank(2))?;
    let m = sdp::results::Manifest::read(&run_dir(&first)?.join("manifest.json"))?;
    assert_eq!(m.status, sdp::results::Status::Interrupted);
    let files = tensor_files(&run_dir(&first)?)?;
    assert_eq!(files.len(), 4, "{files:?}");
    assert!(files.iter().any(|f| f.ends_with(".rank3of4.safetensors")), "{files:?}");
    for name in ["at2", "at1"] {
        copy_results(&first, &dir.join(name))?;
    }
    let log = finish(4, &spec, &first)?;
    assert!(log.contains("resuming from its checkpoint at step"), "{log}");
    agree(&want, &run_dir(&first)?.join("metrics.csv"), 0.0, "4 -> 4")?;

    // Re-hosted: at 2 processes, and in one.
    for (name, np) in [("at2", 2), ("at1", 1)] {
        let log = finish(np, &spec, &dir.join(name))?;
        assert!(log.contains("resuming from its checkpoint at step"), "{log}");
        agree(&want, &run_dir(&dir.join(name))?.join("metrics.csv"), 1e-4, &format!("4 -> {np}"))?;
    }

    // A one-process checkpoint resumed at 4 processes.
    let solo = dir.join("solo");
    interrupt(1, &spec, &solo, &run_dir(&solo)?, 5, libc::SIGTERM, Target::Rank(0))?;
    assert_eq!(tensor_files(&run_dir(&solo)?)?.len(), 1);
    let log = finish(4, &spec, &solo)?;
    assert!(log.contains("resuming from its checkpoint at step"), "{log}");
    agree(&want, &run_dir(&solo)?.join("metrics.csv"), 1e-4, "1 -> 4")?;
    Ok(())
}

/// A Ctrl-C to `mpirun` (which forwards it to every rank) checkpoints a spread run like a SIGTERM to one
/// rank does: stopped once each way, resumed twice at 4 ranks, the run ends in the uninterrupted run's
/// metrics.csv bit for bit, its manifest listing both resumptions. 60 steps: on a loaded machine mpirun
/// took over a second to forward the signal, and a 24-step run once ended first.
#[test]
fn a_ctrl_c_to_the_launcher_checkpoints_a_spread_run_that_resumes_bit_for_bit() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (spec, reference) = reference(dir, &resumable(METHODS[1].1, 30))?;
    let want = reference.join("metrics.csv");
    let results = dir.join("results");
    let run = results.join("tiny").join(reference.file_name().context("run id")?);
    interrupt(4, &spec, &results, &run, 5, libc::SIGTERM, Target::Rank(2))?;
    interrupt(4, &spec, &results, &run, 12, libc::SIGINT, Target::Launcher)?;
    let log = finish(4, &spec, &results)?;
    assert!(log.contains("resuming from its checkpoint at step"), "{log}");
    agree(&want, &run.join("metrics.csv"), 0.0, "4 -> 4 -> 4")?;
    let m = sdp::results::Manifest::read(&run.join("manifest.json"))?;
    let resumed = m.extra.get("resumed_at_steps").and_then(|v| v.as_array()).map_or(0, Vec::len);
    assert_eq!((m.status, resumed), (sdp::results::Status::Done, 2));
    Ok(())
}

/// DP spread over 4 ranks: every rank holds the same model, so rank 0's file alone is the checkpoint; a
/// run stopped by SIGTERM to rank 3 resumes at 4 ranks to the uninterrupted run's metrics bit for bit, and
/// at 2 ranks to within float rounding.
#[test]
fn a_spread_dp_run_resumes_from_rank_0s_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (spec, want) = reference(dir, &resumable(METHODS[0].1, 6))?;
    let id = want.file_name().context("run id")?.to_string_lossy().into_owned();
    let results = dir.join("results");
    let run = results.join("tiny").join(&id);
    interrupt(4, &spec, &results, &run, 3, libc::SIGTERM, Target::Rank(3))?;
    let files = tensor_files(&run)?;
    assert!(files.len() == 1 && !files[0].contains(".rank"), "{files:?}");
    copy_results(&results, &dir.join("at2"))?;
    let log = finish(4, &spec, &results)?;
    assert!(log.contains("resuming from its checkpoint at step"), "{log}");
    agree(&want.join("metrics.csv"), &run.join("metrics.csv"), 0.0, "dp 4 -> 4")?;
    let log = finish(2, &spec, &dir.join("at2"))?;
    assert!(log.contains("resuming from its checkpoint at step"), "{log}");
    agree(&want.join("metrics.csv"), &dir.join("at2/tiny").join(&id).join("metrics.csv"), 1e-5, "dp 4 -> 2")?;
    Ok(())
}

/// A checkpoint that does not fit is refused with an error naming its file: a 4-rank checkpoint without
/// rank 2's file, resumed at 4 ranks (rank 2 names the file, rank 0 names rank 2, and the run starts
/// afresh on every rank, ending in the uninterrupted run's metrics); the same read in one process; one read
/// for a run of another worker count.
#[test]
fn a_checkpoint_without_a_rank_part_or_of_another_worker_count_is_refused_naming_the_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (spec, want) = reference(dir, &resumable(METHODS[2].1, 4))?;
    let id = want.file_name().context("run id")?.to_string_lossy().into_owned();
    let results = dir.join("results");
    let run = results.join("tiny").join(&id);
    interrupt(4, &spec, &results, &run, 3, libc::SIGTERM, Target::Rank(1))?;
    let part =
        tensor_files(&run)?.into_iter().find(|f| f.ends_with(".rank2of4.safetensors")).context("rank 2's file")?;
    let part = run.join("checkpoint").join(part);

    // Of another worker count (here read for a run of 2 workers).
    let e = sdp::checkpoint::load_collective(&sdp::comm::World::solo(), &run, &id, 2, &Device::Cpu)
        .err()
        .context("accepted")?;
    let e = format!("{e:#}");
    let json = run.join("checkpoint/checkpoint.json");
    assert!(e.contains(&format!("{}: a checkpoint of 4 workers, but the run has 2", json.display())), "{e}");

    std::fs::remove_file(&part)?;
    let e = sdp::checkpoint::load(&run, &id, &Device::Cpu).err().context("accepted")?;
    assert!(format!("{e:#}").contains(&format!("reading checkpoint {}", part.display())), "{e:#}");
    let log = finish(4, &spec, &results)?;
    for said in [
        format!("rank 2: reading checkpoint {}", part.display()),
        "rank 2 could not read its share of the checkpoint".to_string(),
        "ignoring its checkpoint and starting afresh".to_string(),
    ] {
        assert!(log.contains(&said), "{said:?} not in {log}");
    }
    assert!(!log.contains("resuming from its checkpoint"), "{log}");
    agree(&want.join("metrics.csv"), &run.join("metrics.csv"), 0.0, "started afresh")?;
    Ok(())
}

/// A rank that cannot write its part of a checkpoint (rank 2: a folder stands where its file goes) fails
/// the checkpoint on every rank together: rank 0 records the run failed, naming the step and rank 2 (whose
/// log names the file), no rank aborts the job, and the checkpoint before stays; with the folder gone,
/// the next run resumes from it.
#[test]
fn a_rank_that_cannot_write_its_part_fails_the_run_on_every_rank() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let spec = dir.join("exp.toml");
    std::fs::write(&spec, resumable(METHODS[1].1, 4))?;
    let out = sdp(1, &["check", &spec.to_string_lossy()])?;
    let id = String::from_utf8(out.stdout)?.split('\t').nth(1).context("a run id")?.to_string();
    let results = dir.join("results");
    let run = results.join("tiny").join(&id);
    let blocked = run.join("checkpoint/state-000000003.rank2of4.safetensors");
    std::fs::create_dir_all(&blocked)?;
    let out = sdp_command(4, &run_args(&spec, &results, &["--checkpoint-steps", "1"])).output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("writing {}", blocked.display())), "{log}");
    assert!(!log.contains("MPI_ABORT"), "{log}");
    let m = sdp::results::Manifest::read(&run.join("manifest.json"))?;
    let want = "checkpoint at step 3 not written: rank 2 could not write its part of the checkpoint (its log says why)";
    assert_eq!(m.status, sdp::results::Status::Failed(want.into()));
    assert_eq!(sdp::checkpoint::peek(&run).map(|c| c.step), Some(2));
    std::fs::remove_dir(&blocked)?;
    let log = finish(4, &spec, &results)?;
    assert!(log.contains("resuming from its checkpoint at step 2"), "{log}");
    Ok(())
}

/// A rank on another node than rank 0's (rank 3, told so by `SDP_PEER_HOST`) killed with SIGKILL: rank 0
/// sees its heartbeat stop and records the run failed, naming the rank and its host, before the launcher
/// ends the job (mpirun signals the other ranks about 1 s after the death and kills them 1 s later); a
/// SIGTERM to the launcher while every rank lives leaves the run `interrupted`, not failed. With a launcher
/// that leaves the other ranks running (`--mca orte_enable_recovery 1`), rank 0 records the death once the
/// heartbeat has stood still for `SDP_PEER_TIMEOUT_S` (3 s here; 30 by default), and exits; the other
/// ranks are then the launcher's to end.
#[test]
fn a_rank_dying_on_another_node_is_recorded_naming_it() -> Result<()> {
    for recovery in [false, true] {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        std::fs::write(dir.join("exp.toml"), spec(METHODS[1].1, 400))?;
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let (spec_path, results) = (s(&dir.join("exp.toml")), s(&dir.join("r")));
        let exe = env!("CARGO_BIN_EXE_sdp");
        let args = ["run", &spec_path, "--results-dir", &results, "--no-memprobe"];
        // Ranks 0-2 on this node, rank 3 "elsewhere"; their log in a file.
        let start = |n: usize| -> Result<std::process::Child> {
            let mut launch = Command::new("mpirun");
            launch.arg("--oversubscribe");
            if recovery {
                launch.args(["--mca", "orte_enable_recovery", "1"]);
            }
            launch.args(["-np", "3", exe]).args(args).args([":", "-np", "1", "env", "SDP_PEER_HOST=elsewhere", exe]);
            Ok(launch
                .args(args)
                .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
                .env("RAYON_NUM_THREADS", "1")
                .env("SDP_PEER_TIMEOUT_S", "3")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("log{n}")))?)
                .spawn()?)
        };
        // Training once rank 3's heartbeat is there; returns the run folder.
        let training = || -> Result<std::path::PathBuf> {
            let t = std::time::Instant::now();
            loop {
                let found = std::fs::read_dir(dir.join("r/tiny")).ok().and_then(|d| {
                    d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.join("ranks/rank3.beat").exists())
                });
                if let Some(run) = found {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    return Ok(run);
                }
                ensure!(t.elapsed().as_secs() < 60, "no heartbeat of rank 3 after 60 s");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        };
        if !recovery {
            let mut job = start(0)?;
            let run = training()?;
            // SAFETY: signalling the mpirun this test started.
            unsafe { libc::kill(job.id() as i32, libc::SIGTERM) };
            job.wait()?;
            let m = sdp::results::Manifest::read(&run.join("manifest.json"))?;
            let log = std::fs::read_to_string(dir.join("log0"))?;
            assert_eq!(m.status, sdp::results::Status::Interrupted, "{log}");
        }
        let mut job = start(1)?;
        let run = training()?;
        let rank3 = child_with_env(job.id(), "OMPI_COMM_WORLD_RANK=3").context("rank 3 not found")?;
        let killed = std::time::Instant::now();
        // SAFETY: signalling a process this test started (a child of its mpirun).
        unsafe { libc::kill(rank3 as i32, libc::SIGKILL) };
        let failed =
            |m: &str| m.contains(&format!("failed: rank 3 (pid {rank3} on elsewhere) died while the run trained"));
        loop {
            let manifest = std::fs::read_to_string(run.join("manifest.json"))?;
            if failed(&manifest) {
                break;
            }
            let ended = job.try_wait()?.is_some();
            let log = std::fs::read_to_string(dir.join("log1"))?;
            ensure!(!ended && killed.elapsed().as_secs() < 60, "recovery {recovery}: not recorded: {manifest}\n{log}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let secs = killed.elapsed().as_secs_f64();
        eprintln!("recovery {recovery}: rank 3's death recorded {secs:.1} s after the kill");
        assert!(secs < if recovery { 20.0 } else { 2.5 }, "recovery {recovery}: recorded after {secs:.1} s");
        // Rank 0 has exited; mpirun ends the other ranks, unless told to recover (then the test ends them).
        if recovery {
            // SAFETY: signalling the mpirun this test started.
            unsafe { libc::kill(job.id() as i32, libc::SIGTERM) };
        }
        while job.try_wait()?.is_none() {
            ensure!(killed.elapsed().as_secs() < 60, "recovery {recovery}: the job outlived rank 0's record");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    Ok(())
}
