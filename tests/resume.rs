//! Runs that survive: a run stopped at any step (crash, SIGKILL, SIGTERM) and resumed from its checkpoint
//! ends in the same metrics.csv as an uninterrupted run, bit for bit apart from the wall-clock columns; one
//! owner per run folder; summary.csv rebuilt from the folder; the smaller CLI behaviours around runs.

mod common;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use common::{metrics_without_clock, run_options, tiny_with};
use sdp::checkpoint::{self, TrainState};
use sdp::comm::World;
use sdp::plan;
use sdp::results::{Final, Manifest, MetricsRow, Status};
use sdp::runner::{run_all, run_all_with, Policy, RunOptions};
use sdp::spec::{self, Experiment};
use sdp::train::{self, At, Observer};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// The tiny experiment over three epochs with augmentation, momentum, weight decay and a cosine schedule,
/// so that a resumed run must restore every piece of state.
static TINY: LazyLock<String> = LazyLock::new(|| {
    tiny_with(&[
        ("epochs = 2\nbatch_size = 8\n", "epochs = 3\nbatch_size = 8\naugment = { crop_pad = 2, flip = true }\n"),
        ("lr = 0.05\n", "lr = 0.05\nmomentum = 0.9\nweight_decay = 5e-4\nschedule = \"cosine\"\n"),
    ])
});

const SDP: &[&str] =
    &["method.kind=\"sdp\"", "method.masking=\"block\"", "method.regime=\"forward\"", "method.coverage=0.5"];

fn parse(sets: &[&str]) -> Result<Experiment> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    plan::parse(&TINY, Path::new("tiny.toml"), &sets)
}

/// A row without its wall-clock columns (img_per_s, wall_s), as exact text.
fn clockless(r: &MetricsRow) -> String {
    let modes: Vec<String> = r.modes.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!(
        "{} {} {:?} {:?} {:?} {:?} {}",
        r.epoch,
        r.step,
        r.train_loss,
        r.test_loss,
        r.test_metric,
        r.lr,
        modes.join(",")
    )
}

/// Checkpoints after every step and epoch; "crashes" (fails) right after saving the one at `crash_at`.
struct Crashing {
    dir: PathBuf,
    run_id: String,
    crash_at: Option<usize>,
    rows: Vec<MetricsRow>,
}

impl Observer for Crashing {
    fn step(&mut self, _: usize, _: usize, _: usize, _: f64) {}
    fn eval(&mut self, row: &MetricsRow) -> Result<()> {
        self.rows.push(row.clone());
        Ok(())
    }
    fn interrupted(&self) -> bool {
        false
    }
    fn checkpoint_due(&mut self, _: At) -> bool {
        true
    }
    fn checkpoint(&mut self, state: &TrainState) -> Result<()> {
        checkpoint::save(&self.dir, &self.run_id, state)?;
        if Some(state.step) == self.crash_at {
            bail!("simulated crash after the checkpoint at step {}", state.step);
        }
        Ok(())
    }
}

/// Crashing after the checkpoint of every step (mid-epoch, epoch boundaries, the last step) and resuming
/// gives the uninterrupted run's evaluations exactly; the resumed run's rows are the checkpoint's plus
/// its own. SDP with a new selection every 3 steps checks that the selection in force is restored too.
/// Trains `spec` in this process from a checkpoint's `state` on.
fn resume(spec: &spec::RunSpec, data: &sdp::data::Dataset, obs: &mut dyn Observer, state: TrainState) -> Result<Final> {
    train::train_from(spec, &plan::Plan::of(spec)?, data, &Device::Cpu, obs, Some(state), &World::solo())
}

#[test]
fn resuming_after_any_step_gives_the_uninterrupted_metrics() -> Result<()> {
    let variants: [&[&str]; 3] = [&[], SDP, &[SDP, &["method.resample_every=3", "method.sync_every=2"]].concat()];
    for sets in variants {
        let run = parse(sets)?.runs.remove(0);
        let data = sdp::data::load(&run.spec.workload, Path::new("datasets"))?;
        let dir = tempfile::tempdir()?;
        let mut whole =
            Crashing { dir: dir.path().join("whole"), run_id: run.id.clone(), crash_at: None, rows: vec![] };
        let fin = train::train(&run.spec, &data, &Device::Cpu, &mut whole)?;
        let expected: Vec<String> = whole.rows.iter().map(clockless).collect();
        assert_eq!(expected.len(), 3, "{sets:?}");
        // 64 samples / (2 workers × 8) = 4 steps an epoch, 12 in all.
        for crash_at in [1, 4, 6, 11, 12] {
            let rd = dir.path().join(format!("at{crash_at}"));
            let mut first =
                Crashing { dir: rd.clone(), run_id: run.id.clone(), crash_at: Some(crash_at), rows: vec![] };
            let e = train::train(&run.spec, &data, &Device::Cpu, &mut first).err().context("no crash")?;
            assert!(format!("{e:#}").contains("simulated crash"), "{e:#}");
            let state = checkpoint::load(&rd, &run.id, &Device::Cpu)?.context("no checkpoint")?;
            assert_eq!(state.step, crash_at);
            let mut rows = state.rows.clone();
            let mut second = Crashing { dir: rd, run_id: run.id.clone(), crash_at: None, rows: vec![] };
            let f = resume(&run.spec, &data, &mut second, state)?;
            rows.extend(second.rows);
            assert_eq!(rows.iter().map(clockless).collect::<Vec<_>>(), expected, "{sets:?}, crash at {crash_at}");
            let strip = |f: &Final| (f.epoch, f.step, f.train_loss.to_bits(), f.test_metric.to_bits());
            assert_eq!(strip(&f), strip(&fin), "{sets:?}, crash at {crash_at}");
        }
    }
    Ok(())
}

#[test]
fn a_checkpoint_of_another_shape_is_refused_naming_the_tensor() -> Result<()> {
    let exp = parse(&[])?;
    let run = &exp.runs[0];
    let data = sdp::data::load(&run.spec.workload, Path::new("datasets"))?;
    let dir = tempfile::tempdir()?;
    let mut obs = Crashing { dir: dir.path().to_path_buf(), run_id: run.id.clone(), crash_at: Some(2), rows: vec![] };
    assert!(train::train(&run.spec, &data, &Device::Cpu, &mut obs).is_err());
    let mut state = checkpoint::load(dir.path(), &run.id, &Device::Cpu)?.context("checkpoint")?;
    let key = "net/model/linear.weight".to_string();
    let w = state.tensors.get(&key).context("fc.weight in the checkpoint")?;
    state.tensors.insert(key, w.narrow(0, 0, 3)?);
    let mut obs = Crashing { dir: dir.path().to_path_buf(), run_id: run.id.clone(), crash_at: None, rows: vec![] };
    let e = resume(&run.spec, &data, &mut obs, state).err().context("accepted")?;
    let e = format!("{e:#}");
    assert!(
        e.contains("checkpoint tensor `net/model/linear.weight` has shape [3, 8], the model expects [10, 8]"),
        "{e}"
    );
    Ok(())
}

/// A checkpoint read for a run of another worker count, or whose JSON names a tensor file that is not
/// there (a rank's part of a run spread over processes), is refused naming the file; a checkpoint of
/// format 1 (one tensor file, no worker count) still resumes to the uninterrupted metrics.
#[test]
fn checkpoints_of_another_worker_count_or_missing_a_file_are_refused_and_format_1_resumes() -> Result<()> {
    let run = parse(SDP)?.runs.remove(0);
    let data = sdp::data::load(&run.spec.workload, Path::new("datasets"))?;
    let tmp = tempfile::tempdir()?;
    let mut whole = Crashing { dir: tmp.path().join("whole"), run_id: run.id.clone(), crash_at: None, rows: vec![] };
    train::train(&run.spec, &data, &Device::Cpu, &mut whole)?;
    let rd = tmp.path().join("run");
    let mut first = Crashing { dir: rd.clone(), run_id: run.id.clone(), crash_at: Some(5), rows: vec![] };
    assert!(train::train(&run.spec, &data, &Device::Cpu, &mut first).is_err());
    let json = checkpoint::dir(&rd).join("checkpoint.json");
    let stored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!((stored["format"].as_u64(), stored["workers"].as_u64()), (Some(2), Some(2)), "{stored}");
    let solo = World::solo();

    let e = checkpoint::load_collective(&solo, &rd, &run.id, 4, &Device::Cpu).err().context("accepted")?;
    let e = format!("{e:#}");
    assert!(e.contains(&format!("{}: a checkpoint of 2 workers, but the run has 4", json.display())), "{e}");

    // Worker 1 said to be in a file of its own (rank 1's of 2), which is not there.
    let mut split = stored.clone();
    split["parts"] = serde_json::json!([
        { "file": "state-000000005.safetensors", "workers": [0] },
        { "file": "state-000000005.rank1of2.safetensors", "workers": [1] },
    ]);
    std::fs::write(&json, serde_json::to_string(&split)?)?;
    let e = checkpoint::load_collective(&solo, &rd, &run.id, 2, &Device::Cpu).err().context("accepted")?;
    let missing = checkpoint::dir(&rd).join("state-000000005.rank1of2.safetensors");
    assert!(format!("{e:#}").contains(&format!("reading checkpoint {}", missing.display())), "{e:#}");

    // Format 1.
    let mut old = stored.clone();
    let o = old.as_object_mut().context("an object")?;
    o.insert("format".into(), 1.into());
    for key in ["workers", "ranks", "parts"] {
        o.remove(key);
    }
    std::fs::write(&json, serde_json::to_string(&old)?)?;
    let state = checkpoint::load_collective(&solo, &rd, &run.id, 2, &Device::Cpu)?.context("no checkpoint")?;
    let mut rows = state.rows.clone();
    let mut second = Crashing { dir: rd, run_id: run.id.clone(), crash_at: None, rows: vec![] };
    resume(&run.spec, &data, &mut second, state)?;
    rows.extend(second.rows);
    let expected: Vec<String> = whole.rows.iter().map(clockless).collect();
    assert_eq!(rows.iter().map(clockless).collect::<Vec<_>>(), expected);
    Ok(())
}

// ----- the binary: SIGKILL, SIGTERM -----

fn sdp_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sdp"));
    c.args(args);
    c
}

fn write_spec(dir: &Path, sets: &[&str]) -> Result<PathBuf> {
    // The spec file carries the overrides, so the binary and run_all see the same run id.
    let path = dir.join("tiny.toml");
    let mut doc: toml_edit::DocumentMut = TINY.parse()?;
    for s in sets {
        let (k, v) = s.split_once('=').context("k=v")?;
        let value = toml_edit::Item::Value(v.parse::<toml_edit::Value>()?);
        match k.split_once('.') {
            Some((table, key)) => doc[table][key] = value,
            None => doc[k] = value,
        }
    }
    std::fs::write(&path, doc.to_string())?;
    Ok(path)
}

/// Starts `sdp run` checkpointing every step; waits until its checkpoint is at `step` or later.
fn start_and_wait(spec: &Path, results: &Path, run_dir: &Path, step: usize) -> Result<Child> {
    let mut child =
        sdp_cmd(&common::run_args(spec, results, &["--checkpoint-steps", "1"])?).stderr(Stdio::null()).spawn()?;
    let t = Instant::now();
    loop {
        if checkpoint::peek(run_dir).is_some_and(|c| c.step >= step) {
            return Ok(child);
        }
        if let Some(st) = child.try_wait()? {
            bail!("the run ended ({st}) before its checkpoint reached step {step}");
        }
        if t.elapsed() > Duration::from_secs(120) {
            child.kill()?;
            bail!("no checkpoint at step {step} after 120 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn finish(spec: &Path, results: &Path) -> Result<()> {
    let out = sdp_cmd(&common::run_args(spec, results, &[])?).output()?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// SIGKILL mid-epoch, then SIGTERM (DP) or SIGHUP (SDP), each followed by `sdp run`: the same metrics.csv
/// as an uninterrupted run; SIGTERM and SIGHUP leave the run `interrupted` with exit code 130.
#[test]
fn killed_and_terminated_runs_resume_to_the_same_metrics() -> Result<()> {
    for sets in [&[][..], SDP] {
        let dir = tempfile::tempdir()?;
        // 6 epochs of 4 steps: the signals land well before the end.
        let spec_path = write_spec(dir.path(), &[sets, &["workload.epochs=6"]].concat())?;
        let exp = plan::load(&spec_path, &[])?;
        let id = exp.runs[0].id.clone();
        let reference = dir.path().join("reference");
        assert_eq!(run_all(std::slice::from_ref(&exp), &run_options(&reference))?.done, 1);
        let expected = metrics_without_clock(&reference.join("tiny").join(&id).join("metrics.csv"))?;

        let results = dir.path().join("results");
        let run_dir = results.join("tiny").join(&id);
        let mut child = start_and_wait(&spec_path, &results, &run_dir, 3)?;
        child.kill()?; // SIGKILL
        child.wait()?;
        assert_eq!(Manifest::read(&run_dir.join("manifest.json"))?.status, Status::Running, "killed: no chance to say");
        {
            // Resumed, then stopped by SIGTERM (DP) or SIGHUP (SDP) at a later step.
            let signal = if sets.is_empty() { libc::SIGTERM } else { libc::SIGHUP };
            let child = start_and_wait(&spec_path, &results, &run_dir, 6)?;
            // SAFETY: signalling the child we started.
            unsafe { libc::kill(child.id() as i32, signal) };
            let out = child.wait_with_output()?;
            assert_eq!(out.status.code(), Some(130));
            let m = Manifest::read(&run_dir.join("manifest.json"))?;
            assert_eq!(m.status, Status::Interrupted);
            assert!(!run_dir.join("lock.json").exists(), "the lock is released on a clean stop");
            assert!(checkpoint::peek(&run_dir).is_some_and(|c| c.step >= 6));
        }
        finish(&spec_path, &results)?;
        let m = Manifest::read(&run_dir.join("manifest.json"))?;
        assert_eq!(m.status, Status::Done, "{sets:?}");
        assert!(m.extra.get("resumed_at_steps").and_then(|v| v.as_array()).is_some_and(|a| !a.is_empty()));
        assert_eq!(metrics_without_clock(&run_dir.join("metrics.csv"))?, expected, "{sets:?}");
        assert!(!run_dir.join("checkpoint").exists(), "a finished run's checkpoint is removed");
        let names: Vec<String> = std::fs::read_dir(&run_dir)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        assert!(names.iter().all(|n| !n.starts_with('.')), "temp files left: {names:?}");
    }
    Ok(())
}

// ----- one owner per run, the summary -----

#[test]
fn a_run_held_by_a_live_process_is_skipped_and_the_summary_lists_every_finished_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exp = parse(&["workload.epochs=1"])?;
    let id = exp.runs[0].id.clone();
    let run_dir = dir.path().join("tiny").join(&id);
    // This process holds the run: run_all must leave it alone.
    let held = match sdp::lock::claim(&run_dir, Duration::from_secs(60), Duration::from_secs(1))? {
        sdp::lock::Claim::Acquired(l) => l,
        sdp::lock::Claim::Busy(_) => bail!("fresh folder busy"),
    };
    let out = run_all(std::slice::from_ref(&exp), &run_options(dir.path()))?;
    assert_eq!((out.done, out.busy), (0, 1));
    assert!(!run_dir.join("manifest.json").exists());
    let summary = std::fs::read_to_string(dir.path().join("tiny/summary.csv"))?;
    assert_eq!(summary.lines().count(), 1, "header only: {summary}");
    drop(held);
    assert_eq!(run_all(std::slice::from_ref(&exp), &run_options(dir.path()))?.done, 1);
    // Another command (another learning rate) into the same folder: both runs are in the summary.
    let other = parse(&["workload.epochs=1", "optim.lr=0.02"])?;
    assert_eq!(run_all(std::slice::from_ref(&other), &run_options(dir.path()))?.done, 1);
    let summary = std::fs::read_to_string(dir.path().join("tiny/summary.csv"))?;
    assert_eq!(summary.lines().count(), 3, "{summary}");
    assert!(summary.contains(&id) && summary.contains(&other.runs[0].id), "{summary}");
    // `sdp summary` rebuilds the same file.
    std::fs::remove_file(dir.path().join("tiny/summary.csv"))?;
    let out = sdp_cmd(&["summary", "--results-dir", dir.path().to_str().context("path")?]).output()?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(dir.path().join("tiny/summary.csv"))?, summary);
    Ok(())
}

#[test]
fn shards_split_the_grid_and_only_matching_nothing_is_an_error() -> Result<()> {
    let exp = parse(&["seeds=[0, 1, 2]", "optim.lr=[0.05, 0.1]"])?;
    let all: Vec<&str> = exp.runs.iter().map(|r| r.id.as_str()).collect();
    let mut seen = Vec::new();
    for i in 0..4 {
        let shard = Some(sdp::runner::Shard { index: i, count: 4 });
        let part = sdp::runner::select(std::slice::from_ref(&exp), &None, shard)?;
        assert_eq!(part.len(), if i < 2 { 2 } else { 1 });
        seen.extend(part.iter().map(|(_, r)| r.id.as_str()));
    }
    seen.sort();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "the shards cover the grid once");
    let e = sdp::runner::select(std::slice::from_ref(&exp), &Some("nope".into()), None).err().context("accepted")?;
    assert!(e.is::<spec::SpecError>());
    assert!(format!("{e:#}").contains("--only `nope` matches none of the 6 run(s)"), "{e:#}");
    for bad in ["4/4", "1", "a/2", "0/0"] {
        let e = bad.parse::<sdp::runner::Shard>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&format!("--shard `{bad}`: expected I/N")), "{e}");
    }
    Ok(())
}

/// A finished run stays done whatever happens to the optional memory probe, with a note.
#[test]
fn a_failing_memory_probe_leaves_the_run_done_with_a_note() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exp = parse(&["workload.epochs=1"])?;
    let o = RunOptions { memprobe: Some(PathBuf::from("/bin/false")), ..run_options(dir.path()) };
    let out = run_all_with(std::slice::from_ref(&exp), &o, &Policy::default())?;
    assert_eq!(out.done, 1);
    let m = Manifest::read(&dir.path().join("tiny").join(&exp.runs[0].id).join("manifest.json"))?;
    assert_eq!(m.status, Status::Done);
    assert!(m.final_metrics.is_some());
    let note = m.extra.get("note").and_then(|v| v.as_str()).unwrap_or_default();
    assert!(note.starts_with("memory probe not recorded: memprobe failed"), "{note}");
    Ok(())
}

#[test]
fn more_workers_than_the_data_feeds_fail_before_building_the_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let exp = parse(&["method.kind=\"sdp\"", "method.coverage=0.5", "method.workers=100000"])?;
    let t = Instant::now();
    let out = run_all(std::slice::from_ref(&exp), &run_options(dir.path()))?;
    assert_eq!(out.failed, 1);
    assert!(t.elapsed() < Duration::from_secs(20));
    let m = Manifest::read(&dir.path().join("tiny").join(&exp.runs[0].id).join("manifest.json"))?;
    let Status::Failed(reason) = m.status else { bail!("status {}", m.status) };
    assert!(reason.contains("64 training samples are fewer than one step of 100000 workers × batch 8"), "{reason}");
    let text = std::fs::read_to_string(dir.path().join("tiny").join(&exp.runs[0].id).join("manifest.json"))?;
    assert!(text.contains("\"status\": \"failed: "), "the README's `failed: reason` form: {text}");
    Ok(())
}

// ----- the command line around runs -----

#[test]
fn cli_list_summary_only_and_bad_specs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec_path = write_spec(dir.path(), &["workload.epochs=1"])?;
    let spec_s = spec_path.to_str().context("path")?;
    let results = dir.path().join("results");
    let results_s = results.to_str().context("path")?;

    // `sdp list` on a folder that does not exist: an error, exit 2.
    let out = sdp_cmd(&["list", "--results-dir", results_s]).output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no results folder"), "{out:?}");
    // `--only` matching nothing: said, exit 2.
    let out = sdp_cmd(&["run", spec_s, "--results-dir", results_s, "--only", "zzz"]).output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--only `zzz` matches none of the 1 run(s)"), "{out:?}");
    // A binary spec: exit 2.
    let bin = dir.path().join("bin.toml");
    std::fs::write(&bin, [0xffu8, 0xfe, 0x00, 0x41])?;
    let out = sdp_cmd(&["check", bin.to_str().context("path")?]).output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a UTF-8 text file"), "{out:?}");

    // Stderr is not a terminal here: progress comes as lines (one per step with --progress-secs 0).
    let out = sdp_cmd(&["run", spec_s, "--results-dir", results_s, "--progress-secs", "0"]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.lines().any(|l| l.contains(": epoch 1 step 2/4 loss ") && l.contains(" img/s ETA 0:00:")), "{err}");
    // An unreadable manifest is listed as such, and a dead owner's `running` run as stale.
    let junk = results.join("tiny").join("0000junk");
    std::fs::create_dir_all(&junk)?;
    std::fs::write(junk.join("manifest.json"), "{ not json")?;
    let id = plan::load(&spec_path, &[])?.runs[0].id.clone();
    let stale = results.join("tiny").join("0001stale");
    let mut m = Manifest::read(&results.join("tiny").join(&id).join("manifest.json"))?;
    m.status = Status::Running;
    m.write(&stale.join("manifest.json"))?;
    // A failure reason over several lines stays on one line.
    m.status = Status::Failed("decoding x.jpg:\n  truncated".into());
    m.write(&results.join("tiny").join("0002failed").join("manifest.json"))?;
    let out = sdp_cmd(&["list", "--results-dir", results_s]).output()?;
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "experiment\trun_id\tstatus\tprogress\tage\tfinal\tlabel");
    assert!(lines.iter().any(|l| l.starts_with("tiny\t0000junk\tunreadable: parsing ")), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("tiny\t0001stale\tstale\t")), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("tiny\t0002failed\tfailed: decoding x.jpg:   truncated\t")), "{text}");
    assert_eq!(lines.len(), 5, "a header and one line per run: {text}");
    let done = lines.iter().find(|l| l.starts_with(&format!("tiny\t{id}\tdone\tepoch 1 step 4\t"))).copied();
    assert!(done.is_some_and(|l| l.split('\t').nth(5).is_some_and(|f| f.starts_with("test_acc 0."))), "{text}");
    // The summary, rebuilt, ignores what is not a finished run.
    let out = sdp_cmd(&["summary", "--results-dir", results_s]).output()?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let summary = std::fs::read_to_string(results.join("tiny/summary.csv"))?;
    assert_eq!(summary.lines().count(), 2, "{summary}");
    Ok(())
}

#[test]
fn a_closed_stdout_ends_the_listing_quietly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec_path = write_spec(dir.path(), &["seeds=[0, 1, 2, 3, 4, 5, 6, 7]"])?;
    let mut child = sdp_cmd(&["check", spec_path.to_str().context("path")?])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(child.stdout.take()); // the reader is gone before the first line
    let out = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}

/// The columns of summary.csv that do not depend on the clock or the memory probe, by run id.
fn summary_without_clock(path: &Path) -> Result<Vec<Vec<String>>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let headers = r.headers()?.clone();
    let cols = ["run_id", "label", "final_test_acc", "final_test_loss", "final_train_loss"];
    let idx: Vec<usize> =
        cols.iter().map(|c| headers.iter().position(|h| h == *c).context("column")).collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec?;
        rows.push(idx.iter().map(|&i| rec[i].to_string()).collect::<Vec<_>>());
    }
    rows.sort();
    Ok(rows)
}

/// `--jobs 2`, two `--shard` processes, and two plain `sdp run` processes started together, each over one
/// folder, train every run exactly once and leave the summary one process leaves.
#[test]
fn jobs_shards_and_concurrent_processes_train_each_run_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec_path = write_spec(dir.path(), &["workload.epochs=1", "seeds=[0, 1, 2]"])?;
    let spec_s = spec_path.to_str().context("path")?.to_string();
    let folder = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let start = |results: &str, extra: &[&str]| -> Result<Child> {
        let mut args = vec!["run", spec_s.as_str(), "--results-dir", results];
        args.extend(extra);
        // One CPU thread everywhere (what each `--jobs` child gets on 2 cores): the thread count sets the
        // order of floating-point sums, and the runs are compared bit for bit.
        let mut c = sdp_cmd(&args);
        c.env("RAYON_NUM_THREADS", "1").env("CANDLE_NUM_THREADS", "1");
        Ok(c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?)
    };
    let trained = |children: Vec<Child>| -> Result<usize> {
        let mut n = 0;
        for c in children {
            let out = c.wait_with_output()?;
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert_eq!(out.status.code(), Some(0), "{err}");
            n += err.lines().filter(|l| l.contains(": done: test_acc")).count();
        }
        Ok(n)
    };
    assert_eq!(trained(vec![start(&folder("one"), &[])?])?, 3);
    let expected = summary_without_clock(&dir.path().join("one/tiny/summary.csv"))?;
    assert_eq!(expected.len(), 3);
    assert_eq!(trained(vec![start(&folder("jobs"), &["--jobs", "2"])?])?, 3, "--jobs 2");
    let shards = vec![start(&folder("shards"), &["--shard", "0/2"])?, start(&folder("shards"), &["--shard", "1/2"])?];
    assert_eq!(trained(shards)?, 3, "--shard 0/2 and 1/2");
    let pair = vec![start(&folder("pair"), &[])?, start(&folder("pair"), &[])?];
    assert_eq!(trained(pair)?, 3, "two processes over one folder");
    for name in ["jobs", "shards", "pair"] {
        assert_eq!(summary_without_clock(&dir.path().join(name).join("tiny/summary.csv"))?, expected, "{name}");
    }
    Ok(())
}
