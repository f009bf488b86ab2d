//! `sdp check --cost`: the hours a set of specs will take on a device, estimated before anything trains.
//!
//! A grid whose cost nobody can check is a grid nobody should start, and a cost worked out by hand from
//! one benchmark goes stale with every speed-up. So the estimate is built from the work the runner does
//! for each run, with every piece timed briefly on the device the runs will use:
//!
//! - **training**: `⌊train / (K·B)⌋` steps an epoch (the loader drops the remainder) times the epochs
//!   trained ([`RunSpec::train_epochs`]: flop-matched SDP trains epochs / C), each a whole simulated
//!   step as [`bench::whole_step`] times it with the step functions training itself uses, on random batches
//!   (every worker's forward, backward and update one after another, then the averaging), plus building
//!   the model and what the first, cold steps take beyond the median step;
//! - **evaluation**, every `eval_every` epochs and after the last: one eval-mode forward pass of the
//!   test split through the evaluated model (DP and the baselines). SDP records five modes: the
//!   assembled model, the recalibrated copy and (when a unit has fewer than K holders) the scaled copy
//!   cost one full forward pass each, the ensemble and the subnet mean share one pass per worker's
//!   subnetwork, the BatchNorm recalibration runs train-mode passes over up to [`RECAL_BATCHES`]
//!   training batches, and averaging the workers into the global model and building the copies is
//!   timed once;
//! - **the memory probe** after each run: `sdp memprobe` in a fresh process per worker (SDP) or once
//!   (DP and the baselines), building the model and taking [`PROBE_STEPS`] single-worker steps, each
//!   counted as 1/K of a whole step (the first one cold).
//!
//! Not included: downloading and decoding datasets (once per dataset and invocation, then cached on
//! disk), the augmenting loader (a background thread that overlaps the steps), process start-up,
//! figures; runs that are already done are counted too.
//!
//! The timings are cached per configuration — everything that changes a step's or a forward pass's
//! cost: the model (resolved widths and depths), classes, image size, per-worker and evaluation batch,
//! precision, optimizer, the method's kind, masking, regime, coverage, workers and sync, the device and
//! the thread count — in a small JSON file (`~/.cache/sdp/step_times.json` unless `--cost-cache` names
//! another), so pricing a grid measures each configuration once, in a few seconds.

use crate::bench::{self, StepBench};
use crate::data::registry::DataRef;
use crate::data::source::Shape;
use crate::models::info::thousands;
use crate::models::{self, Net};
use crate::plan;
use crate::seed::{rng, Stream};
use crate::spec::{Experiment, Method, RunSpec, SpecError, Workload};
use crate::train::methods::{self, Site};
use crate::train::RECAL_BATCHES;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Steps of each `sdp memprobe` the runner starts after a run (`runner::record_accounting`).
pub const PROBE_STEPS: usize = 3;

/// Where and how to measure.
#[derive(Clone, Debug)]
pub struct CostOptions {
    pub device: Device,
    /// The device as typed (`cpu`, `cuda:0`): part of the cache key and of the report.
    pub device_name: String,
    /// The step-time cache file.
    pub cache: PathBuf,
    /// Where a relative `folder:` dataset is looked up (as `sdp run --data-dir`).
    pub data_dir: PathBuf,
    /// Untimed steps before the timed ones.
    pub warmup: usize,
    /// Timed steps (their median is the step time).
    pub steps: usize,
    /// Measure every configuration again (replacing its cache entry), e.g. after the machine's load
    /// changed.
    pub remeasure: bool,
    /// Runs at a time (`sdp run --jobs N`): the report adds the wall-clock time of N jobs taking the runs
    /// in order.
    pub jobs: usize,
}

impl CostOptions {
    /// Validates `device` (a usage error naming it) and picks the cache file: `cache`, or the default.
    pub fn new(device: &str, cache: Option<PathBuf>, data_dir: &Path) -> Result<Self> {
        let dev = plan::device(device).map_err(|e| SpecError(format!("{e:#}")))?;
        let cache = match cache {
            Some(p) => p,
            None => default_cache_path(),
        };
        Ok(Self {
            device: dev,
            device_name: device.to_string(),
            cache,
            data_dir: data_dir.to_path_buf(),
            warmup: 2,
            steps: 3,
            remeasure: false,
            jobs: 1,
        })
    }
}

/// `$XDG_CACHE_HOME/sdp/step_times.json`, else `$HOME/.cache/sdp/step_times.json`, else
/// `.sdp-cache/step_times.json` in the working directory.
pub fn default_cache_path() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")));
    match base {
        Some(b) => b.join("sdp").join("step_times.json"),
        None => PathBuf::from(".sdp-cache").join("step_times.json"),
    }
}

/// What one configuration's measurement found (all times in seconds on the measured device).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Timing {
    /// One whole simulated training step (all K workers and the averaging), the median of the timed steps.
    pub step_s: f64,
    /// Building the model(s) from the seed.
    pub build_s: f64,
    /// How much longer the first (warm-up) steps took than the median step, together: allocator and
    /// kernel warm-up, paid once by every run and by every memory probe.
    pub warmup_extra_s: f64,
    /// SDP: what every evaluation does besides forward passes (averaging the workers into the global
    /// model, building the recalibrated and the scaled copies); 0 otherwise.
    pub eval_fixed_s: f64,
    /// One test image through the evaluated model in eval mode (at the evaluation batch size).
    pub eval_s_per_image: f64,
    /// One test image through every worker's subnetwork in eval mode, all K together (SDP; else 0).
    pub subnets_s_per_image: f64,
    /// One training image through the full model in train mode, without a backward pass (SDP's
    /// BatchNorm recalibration; else 0).
    pub recal_s_per_image: f64,
    /// How many steps the step time is the median of.
    pub timed_steps: usize,
    /// The 1-minute load average when it was measured (Linux; other work on the machine slows every
    /// step, so a figure measured under load prices runs that will share the machine the same way).
    #[serde(default)]
    pub load_avg: Option<f64>,
    /// When it was measured (UTC, RFC 3339).
    pub measured_at: String,
}

/// The cache file: timings by configuration key.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Cache {
    version: u32,
    entries: BTreeMap<String, Timing>,
}

const CACHE_VERSION: u32 = 1;

impl Cache {
    /// The cache at `path`; an absent file is an empty cache, an unreadable one an error, and a file
    /// of another version is ignored (it is rewritten on save).
    fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::new()),
            Err(e) => return Err(e).with_context(|| format!("reading the step-time cache {}", path.display())),
        };
        let c: Cache = serde_json::from_str(&text)
            .with_context(|| format!("parsing the step-time cache {} (delete it to start afresh)", path.display()))?;
        Ok(if c.version == CACHE_VERSION { c } else { Self::new() })
    }

    fn new() -> Self {
        Self { version: CACHE_VERSION, entries: BTreeMap::new() }
    }

    /// Writes the cache atomically (a temporary file renamed over it).
    fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }
}

/// The dataset facts a run's cost depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct DataSizes {
    pub train: usize,
    pub test: usize,
    pub classes: usize,
    /// Image height and width.
    pub hw: (usize, usize),
    /// What was assumed rather than read from the spec (printed with the report).
    pub assumption: Option<String>,
}

/// The sizes `workload` trains and tests on: `train_samples` / `test_samples` where given (capped at
/// the split's size), else the whole split: the published sizes of cifar10, cifar100 and svhn, the
/// generated `shapes` defaults, or the files of an ImageFolder tree (counted, not decoded; a relative
/// folder is looked up under `data_dir`).
pub fn data_sizes(w: &Workload, data_dir: &Path) -> Result<DataSizes> {
    let data = DataRef::parse(&w.dataset).map_err(|e| SpecError(format!("workload.dataset: {e:#}")))?;
    let generated = data.source().generated();
    let full = data.shape(w, data_dir).map_err(|e| {
        anyhow!(
            "workload.dataset = \"{}\": {e:#}; the cost of this dataset needs its files (to count its images and \
             classes) — fetch or extract them first",
            w.dataset
        )
    })?;
    // A generated source has the requested sizes already; a fixed one is capped at its splits.
    let train = w.train_samples.map_or(full.train, |n| n.min(full.train));
    let test = w.test_samples.map_or(full.test, |n| n.min(full.test));
    let assumption = match (w.train_samples, w.test_samples) {
        (Some(_), Some(_)) => None,
        (tr, te) => {
            let what = if generated { "the generated default" } else { "the full split" };
            let absent: Vec<&str> = [("train_samples", tr), ("test_samples", te)]
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| *k)
                .collect();
            Some(format!(
                "{}: workload.{} absent, assuming {what}: {} train / {} test examples",
                w.dataset,
                absent.join(" and "),
                thousands(train),
                thousands(test)
            ))
        }
    };
    Ok(DataSizes { train, test, classes: full.classes, hw: full.hw, assumption })
}

/// Whether a timing came from the cache or was measured by this call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Measured,
    Cached,
}

/// The estimated cost of one run.
#[derive(Clone, Debug)]
pub struct RunCost {
    pub experiment: String,
    pub id: String,
    pub label: String,
    pub steps_per_epoch: usize,
    /// Epochs actually trained ([`RunSpec::train_epochs`]).
    pub epochs: usize,
    pub steps: usize,
    pub evals: usize,
    pub train_s: f64,
    pub eval_s: f64,
    pub probe_s: f64,
    pub timing: Timing,
    pub source: Source,
}

impl RunCost {
    pub fn total_s(&self) -> f64 {
        self.train_s + self.eval_s + self.probe_s
    }
}

/// The estimate for a set of experiments.
#[derive(Clone, Debug)]
pub struct CostReport {
    pub runs: Vec<RunCost>,
    /// Dataset sizes that were assumed (one line each).
    pub assumptions: Vec<String>,
    /// Configurations measured by this call, and runs whose configuration was already cached.
    pub measured: usize,
    pub reused: usize,
    /// Seconds spent measuring.
    pub measure_s: f64,
    pub device_name: String,
    pub threads: usize,
    /// Runs at a time, as `sdp run --jobs`.
    pub jobs: usize,
    pub cache: PathBuf,
}

/// The cache key of a run's configuration: every field that changes what a step or an evaluation
/// computes, and where. Fields that only change the numbers (lr, seeds, augmentation, data) are left out.
fn config_key(spec: &RunSpec, sizes: &DataSizes, opts: &CostOptions) -> Result<String> {
    let w = &spec.workload;
    let (widths, depths) = models::of(w, sizes.classes)?.stages();
    // The budget and the headline evaluation mode change how many steps and which number is reported,
    // not what a step costs.
    let method = Method { budget: Default::default(), eval_mode: Default::default(), ..spec.method.clone() };
    let key = serde_json::json!({
        "model": w.model,
        "widths": widths,
        "depths": depths,
        "norm": w.norm,
        "classes": sizes.classes,
        "image": [sizes.hw.0, sizes.hw.1],
        "batch": w.batch_size,
        "eval_batch": w.eval_batch_size.min(sizes.test).max(1),
        "precision": w.precision,
        "optim": spec.optim.name,
        "method": method,
        "device": opts.device_name,
        "threads": rayon::current_num_threads(),
    });
    Ok(key.to_string())
}

/// Estimates every run of `exps` on `opts.device`, measuring the configurations the cache lacks (and
/// saving them to it).
pub fn estimate(exps: &[Experiment], opts: &CostOptions) -> Result<CostReport> {
    let mut cache = Cache::load(&opts.cache)?;
    let (mut measured, mut reused, mut measure_s) = (0, 0, 0.0);
    let mut assumptions = BTreeSet::new();
    // Configurations measured by this call (with `remeasure`, the others' cache entries are stale).
    let mut fresh = BTreeSet::new();
    let mut runs = Vec::new();
    for exp in exps {
        for run in &exp.runs {
            let spec = &run.spec;
            let sizes =
                data_sizes(&spec.workload, &opts.data_dir).with_context(|| format!("{} run {}", exp.name, run.id))?;
            if let Some(a) = &sizes.assumption {
                assumptions.insert(a.clone());
            }
            // A run that cannot take one step is an error before anything is measured.
            steps_per_epoch(&exp.name, &run.id, spec, &sizes)?;
            let key = config_key(spec, &sizes, opts)?;
            let (timing, source) = match cache.entries.get(&key).filter(|_| !opts.remeasure || fresh.contains(&key)) {
                Some(t) => {
                    reused += 1;
                    (t.clone(), Source::Cached)
                }
                None => {
                    crate::say!("cost: measuring {} {} ({}) on {}", exp.name, run.id, run.label, opts.device_name);
                    let t0 = Instant::now();
                    let t = measure(spec, &sizes, opts)
                        .with_context(|| format!("measuring the step time of {} run {}", exp.name, run.id))?;
                    measure_s += t0.elapsed().as_secs_f64();
                    measured += 1;
                    fresh.insert(key.clone());
                    cache.entries.insert(key, t.clone());
                    cache.save(&opts.cache)?;
                    (t, Source::Measured)
                }
            };
            runs.push(run_cost(&exp.name, &run.id, &run.label, spec, &sizes, timing, source)?);
        }
    }
    Ok(CostReport {
        runs,
        assumptions: assumptions.into_iter().collect(),
        measured,
        reused,
        measure_s,
        device_name: opts.device_name.clone(),
        threads: rayon::current_num_threads(),
        jobs: opts.jobs.max(1),
        cache: opts.cache.clone(),
    })
}

/// A run's cost from its configuration's timing: the arithmetic of the module docs.
pub fn run_cost(
    experiment: &str,
    id: &str,
    label: &str,
    spec: &RunSpec,
    sizes: &DataSizes,
    timing: Timing,
    source: Source,
) -> Result<RunCost> {
    let w = &spec.workload;
    let k = spec.method.workers;
    let steps_per_epoch = steps_per_epoch(experiment, id, spec, sizes)?;
    let epochs = spec.train_epochs();
    let steps = steps_per_epoch * epochs;
    let evals = (1..=epochs).filter(|e| e % w.eval_every == 0 || *e == epochs).count();
    let method = methods::of(&spec.method.kind)?;
    // The evaluated model and its copies (SDP: recalibrated, and scaled unless every worker holds every
    // unit), the subnetworks and the recalibration passes; a single-model method times none of the last
    // three, so its evaluation is one pass of its model.
    let full_passes = 1.0 + method.eval_copies(spec) as f64;
    let batch = w.eval_batch_size.min(sizes.train).max(1);
    let recal_images = (RECAL_BATCHES * batch).min(sizes.train);
    let one_eval = timing.eval_fixed_s
        + sizes.test as f64 * (full_passes * timing.eval_s_per_image + timing.subnets_s_per_image)
        + recal_images as f64 * timing.recal_s_per_image;
    let probes = if method.probes_each_worker() { k } else { 1 };
    // A probe builds its model and takes single-worker steps, the first of them cold.
    let probe_s =
        probes as f64 * (timing.build_s + (timing.warmup_extra_s + PROBE_STEPS as f64 * timing.step_s) / k as f64);
    Ok(RunCost {
        experiment: experiment.to_string(),
        id: id.to_string(),
        label: label.to_string(),
        steps_per_epoch,
        epochs,
        steps,
        evals,
        train_s: timing.build_s + timing.warmup_extra_s + steps as f64 * timing.step_s,
        eval_s: evals as f64 * one_eval,
        probe_s,
        timing,
        source,
    })
}

/// `⌊train / (K·B)⌋`, the loader's steps an epoch; an error naming the run when it is 0.
fn steps_per_epoch(experiment: &str, id: &str, spec: &RunSpec, sizes: &DataSizes) -> Result<usize> {
    let (k, b) = (spec.method.workers, spec.workload.batch_size);
    match sizes.train / (k * b) {
        0 => bail!(
            "{experiment} run {id}: {} training samples are fewer than one step of {k} workers × batch {b}",
            sizes.train
        ),
        n => Ok(n),
    }
}

/// Times one configuration: whole steps ([`bench::whole_step`]) and the evaluation's forward passes.
fn measure(spec: &RunSpec, sizes: &DataSizes, opts: &CostOptions) -> Result<Timing> {
    let dev = &opts.device;
    let b = StepBench {
        spec: spec.clone(),
        plan: plan::Plan::of(spec)?,
        worker: 0,
        all_workers: true,
        device: dev.clone(),
        steps: opts.steps,
        warmup: opts.warmup,
        classes: sizes.classes,
        hw: sizes.hw,
        profile: false,
    };
    let step = bench::whole_step(&b)?;
    let eval_batch = spec.workload.eval_batch_size.min(sizes.test).max(1);
    let x = random_input(&b, sizes, eval_batch)?;
    let site = Site { spec, plan: &b.plan, classes: sizes.classes, device: dev };
    let time = |net: &dyn Net, train: bool, warm_up: bool| per_image(net, &x, train, dev, warm_up);
    let e = methods::of(&spec.method.kind)?.eval_timing(site, &time)?;
    let (eval_s, subnets_s, recal_s, eval_fixed_s) = (e.per_image, e.subnets_per_image, e.recal_per_image, e.fixed_s);
    Ok(Timing {
        step_s: step.step_s,
        build_s: step.build_s,
        warmup_extra_s: step.warmup_times.iter().map(|t| (t - step.step_s).max(0.0)).sum(),
        eval_fixed_s,
        eval_s_per_image: eval_s,
        subnets_s_per_image: subnets_s,
        recal_s_per_image: recal_s,
        timed_steps: step.times.len(),
        load_avg: load_avg(),
        measured_at: crate::results::now(),
    })
}

/// `n` examples of random input of the run's dataset kind (`DataSource::random_batch`), from the run
/// seed's data stream.
fn random_input(b: &StepBench, sizes: &DataSizes, n: usize) -> Result<Tensor> {
    let shape = Shape { train: sizes.train, test: sizes.test, classes: sizes.classes, hw: sizes.hw };
    let mut r = rng(b.spec.seed, Stream::Data, u64::MAX, u64::MAX);
    Ok(b.plan.data.source().random_batch(&shape, n, &mut r).to_tensors(&b.device)?.0)
}

/// The 1-minute load average (`None` where /proc/loadavg cannot be read).
fn load_avg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Seconds per image of one forward pass of `net` on `x` (after an untimed pass if `warm_up`).
fn per_image(net: &dyn Net, x: &Tensor, train: bool, dev: &Device, warm_up: bool) -> Result<f64> {
    if warm_up {
        net.forward_t(x, train)?.detach();
        dev.synchronize()?;
    }
    let t = Instant::now();
    net.forward_t(x, train)?.detach();
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / x.dim(0)?.max(1) as f64)
}

/// Hours, readable at any size: `2.41 h`, `12.5 min`, `40 s`.
pub fn human(seconds: f64) -> String {
    if seconds >= 3600.0 {
        format!("{:.2} h", seconds / 3600.0)
    } else if seconds >= 60.0 {
        format!("{:.1} min", seconds / 60.0)
    } else {
        format!("{seconds:.0} s")
    }
}

/// Wall-clock seconds of `jobs` workers that each take the next run in order when they finish one (how
/// `sdp run --jobs` shares out runs through the run locks).
pub fn jobs_wall_s(run_s: &[f64], jobs: usize) -> f64 {
    let mut free_at = vec![0.0f64; jobs.max(1)];
    for &t in run_s {
        let next = free_at.iter_mut().min_by(|a, b| a.total_cmp(b)).expect("at least one job");
        *next += t;
    }
    free_at.into_iter().fold(0.0, f64::max)
}

impl CostReport {
    /// The printed report: one tab-separated line per run (experiment, run id, label — as plain
    /// `sdp check` prints them — then steps, evaluations, the estimate in hours and its parts, the step
    /// time and whether it was measured now or cached), then totals per experiment and overall, the
    /// device, what the estimate includes, and a `measured=N cached=M` line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        let h = |s: f64| s / 3600.0;
        for a in &self.assumptions {
            line(format!("# dataset: {a}"));
        }
        for r in &self.runs {
            line(format!(
                "{}\t{}\t{}\tsteps={}\tevals={}\test_h={:.4}\ttrain_h={:.4}\teval_h={:.4}\tprobe_h={:.4}\tstep_s={:.4}\t{}",
                r.experiment,
                r.id,
                r.label,
                r.steps,
                r.evals,
                h(r.total_s()),
                h(r.train_s),
                h(r.eval_s),
                h(r.probe_s),
                r.timing.step_s,
                match r.source {
                    Source::Measured => "measured",
                    Source::Cached => "cached",
                }
            ));
        }
        let mut names: Vec<&str> = Vec::new();
        for r in &self.runs {
            if !names.contains(&r.experiment.as_str()) {
                names.push(&r.experiment);
            }
        }
        let total = |runs: &[&RunCost]| -> String {
            let sum = |f: &dyn Fn(&RunCost) -> f64| runs.iter().map(|r| f(r)).sum::<f64>();
            let steps: usize = runs.iter().map(|r| r.steps).sum();
            format!(
                "{} run(s), {} steps: {} (training {}, evaluation {}, memory probe {})",
                runs.len(),
                thousands(steps),
                human(sum(&|r| r.total_s())),
                human(sum(&|r| r.train_s)),
                human(sum(&|r| r.eval_s)),
                human(sum(&|r| r.probe_s)),
            )
        };
        for name in &names {
            let runs: Vec<&RunCost> = self.runs.iter().filter(|r| r.experiment == *name).collect();
            line(format!("# {name}: {}", total(&runs)));
        }
        let all: Vec<&RunCost> = self.runs.iter().collect();
        line(format!("# total on device {} ({} threads): {}", self.device_name, self.threads, total(&all)));
        if self.jobs > 1 {
            let times: Vec<f64> = self.runs.iter().map(RunCost::total_s).collect();
            line(format!(
                "# wall clock with --jobs {} (each job takes the next run, {} thread(s) each): {}",
                self.jobs,
                self.threads,
                human(jobs_wall_s(&times, self.jobs))
            ));
        }
        line(
            "# includes: the model build and training steps (every simulated worker's forward, backward and update, \
             then the averaging; the first steps' warm-up), \
             every evaluation (SDP: 3 full forward passes, one per worker subnetwork, BN recalibration), the \
             per-worker memory probe; excludes: dataset download and decoding, process start-up, figures; runs \
             already done are counted"
                .to_string(),
        );
        line(format!(
            "# step times: {} configuration(s) measured now ({:.1} s), {} run(s) from the cache {}",
            self.measured,
            self.measure_s,
            self.reused,
            self.cache.display()
        ));
        let loads: Vec<f64> = self.runs.iter().filter_map(|r| r.timing.load_avg).collect();
        if let Some(max) = loads.iter().copied().reduce(f64::max) {
            if max > self.threads as f64 {
                line(format!(
                    "# note: some step times were measured at a load average of up to {max:.1} on {} threads: other \
                     work slowed them, and runs sharing the machine the same way will be as slow; for an idle-machine \
                     figure, measure again when it is idle (a new --cost-cache file)",
                    self.threads
                ));
            }
        }
        line(format!("measured={} cached={}", self.measured, self.reused));
        out
    }
}
