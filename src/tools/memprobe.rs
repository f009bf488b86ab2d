//! Measured per-worker memory (the paper only estimated it).
//!
//! `sdp memprobe` runs one worker's training steps alone in a fresh process — its physical subnetwork for
//! SDP, the full model for DP — and reports the peak resident memory above the process's baseline. The
//! baseline is the resident set before any model exists; the global model that the worker's values are
//! gathered from is dropped and the kernel's high-water mark reset (`/proc/self/clear_refs` = 5) before
//! the steps, so the figure is what a process hosting only that worker holds: parameters, gradients,
//! optimizer state, activations and the input batch.
//!
//! On CUDA (`--device cuda:N`) the figure is device memory: the driver's used bytes (total − free)
//! sampled after every forward+backward (the step's high point: activations and gradients alive) and
//! after every update, minus the same figure before the model was built. It counts what candle's
//! allocator holds, so it is an upper bound on live tensors and a lower bound on the true peak
//! between samples; other processes on the card must stay idle while it runs.
//!
//! [`MemoryMeter`] is that measurement, on either device; `sdp bench step` measures with it too.

use crate::optim::lr_at;
use crate::plan::Plan;
use crate::seed::{rng, Stream};
use crate::spec::RunSpec;
use crate::train::loss_and_grads_of;
use crate::train::methods::{self, Site};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::Path;

/// This process's memory on one device above a baseline taken when the meter starts: the one way `sdp
/// memprobe` and `sdp bench step` measure memory.
///
/// CPU: the resident set (`VmRSS` of /proc/self/status); its peak is the kernel's high-water mark
/// (`VmHWM`). CUDA: the device memory in use as the driver reports it (total − free); its peak is the
/// largest of the values [`MemoryMeter::sample`] read, so it is only as good as the moments sampled.
#[derive(Debug)]
pub struct MemoryMeter {
    device: Device,
    /// Bytes in use when the meter started.
    base: u64,
    /// CUDA: the most bytes in use at a sample since the start or the last [`MemoryMeter::restart_peak`].
    sampled: u64,
}

impl MemoryMeter {
    /// Takes the baseline: the memory in use now.
    pub fn start(device: &Device) -> Result<Self> {
        let base = in_use(device)?;
        Ok(Self { device: device.clone(), base, sampled: base })
    }

    /// Restarts the peak at the memory in use now, so that what came before (building a model that is
    /// then dropped) does not count. CPU: resets the kernel's high-water mark (`5` to
    /// /proc/self/clear_refs, Linux ≥ 4.0); an error where that is refused.
    pub fn restart_peak(&mut self) -> Result<()> {
        if self.device.is_cpu() {
            std::fs::write("/proc/self/clear_refs", "5")
                .context("resetting the RSS high-water mark (/proc/self/clear_refs)")
        } else {
            self.sampled = in_use(&self.device)?;
            Ok(())
        }
    }

    /// CUDA: counts the memory in use now towards the peak (call it where a step peaks, after
    /// `device.synchronize()` for the device's settled state). CPU: nothing (the kernel keeps the peak).
    pub fn sample(&mut self) -> Result<()> {
        if !self.device.is_cpu() {
            self.sampled = self.sampled.max(in_use(&self.device)?);
        }
        Ok(())
    }

    /// Peak bytes in use above the baseline.
    pub fn peak_bytes(&self) -> Result<u64> {
        let peak = if self.device.is_cpu() { proc_status_bytes("VmHWM")? } else { self.sampled };
        Ok(peak.saturating_sub(self.base))
    }
}

/// Bytes in use now: the resident set on the CPU, the driver's figure on CUDA.
fn in_use(device: &Device) -> Result<u64> {
    if device.is_cpu() {
        proc_status_bytes("VmRSS")
    } else {
        device_used_bytes(device)
    }
}

/// A `kB` field of /proc/self/status, in bytes.
fn proc_status_bytes(field: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib = parse_status_kib(&text, field).with_context(|| format!("no {field} line in /proc/self/status"))?;
    Ok(kib * 1024)
}

fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// What one probe measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Probe {
    /// Peak resident bytes above the baseline.
    pub peak_bytes: u64,
    /// Scalar parameters the probed worker holds.
    pub params: usize,
}

/// Runs `steps` training steps of one worker of `spec` on seeded random data at the per-worker batch size,
/// in this process, and measures its memory. The worker trains the network its method trains: SDP worker
/// `worker`'s subnetwork (the full model with `worker = None`), `small_dense`'s narrowed model, the
/// dropping baselines' model with their per-step drops, DP's model. Meant to run in a fresh process (`sdp
/// memprobe`): earlier allocations of the process would blur it.
pub fn probe(spec: &RunSpec, worker: Option<usize>, steps: usize, device: &Device, data_dir: &Path) -> Result<Probe> {
    let device = device.clone();
    let plan = Plan::of(spec)?;
    let (shape, task) = (plan.data.shape(&spec.workload, data_dir)?, plan.task.task);
    let classes = shape.classes;
    let mut meter = MemoryMeter::start(&device)?;
    let mut r = rng(spec.seed, Stream::Data, u64::MAX, 0);
    let (x, y) = plan.data.source().random_batch(&shape, spec.workload.batch_size, &mut r).to_tensors(&device)?;
    let site = Site { spec, plan: &plan, classes, device: &device };
    let mut w = methods::of(&spec.method.kind)?.worker_net(site, worker)?;
    let params = w.net.store().num_params();
    meter.restart_peak()?;
    let mut sample = || -> Result<()> {
        device.synchronize()?;
        meter.sample()
    };
    for step in 0..steps.max(1) {
        let (_, grads) = loss_and_grads_of(task, w.net.store(), &w.forward(&x, step + 1, 0)?, &y)?;
        sample()?;
        w.opt.step(&w.net.store().params, &grads, lr_at(&spec.optim, step, steps, steps))?;
        sample()?;
    }
    let peak_bytes = meter.peak_bytes()?;
    Ok(Probe { peak_bytes, params })
}

/// Device memory in use (total − free) on a CUDA device, from the driver.
#[cfg(feature = "cuda")]
fn device_used_bytes(device: &Device) -> Result<u64> {
    let Device::Cuda(d) = device else { bail!("device memory: {device:?} is not a CUDA device") };
    // Binds the device's context to this thread first, then asks the driver.
    let (free, total) = d.cuda_stream().context().mem_get_info().context("cuMemGetInfo")?;
    Ok(total.saturating_sub(free) as u64)
}

/// Device memory in use: only CUDA devices can be asked (and only in a `cuda` build).
#[cfg(not(feature = "cuda"))]
fn device_used_bytes(device: &Device) -> Result<u64> {
    bail!("device memory of {device:?}: this build has no CUDA support (build with --features cuda)")
}

/// Runs `sdp memprobe` in a fresh process for `spec` (written to `spec_json`) and worker `worker`
/// (`None`: the full model) on `device` (`cpu`, `cuda:N`) with the run's data directory, and parses its
/// `peak_bytes=` line.
pub fn probe_subprocess(
    sdp_exe: &Path,
    spec_json: &Path,
    worker: Option<usize>,
    steps: usize,
    device: &str,
    data_dir: &Path,
) -> Result<u64> {
    let mut cmd = std::process::Command::new(sdp_exe);
    cmd.arg("memprobe").arg("--resolved").arg(spec_json).arg("--steps").arg(steps.to_string());
    cmd.arg("--device").arg(device).arg("--data-dir").arg(data_dir);
    match worker {
        Some(k) => cmd.arg("--worker").arg(k.to_string()),
        None => cmd.arg("--worker").arg("full"),
    };
    let out = cmd.output().with_context(|| format!("running {}", sdp_exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("memprobe failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let line = stdout.lines().rev().find(|l| l.starts_with("peak_bytes=")).context("memprobe printed no peak_bytes")?;
    let v = line["peak_bytes=".len()..].split_whitespace().next().unwrap_or_default();
    v.parse().with_context(|| format!("parsing memprobe output {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse_in_kib() {
        let text = "Name:\tsdp\nVmHWM:\t  123456 kB\nVmRSS:\t   1000 kB\n";
        assert_eq!(parse_status_kib(text, "VmHWM"), Some(123456));
        assert_eq!(parse_status_kib(text, "VmRSS"), Some(1000));
        assert_eq!(parse_status_kib(text, "VmPeak"), None);
    }

    #[test]
    fn a_relative_folder_dataset_is_counted_under_the_data_dir() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for (split, class) in
            [("train", "a"), ("train", "b"), ("train", "c"), ("test", "a"), ("test", "b"), ("test", "c")]
        {
            let d = dir.path().join("imgs").join(split).join(class);
            std::fs::create_dir_all(&d)?;
            image::RgbImage::new(4, 6).save(d.join("0.png"))?;
        }
        let text =
            "name = \"t\"\n[workload]\ndataset = \"folder:imgs\"\nmodel = \"resnet18\"\nepochs = 1\nbatch_size = 2\n";
        let w = crate::plan::parse(text, Path::new("t.toml"), &[])?.runs.remove(0).spec.workload;
        let data = crate::data::registry::DataRef::parse(&w.dataset)?;
        let shape = data.shape(&w, dir.path())?;
        assert_eq!((shape.classes, shape.train, shape.test, shape.hw), (3, 3, 3, (6, 4)));
        let e = data.shape(&w, Path::new("/nonexistent")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/imgs"), "{e}");
        Ok(())
    }
}
