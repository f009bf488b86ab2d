//! The `sdp` command line: `main` only calls `run()` and maps its outcome to an exit code.

use anyhow::Result;
use clap::{Parser, Subcommand};
use sdp::runner::{self, RunOptions};
use sdp::spec::{self, SpecError};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "sdp", version, about = "Subnetwork Data Parallelism benchmark suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
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
    },
    /// Benchmarks: `bench step` times a training step (see `sdp::bench`).
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
    /// Samples per split and class, image size, md5 status and cache of NAME or folder:PATH.
    Info {
        name: String,
        #[arg(long, default_value = "datasets")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Parameters per unit group and in total (resnet18 | wrn18 | swin_t).
    Info {
        name: String,
        #[arg(long, default_value_t = 10)]
        classes: usize,
    },
}

fn main() -> ExitCode {
    sdp::runtime::tune_for_training();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.is::<SpecError>() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn load_specs(args: &SpecArgs) -> Result<Vec<spec::Experiment>> {
    args.specs.iter().map(|p| spec::load(p, &args.set)).collect()
}

fn print_runs(exps: &[spec::Experiment]) {
    for e in exps {
        for r in &e.runs {
            println!("{}\t{}\t{}", e.name, r.id, r.label);
        }
    }
}

fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { spec, cost, device, cost_cache, remeasure, data_dir } => {
            // A bad device is reported before any spec is read.
            let opts = match cost {
                true => Some(sdp::cost::CostOptions {
                    remeasure,
                    ..sdp::cost::CostOptions::new(&device, cost_cache, &data_dir)?
                }),
                false => None,
            };
            let exps = load_specs(&spec)?;
            match opts {
                Some(opts) => print!("{}", sdp::cost::estimate(&exps, &opts)?.render()),
                None => print_runs(&exps),
            }
            let n: usize = exps.iter().map(|e| e.runs.len()).sum();
            eprintln!("{} spec(s) valid, {n} run(s)", exps.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { spec, only, dry_run, force, results_dir, data_dir, device } => {
            let exps = load_specs(&spec)?;
            let dev = runner::parse_device(&device).map_err(|e| SpecError(format!("{e:#}")))?;
            if dry_run {
                print_runs(&exps);
                return Ok(ExitCode::SUCCESS);
            }
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            ctrlc::set_handler(move || {
                if flag.swap(true, Ordering::SeqCst) {
                    std::process::exit(130); // a second Ctrl-C: stop now
                }
                eprintln!("\ninterrupt: finishing the current step, then stopping (Ctrl-C again to abort)");
            })?;
            let memprobe = std::env::current_exe().ok();
            let opts =
                RunOptions { results_dir, data_dir, device: dev, device_name: device, force, only, stop, memprobe };
            let out = runner::run_all(&exps, &opts)?;
            eprintln!("{} done, {} skipped, {} failed", out.done, out.skipped, out.failed);
            Ok(if out.interrupted {
                ExitCode::from(130)
            } else if out.failed > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Data { command: DataCommand::Fetch { name, data_dir } } => {
            sdp::data::fetch::fetch(&name, &data_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Data { command: DataCommand::Info { name, data_dir } } => {
            println!("{}", sdp::data::fetch::info(&name, &data_dir)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Model { command: ModelCommand::Info { name, classes } } => {
            let report = sdp::models::info::info_report(&name, classes).map_err(|e| SpecError(format!("{e:#}")))?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Memprobe { spec, set, only, resolved, worker, steps, device } => {
            let run_spec = match (spec, resolved) {
                (_, Some(path)) => sdp::results::read_resolved_spec(&path)?,
                (Some(path), None) => {
                    let exp = spec::load(&path, &set)?;
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
            let dev = sdp::runner::parse_device(&device).map_err(|e| SpecError(format!("{e:#}")))?;
            let p = sdp::memprobe::probe(&run_spec, worker, steps, &dev)?;
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
                eprintln!(
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
        Command::List { results_dir } => {
            let runs = sdp::results::list(&results_dir)?;
            if runs.is_empty() {
                eprintln!("no runs under {}", results_dir.display());
            }
            for (exp, id, m) in runs {
                let acc = m.final_metrics.map(|f| format!("{:.4}", f.test_acc)).unwrap_or_else(|| "-".into());
                println!("{exp}\t{id}\t{}\t{acc}\t{}", m.status, m.label);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
