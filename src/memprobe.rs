//! Measured per-worker memory (issue: the paper only estimated it).
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

use crate::models;
use crate::optim::{lr_at, Optimizer};
use crate::spec::{DatasetName, MethodKind, RunSpec};
use crate::train::{loss_and_grads, SdpState};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::path::Path;

/// (VmRSS, VmHWM) of this process in bytes, from /proc/self/status.
pub fn rss() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("/proc/self/status has no {name} line"))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("parsing {line:?}"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the resident-set high-water mark to the current resident set (Linux ≥ 4.0).
fn reset_peak() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the RSS high-water mark (/proc/self/clear_refs)")
}

/// Number of classes of a run's dataset, without loading the images (a relative `folder:` path is looked up
/// in `data_dir`, as `sdp run` reads it).
pub fn num_classes(spec: &RunSpec, data_dir: &Path) -> Result<usize> {
    Ok(match spec.dataset()? {
        DatasetName::Shapes | DatasetName::Cifar10 | DatasetName::Svhn => 10,
        DatasetName::Cifar100 => 100,
        DatasetName::Folder(p) => {
            let train = data_dir.join(p).join("train");
            std::fs::read_dir(&train)
                .with_context(|| format!("reading {}", train.display()))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .count()
        }
    })
}

/// What one probe measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Probe {
    /// Peak resident bytes above the baseline.
    pub peak_bytes: u64,
    /// Scalar parameters the probed worker holds.
    pub params: usize,
}

/// Runs `steps` training steps of worker `worker` (SDP) or of the full model (DP, or `worker = None`) of
/// `spec` on seeded random data at the per-worker batch size, in this process, and measures its memory.
/// Meant to run in a fresh process (`sdp memprobe`): earlier allocations of the process would blur it.
pub fn probe(spec: &RunSpec, worker: Option<usize>, steps: usize, device: &Device, data_dir: &Path) -> Result<Probe> {
    let device = device.clone();
    let classes = num_classes(spec, data_dir)?;
    let b = spec.workload.batch_size;
    let (rss0, _) = rss()?;
    let dev0 = if device.is_cpu() { 0 } else { device_used_bytes(&device)? };
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed);
    let x: Vec<f32> = (0..b * 3 * 32 * 32).map(|_| r.random_range(-1.0..1.0)).collect();
    let y: Vec<u32> = (0..b).map(|_| r.random_range(0..classes as u32)).collect();
    let x = Tensor::from_vec(x, (b, 3, 32, 32), &device)?;
    let y = Tensor::from_vec(y, b, &device)?;
    let net: Box<dyn models::Net> = match (spec.method.kind, worker) {
        (MethodKind::Sdp, Some(k)) => SdpState::single_worker(spec, classes, k, &device)?.net,
        _ => models::build(&spec.workload, classes, spec.seed, &device)?,
    };
    let params = net.store().num_params();
    reset_peak()?;
    let mut opt = Optimizer::new(&spec.optim);
    let mut dev_peak = 0u64;
    let mut sample = |device: &Device| -> Result<()> {
        if !device.is_cpu() {
            device.synchronize()?;
            dev_peak = dev_peak.max(device_used_bytes(device)?);
        }
        Ok(())
    };
    for step in 0..steps.max(1) {
        let (_, grads) = loss_and_grads(net.as_ref(), &x, &y)?;
        sample(&device)?;
        opt.step(&net.store().params, &grads, lr_at(&spec.optim, step, steps, steps))?;
        sample(&device)?;
    }
    let peak_bytes = if device.is_cpu() { rss()?.1.saturating_sub(rss0) } else { dev_peak.saturating_sub(dev0) };
    Ok(Probe { peak_bytes, params })
}

/// Device memory in use (total − free) on a CUDA device, from the driver.
#[cfg(feature = "cuda")]
pub fn device_used_bytes(device: &Device) -> Result<u64> {
    let Device::Cuda(d) = device else { bail!("device memory: {device:?} is not a CUDA device") };
    // Binds the device's context to this thread first, then asks the driver.
    let (free, total) = d.cuda_stream().context().mem_get_info().context("cuMemGetInfo")?;
    Ok(total.saturating_sub(free) as u64)
}

/// Device memory in use: only CUDA devices can be asked (and only in a `cuda` build).
#[cfg(not(feature = "cuda"))]
pub fn device_used_bytes(device: &Device) -> Result<u64> {
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
    fn a_relative_folder_dataset_is_counted_under_the_data_dir() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for class in ["a", "b", "c"] {
            std::fs::create_dir_all(dir.path().join("imgs/train").join(class))?;
        }
        let text =
            "name = \"t\"\n[workload]\ndataset = \"folder:imgs\"\nmodel = \"resnet18\"\nepochs = 1\nbatch_size = 2\n";
        let spec = crate::spec::parse(text, Path::new("t.toml"), &[])?.runs.remove(0).spec;
        assert_eq!(num_classes(&spec, dir.path())?, 3);
        let e = num_classes(&spec, Path::new("/nonexistent")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/imgs/train"), "{e}");
        Ok(())
    }
}
