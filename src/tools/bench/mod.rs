//! `sdp bench step`: the time and memory of one training step (forward, backward, SGD-momentum update)
//! of a model, or of one SDP worker's physical subnetwork, on random seeded input. `scripts/compare_step.sh` compares it
//! with `scripts/pytorch_step.py`, which prints the same machine-readable last line:
//! `step_s=<median seconds> img_s=<images per second> peak_mb=<MiB or n/a>`. [`whole_step`] times a
//! whole simulated step of any run (all K workers, as training runs them): `sdp check --cost` prices
//! runs with it. The benchmarked run is a spec that `plan::parse` reads, validates and resolves as it does a run's
//! (the flags that describe it are `--set` overrides), so its errors name the spec key.
//!
//! Peak memory is measured as `sdp memprobe` measures it ([`MemoryMeter`]). On the CPU it is the
//! resident-set high-water mark (`VmHWM`) minus the resident set before the model is built, so it counts
//! parameters, optimizer state, activations and kernel buffers, but not the binary and the allocator's
//! start-up state. On CUDA it is the device memory in use as the driver reports it (total - free, sampled
//! after every step's backward pass, while the gradients are alive) minus that before the model: a lower
//! bound of the true peak, which PyTorch's allocator counts exactly (`max_memory_allocated`).

use crate::data::examples::Batch;
use crate::data::source::Shape;
use crate::memprobe::MemoryMeter;
use crate::ops::profile;
use crate::plan::{self, Plan};
use crate::seed::{rng, Stream};
use crate::spec::{Precision, RunSpec, SpecError};
use crate::train::loss_and_grads_of;
use crate::train::methods::{self, Site};
use anyhow::Result;
use candle_core::Device;
use std::path::Path;
use std::time::Instant;

pub mod report;

/// `sdp bench …`
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Median time, img/s and peak memory of a training step (forward, backward, optimizer update:
    /// SGD with momentum unless --set optim.* says otherwise).
    Step(StepArgs),
    /// Augmented images/s the training loader delivers (random 32×32×3 images, crop pad 4 + flip + normalise).
    Loader(LoaderArgs),
    /// The attainable fp32 GEMM GFLOP/s of this machine at a thread count (the ceiling `bench step
    /// --profile` compares a step with).
    Peak(PeakArgs),
    /// Time and bytes of one parameter synchronisation across processes (under `mpirun -np N`): DP, SDP
    /// grouped by holder set, SDP as a masked full all-reduce.
    Comm(crate::comm::bench::CommArgs),
}

/// Arguments of `sdp bench peak`.
#[derive(clap::Args, Debug, Clone)]
pub struct PeakArgs {
    /// Threads (0: RAYON_NUM_THREADS, else every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Square GEMM sizes tried, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [256usize, 512, 1024, 2048])]
    pub sizes: Vec<usize>,
    /// Timed products per size (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
}

/// Arguments of `sdp bench loader`: synthetic CIFAR-sized images through the real `TrainLoader`
/// (background thread), as `sdp::data::loader::bench` measures them.
#[derive(clap::Args, Debug, Clone)]
pub struct LoaderArgs {
    /// Random 32×32×3 training images.
    #[arg(long, default_value_t = 50_000)]
    pub images: usize,
    /// Per-worker batch size.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Workers (disjoint shards) per step.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Timed epochs.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
}

impl LoaderArgs {
    /// Checks every flag once; errors are usage errors (exit code 2) naming the flag.
    pub fn validate(&self) -> Result<()> {
        for (flag, v) in [("--images", self.images), ("--batch", self.batch), ("--workers", self.workers)] {
            if v == 0 {
                return Err(usage(format!("{flag} must be at least 1")));
            }
        }
        if self.epochs == 0 {
            return Err(usage("--epochs must be at least 1".into()));
        }
        if self.images < self.workers * self.batch {
            return Err(usage(format!(
                "--images {} is fewer than one step of --workers {} × --batch {}",
                self.images, self.workers, self.batch
            )));
        }
        Ok(())
    }
}

/// Arguments of `sdp bench step`, as typed on the command line; [`StepArgs::validate`] turns them into
/// a [`StepBench`]. The flags that describe the run are shorthands for `--set` overrides of a spec, which
/// is parsed and validated as `sdp run` parses and validates one.
#[derive(clap::Args, Debug, Clone)]
pub struct StepArgs {
    /// resnet18 | wrn18 | resnet (with --widths/--depths) | swin_t: --set workload.model=M.
    #[arg(long)]
    pub model: String,
    /// Per-stage widths, comma-separated (ResNet family: channels; swin_t: dims): --set workload.widths=[…].
    #[arg(long, value_delimiter = ',')]
    pub widths: Option<Vec<usize>>,
    /// Per-stage block counts, comma-separated: --set workload.depths=[…].
    #[arg(long, value_delimiter = ',')]
    pub depths: Option<Vec<usize>>,
    /// Images per step: --set workload.batch_size=B.
    #[arg(long)]
    pub batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 7)]
    pub steps: usize,
    /// Untimed steps first (allocator and kernel warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Classes of the linear head.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Input height and width (CIFAR: 32; swin_t needs a multiple of its patch and window sizes).
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// Tokens per sequence, for a language model (llama_tiny, llama_134m): --set workload.context=T, and
    /// the random input is token ids of a `tokens:` dataset (--classes is then the vocabulary size).
    #[arg(long, conflicts_with = "image_size")]
    pub context: Option<usize>,
    /// Benchmark one SDP worker's physical subnetwork instead of the full model: a masking strategy
    /// (block, neuron, random_block): --set method.kind=sdp --set method.masking=S.
    #[arg(long)]
    pub masking: Option<String>,
    /// SDP coverage C in (0, 1] (with --masking): --set method.coverage=C.
    #[arg(long, default_value_t = 0.5)]
    pub coverage: f64,
    /// SDP workers K (with --masking): --set method.workers=K.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Which SDP worker's subnetwork to benchmark: 0..K.
    #[arg(long, default_value_t = 0)]
    pub worker: usize,
    /// Time a whole simulated SDP step instead: every worker's forward, backward and update, one after
    /// another, then the averaging among holders. Peak memory is then the process's: the global model
    /// and all K workers.
    #[arg(long, conflicts_with = "worker")]
    pub all_workers: bool,
    /// Compute precision: f32, or bf16 (bf16 activations and convolutions, f32 master weights,
    /// gradients and BatchNorm statistics; ResNet family; meant for CUDA, slow on the CPU):
    /// --set workload.precision=P.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Print where the step's time goes (convolutions, batch norm, the rest of the forward and backward
    /// passes, loss, optimizer, averaging), its counted FLOPs, GFLOP/s and their fraction of the measured
    /// GEMM peak (`sdp bench peak`, measured here first).
    #[arg(long)]
    pub profile: bool,
    /// Seed of the weights, the masks and the random input: --set seed=S.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Any other field of the run's spec (`optim.*`, `method.*`; the input is random, so data fields
    /// change nothing), as `sdp run --set` takes it; applied after the flags above.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// A validated step benchmark.
#[derive(Debug, Clone)]
pub struct StepBench {
    /// The run whose step is timed (only its model, batch size, method and optimizer matter).
    pub spec: RunSpec,
    /// Its names resolved (task, masking strategy, the dataset whose kind of input is drawn).
    pub plan: Plan,
    /// The SDP worker benchmarked (with masking).
    pub worker: usize,
    /// Time whole training steps as training runs them (every one of the K workers plus the
    /// averaging, for any method kind; see [`whole_step`]) instead of one worker's.
    pub all_workers: bool,
    pub device: Device,
    pub steps: usize,
    pub warmup: usize,
    pub classes: usize,
    /// Input size: an image's height and width (what the run's dataset source makes its random inputs
    /// of, `DataSource::random_batch`).
    pub hw: (usize, usize),
    /// Profile the timed steps (`--profile`).
    pub profile: bool,
}

/// The figures of one step benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Median seconds per step.
    pub step_s: f64,
    pub img_s: f64,
    /// Peak memory in MiB (None where it cannot be measured).
    pub peak_mb: Option<f64>,
    /// Every timed step, in seconds.
    pub times: Vec<f64>,
    /// Every warm-up step, in seconds (the first steps of a fresh model are slower).
    pub warmup_times: Vec<f64>,
    pub params: usize,
    /// Seconds spent building the model(s) before the first step (weights drawn on the CPU, moved to
    /// the device; for SDP the global model and every worker's subnetwork).
    pub build_s: f64,
    /// With `--profile`: every part's totals over the timed steps.
    pub profile: Option<Vec<crate::ops::profile::PartTotals>>,
}

impl StepReport {
    /// The machine-readable line: `step_s=… img_s=… peak_mb=…`.
    pub fn line(&self) -> String {
        let peak = self.peak_mb.map_or_else(|| "n/a".to_string(), |m| format!("{m:.1}"));
        format!("step_s={:.4} img_s={:.1} peak_mb={peak}", self.step_s, self.img_s)
    }
}

/// The GEMM sizes `bench step --profile` measures the peak at.
const PEAK_SIZES: [usize; 3] = [512, 1024, 2048];

fn usage(msg: String) -> anyhow::Error {
    SpecError(msg).into()
}

/// The spec a step benchmark starts from; [`StepArgs::spec_overrides`] fills in the rest.
const BASE_SPEC: &str = "name = \"bench\"\n[workload]\ndataset = \"shapes\"\nepochs = 1\n";

impl StepArgs {
    /// The flags that describe the run as `--set` overrides, then the `--set` ones.
    fn spec_overrides(&self) -> Result<Vec<String>> {
        let list = |v: &[usize]| toml::Value::Array(v.iter().map(|&x| toml::Value::Integer(x as i64)).collect());
        let text = |s: &str| toml::Value::String(s.to_string());
        let mut sets = vec![
            format!("workload.model={}", text(&self.model)),
            format!("workload.batch_size={}", self.batch),
            format!("workload.precision={}", toml::Value::try_from(self.precision)?),
            format!("seed={}", self.seed),
        ];
        sets.extend(self.widths.as_deref().map(|w| format!("workload.widths={}", list(w))));
        sets.extend(self.depths.as_deref().map(|d| format!("workload.depths={}", list(d))));
        if let Some(t) = self.context {
            // Random token ids: any `tokens:` directory names the kind; nothing is read from it.
            sets.push(format!("workload.dataset={}", text("tokens:bench")));
            sets.push(format!("workload.context={t}"));
        }
        if let Some(masking) = &self.masking {
            sets.push("method.kind=\"sdp\"".into());
            sets.push(format!("method.masking={}", text(masking)));
            sets.push(format!("method.coverage={}", self.coverage));
            sets.push(format!("method.workers={}", self.workers));
        }
        sets.extend(self.sets.iter().cloned());
        Ok(sets)
    }

    /// Parses the run's spec as `sdp run` does (errors name the key) and checks the other flags; every
    /// error is a usage error (exit code 2).
    pub fn validate(&self) -> Result<StepBench> {
        let mut exp = plan::parse(BASE_SPEC, Path::new("sdp bench step"), &self.spec_overrides()?)?;
        if exp.runs.len() != 1 {
            return Err(usage(format!(
                "sdp bench step: a grid of {} runs (a list in --set): it times one",
                exp.runs.len()
            )));
        }
        let spec = exp.runs.remove(0).spec;
        let context = self.context.unwrap_or(1);
        for (flag, v) in [
            ("--steps", self.steps),
            ("--classes", self.classes),
            ("--image-size", self.image_size),
            ("--context", context),
        ] {
            if v == 0 {
                return Err(usage(format!("{flag} must be at least 1")));
            }
        }
        let device = plan::device(&self.device).map_err(|e| usage(format!("{e:#}")))?;
        if self.worker >= spec.method.workers {
            return Err(usage(format!(
                "--worker {} does not exist with method.workers = {}",
                self.worker, spec.method.workers
            )));
        }
        Ok(StepBench {
            plan: Plan::of(&spec).map_err(|e| usage(format!("sdp bench step: {e:#}")))?,
            spec,
            worker: self.worker,
            all_workers: self.all_workers,
            device,
            steps: self.steps,
            warmup: self.warmup,
            classes: self.classes,
            hw: match self.context {
                Some(t) => (1, t),
                None => (self.image_size, self.image_size),
            },
            profile: self.profile,
        })
    }
}

/// Runs `sdp bench …` and prints its report; the last line is machine-readable.
pub fn run(args: &BenchArgs) -> Result<()> {
    match &args.command {
        BenchCommand::Step(a) => {
            let b = a.validate()?;
            let (model, m) = (b.spec.workload.model.as_str(), &b.spec.method);
            let method = methods::of(&m.kind)?;
            let name = method.legend(&b.spec);
            let what = if b.all_workers {
                format!("{model} (a whole {name} step: all K={} workers, coverage {})", m.workers, m.coverage)
            } else if method.probes_each_worker() {
                format!("{model} ({name} worker {} of K={}, coverage {})", b.worker, m.workers, m.coverage)
            } else {
                format!("{model} ({name}: one worker's model)")
            };
            let input = match a.context {
                Some(t) => format!("{t}-token sequences"),
                None => format!("{}x{} input", b.hw.0, b.hw.1),
            };
            crate::say!(
                "bench step: {what}, batch {}, {input}, device {}, {} warm-up + {} timed steps, {} threads",
                b.spec.workload.batch_size,
                a.device,
                b.warmup,
                b.steps,
                rayon::current_num_threads()
            );
            // The peak first, on a quiet pool, before the step's buffers exist.
            let peak = if b.profile { Some(crate::ops::peak::measure(0, &PEAK_SIZES, 3)?) } else { None };
            let r = step(&b)?;
            let ms: Vec<String> = r.times.iter().map(|t| format!("{:.1}", t * 1e3)).collect();
            println!("params: {}", r.params);
            println!("step times (ms): {}", ms.join(" "));
            if let Some(parts) = &r.profile {
                print!("{}", report::profile_table(parts, b.steps, &r.times, peak));
            }
            println!("{}", r.line());
            Ok(())
        }
        BenchCommand::Peak(a) => {
            if a.sizes.is_empty() || a.sizes.contains(&0) {
                return Err(usage("--sizes must list sizes of at least 1".into()));
            }
            let p = crate::ops::peak::measure(a.threads, &a.sizes, a.reps)?;
            crate::say!(
                "bench peak: fp32 GEMM (the convolutions' kernels), sizes {:?}, {} threads",
                a.sizes,
                p.threads
            );
            println!("peak_gflops={:.1} size={} threads={}", p.gflops, p.size, p.threads);
            Ok(())
        }
        BenchCommand::Comm(a) => crate::comm::bench::run(a, crate::comm::World::from_env()?),
        BenchCommand::Loader(a) => {
            a.validate()?;
            let set = std::sync::Arc::new(crate::data::loader::random_images(0, a.images, 32, 32, 3)?);
            // CIFAR-10's constants; the cost does not depend on them.
            let cfg = crate::data::augment::AugmentCfg {
                crop_pad: 4,
                pad_mode: crate::spec::PadMode::Zero,
                flip: true,
                mean: [0.4914, 0.4822, 0.4465],
                std: [0.2470, 0.2435, 0.2616],
            };
            crate::say!(
                "bench loader: {} random 32x32x3 images, {} worker(s) x batch {}, crop pad 4 + flip + normalise, \
                 {} epochs, {} threads",
                a.images,
                a.workers,
                a.batch,
                a.epochs,
                rayon::current_num_threads()
            );
            let img_s = crate::data::loader::bench(set, cfg, a.workers, a.batch, a.epochs)?;
            println!("img_s={img_s:.0}");
            Ok(())
        }
    }
}

/// Builds the model (or worker 0's subnetwork), runs the warm-up and timed steps, and measures them.
pub fn step(b: &StepBench) -> Result<StepReport> {
    if b.all_workers {
        return whole_step(b);
    }
    let dev = &b.device;
    let mut meter = MemoryMeter::start(dev).ok();
    let t = Instant::now();
    // The network worker `b.worker` trains (an SDP worker's physical subnetwork, DP's full model, …).
    let mut w = methods::of(&b.spec.method.kind)?.worker_net(site(b), Some(b.worker))?;
    // Building the SDP state held the global model and every worker at once: restart the peak so that
    // it is the benchmarked worker's. Where the kernel refuses, the peak includes the construction.
    if let Some(m) = meter.as_mut() {
        let _ = m.restart_peak();
    }
    let build_s = t.elapsed().as_secs_f64();
    let (x, y) = random_batch(b, 0)?.to_tensors(dev)?;
    let (lr, task) = (b.spec.optim.lr, b.plan.task.task);
    let params = w.net.store().num_params();
    let r = timed_steps(b, meter, params, b.spec.workload.batch_size, |i, sample| {
        let (_, grads) = {
            let out = {
                let _forward = profile::scope(profile::Part::Forward);
                w.forward(&x, i + 1, b.worker)?
            };
            loss_and_grads_of(task, w.net.store(), &out, &y)?
        };
        sample()?; // activations and gradients alive: the step's high point
        w.opt.step(&w.net.store().params, &grads, lr)?;
        Ok(())
    })?;
    Ok(StepReport { build_s, ..r })
}

/// Where `b`'s networks are built.
fn site(b: &StepBench) -> Site<'_> {
    Site { spec: &b.spec, plan: &b.plan, classes: b.classes, device: &b.device }
}

/// Whole simulated training steps of `b.spec`, computed by the step functions training itself uses
/// ([`methods::Method::whole_step`]: SDP's `train::sdp_step`, every worker's step one after another, then
/// the averaging among holders; DP's `train::dp_step_with`, K forward/backward passes, gradients and
/// BatchNorm statistics averaged, one update; the DP baselines the same, on the narrowed model or with
/// per-step drops), on K random batches. `sdp check --cost` builds its estimates from this.
pub fn whole_step(b: &StepBench) -> Result<StepReport> {
    let spec = &b.spec;
    let meter = MemoryMeter::start(&b.device).ok();
    let t = Instant::now();
    let batches: Vec<Batch> = (0..spec.method.workers).map(|k| random_batch(b, k)).collect::<Result<_>>()?;
    let images = spec.workload.batch_size * spec.method.workers;
    let lr = spec.optim.lr;
    let solo = crate::comm::World::solo();
    let mut whole = methods::of(&spec.method.kind)?.whole_step(site(b), &solo)?;
    let build_s = t.elapsed().as_secs_f64();
    let r = timed_steps(b, meter, whole.params, images, |i, sample| {
        (whole.step)(&batches, lr, i + 1)?;
        sample()
    })?;
    Ok(StepReport { build_s, ..r })
}

/// Runs `b.warmup + b.steps` calls of `one_step(i, sample)` (`sample` counts the device memory in use
/// towards the peak; a step calls it at its high point) and reports the median time of the timed ones,
/// img/s for `images` per step and the peak memory that `meter` (None: not measurable) saw.
fn timed_steps(
    b: &StepBench,
    mut meter: Option<MemoryMeter>,
    params: usize,
    images: usize,
    mut one_step: impl FnMut(usize, &mut dyn FnMut() -> Result<()>) -> Result<()>,
) -> Result<StepReport> {
    let dev = &b.device;
    let mut sample = || meter.as_mut().map_or(Ok(()), |m| m.sample());
    sample()?;
    let (mut times, mut warmup_times) = (Vec::with_capacity(b.steps), Vec::with_capacity(b.warmup));
    for i in 0..b.warmup + b.steps {
        if b.profile && i == b.warmup {
            profile::reset();
            profile::enable(true);
        }
        let t = Instant::now();
        one_step(i, &mut sample)?;
        dev.synchronize()?;
        let s = t.elapsed().as_secs_f64();
        if i >= b.warmup {
            times.push(s);
        } else {
            warmup_times.push(s);
        }
    }
    let profile = b.profile.then(|| {
        profile::enable(false);
        profile::totals()
    });
    let peak_mb = meter.map(|m| m.peak_bytes()).transpose()?.map(|p| p as f64 / (1024.0 * 1024.0));
    let step_s = median(&times);
    Ok(StepReport {
        step_s,
        img_s: images as f64 / step_s,
        peak_mb,
        times,
        warmup_times,
        params,
        build_s: 0.0,
        profile,
    })
}

/// Worker `k`'s random input of the run's dataset kind at [`StepBench::hw`] with random targets
/// ([`DataSource::random_batch`](crate::data::source::DataSource::random_batch)), drawn from the run seed's
/// data stream.
fn random_batch(b: &StepBench, k: usize) -> Result<Batch> {
    let source = b.plan.data.source();
    let shape = Shape { train: 0, test: 0, classes: b.classes, hw: b.hw };
    let mut r = rng(b.spec.seed, Stream::Data, u64::MAX, k as u64);
    Ok(source.random_batch(&shape, b.spec.workload.batch_size, &mut r))
}

/// The median of `v` (the mean of the two middle values for an even count); 0 for an empty slice.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        0.5 * (s[m - 1] + s[m])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        bench: BenchCommand,
    }

    fn args(line: &str) -> StepArgs {
        let argv = std::iter::once("bench").chain(line.split_whitespace());
        match Cli::parse_from(argv).bench {
            BenchCommand::Step(a) => a,
            _ => panic!("`{line}` is not a step bench"),
        }
    }

    fn loader_err(line: &str) -> String {
        let argv = std::iter::once("bench").chain(line.split_whitespace());
        let BenchCommand::Loader(a) = Cli::parse_from(argv).bench else { panic!("`{line}` is not a loader bench") };
        let e = a.validate().expect_err("should be rejected");
        assert!(e.is::<SpecError>(), "not a usage error: {e:#}");
        format!("{e:#}")
    }

    #[test]
    fn bad_loader_flags_are_usage_errors_naming_the_flag() {
        assert!(loader_err("loader --batch 0").contains("--batch must be at least 1"));
        assert!(loader_err("loader --workers 0").contains("--workers must be at least 1"));
        assert!(loader_err("loader --epochs 0").contains("--epochs must be at least 1"));
        let e = loader_err("loader --images 100 --workers 2 --batch 64");
        assert!(e.contains("--images 100 is fewer than one step of --workers 2 × --batch 64"), "{e}");
    }

    fn err(line: &str) -> String {
        let e = args(line).validate().expect_err("should be rejected");
        assert!(e.is::<SpecError>(), "not a usage error: {e:#}");
        format!("{e:#}")
    }

    #[test]
    fn the_run_is_checked_as_a_spec_and_errors_name_its_key() -> Result<()> {
        let r = "step --model resnet18 --batch 2";
        let key = |line: &str, key: &str, msg: &str| {
            let e = err(line);
            assert!(e.contains(&format!("sdp bench step: key `{key}`")) && e.contains(msg), "{line}: {e}");
        };
        key("step --model vgg --batch 2", "workload.model", "unknown variant `vgg`");
        key("step --model resnet --batch 2", "workload.model", "needs explicit `widths` and `depths`");
        key("step --model resnet18 --batch 0", "workload.batch_size", "must be at least 1");
        key(&format!("{r} --masking stripes"), "method.masking", "unknown masking strategy");
        key(&format!("{r} --masking block --coverage 1.5"), "method.coverage", "(0, 1]");
        key("step --model resnet --widths 8,16 --depths 1 --batch 2", "workload.depths", "workload.widths has 2");
        key("step --model swin_t --widths 32,32,32,32,32,32 --depths 1,1,1,1,1,1 --batch 2", "workload.widths", "odd");
        key(&format!("{r} --set optim.lr=-1"), "optim.lr", "must be a positive number");
        key(&format!("{r} --set optim.typo=1"), "optim.typo", "unknown field");
        // The flags that are not spec fields.
        assert!(err(&format!("{r} --device tpu")).contains("invalid --device `tpu`"));
        assert!(err(&format!("{r} --steps 0")).contains("--steps must be at least 1"));
        assert!(err(&format!("{r} --masking block --workers 4 --worker 4"))
            .contains("--worker 4 does not exist with method.workers = 4"));
        key(
            &format!("{r} --set method.kind=local_sgd"),
            "method.kind",
            "unknown method `local_sgd` (registered: dp, sdp",
        );
        assert!(err(&format!("{r} --set optim.lr=[0.1,0.2]")).contains("a grid of 2 runs"));
        // `--set` comes after the flags, and the spec is a run's (defaults filled in).
        let b = args(&format!("{r} --masking neuron --workers 4 --set method.workers=2 --set optim.momentum=0"))
            .validate()?;
        assert_eq!((b.spec.method.kind.as_str(), b.spec.method.workers, b.spec.optim.momentum), ("sdp", 2, 0.0));
        assert_eq!(b.spec.method.masking, "neuron");
        Ok(())
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn tiny_step_reports_a_parseable_last_line() -> Result<()> {
        let b = args("step --model resnet --widths 4,8 --depths 1,1 --batch 2 --steps 3 --warmup 1 --image-size 8")
            .validate()?;
        let r = step(&b)?;
        assert_eq!(r.times.len(), 3);
        assert!(r.step_s > 0.0 && r.img_s > 0.0);
        assert!(r.peak_mb.is_some_and(|m| m >= 0.0));
        let line = r.line();
        let keys: Vec<&str> = line.split(' ').map(|kv| kv.split('=').next().unwrap_or("")).collect();
        assert_eq!(keys, ["step_s", "img_s", "peak_mb"]);
        Ok(())
    }

    #[test]
    fn whole_sdp_step_times_every_worker() -> Result<()> {
        let base = "step --model resnet --widths 4,8 --depths 1,1 --batch 2 --steps 2 --warmup 1 --image-size 8";
        let whole =
            step(&args(&format!("{base} --masking block --workers 4 --coverage 0.5 --all-workers")).validate()?)?;
        assert_eq!(whole.times.len(), 2);
        // K workers' images per step, and the global model's parameters.
        assert!((whole.img_s - 8.0 / whole.step_s).abs() < 1e-6 * whole.img_s);
        assert_eq!(whole.params, step(&args(base).validate()?)?.params);
        // A baseline's whole step: the dropping baseline's K workers on the full model.
        let dropout = format!("{base} --set method.workers=2 --set method.kind=dropout --all-workers");
        let dropout = step(&args(&dropout).validate()?)?;
        assert_eq!(dropout.params, whole.params);
        Ok(())
    }

    #[test]
    fn sdp_worker_subnetwork_is_smaller_than_the_full_model() -> Result<()> {
        let full = args("step --model resnet --widths 4,8 --depths 2,2 --batch 2 --steps 1 --warmup 0 --image-size 8")
            .validate()?;
        let sub = args(
            "step --model resnet --widths 4,8 --depths 2,2 --batch 2 --steps 1 --warmup 0 --image-size 8 \
             --masking block --coverage 0.5 --workers 2",
        )
        .validate()?;
        let (f, s) = (step(&full)?, step(&sub)?);
        assert!(s.params < f.params, "subnetwork {} params, full {}", s.params, f.params);
        Ok(())
    }
}
