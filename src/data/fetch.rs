//! Downloading the official dataset files (`sdp data fetch cifar10|cifar100|svhn`) and reporting what a data
//! directory holds (`sdp data info …`); docs/design.md §6.
//!
//! A download goes to `<file>.part` and is resumed with an HTTP `Range` request, both after a connection cut
//! during the same call (retried while each attempt makes progress) and across calls. A finished download is
//! md5-checked before it is renamed into place. **On an md5 mismatch the `.part` file is deleted**: its bytes are
//! wrong somewhere, so resuming from it could never produce the right file. CIFAR archives are kept in the data
//! directory after extraction (so `info` can verify them and a second `fetch` is a no-op) and extracted through a
//! temporary directory, so an interrupted extraction never leaves a half-written dataset directory. SVHN files are
//! placed in `<data_dir>/svhn/`. A file already present with the right md5 is not downloaded again.
//!
//! The official URLs and sums are in [`official`]; [`fetch_from`] takes any [`Source`], so tests serve files from
//! a local HTTP server instead of the internet.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::remote::RemoteFile;
use anyhow::{bail, Context, Result};
use md5::{Digest, Md5};

/// A dataset's downloadable files.
#[derive(Clone, Debug)]
pub struct Source {
    /// Dataset name as given to `sdp data fetch`.
    pub name: String,
    pub files: Vec<RemoteFile>,
}

/// The official files of a registered dataset (`cifar10`, `cifar100`, `svhn`; URLs and md5 sums in each
/// source's file); a dataset with none to download is an error.
pub fn official(name: &str) -> Result<Source> {
    let files = super::registry::DataRef::parse(name)?.source().files();
    if files.is_empty() {
        let with: Vec<&str> = super::registry::REGISTRY
            .all()
            .into_iter()
            .filter(|r| !r.source.files().is_empty())
            .map(|r| r.name)
            .collect();
        bail!("no official files to fetch for dataset `{name}` (datasets with official files: {})", with.join(", "));
    }
    Ok(Source { name: name.into(), files })
}

/// Downloads, verifies and unpacks the official files of `name` (`cifar10`, `cifar100`, `svhn`) into `data_dir`.
pub fn fetch(name: &str, data_dir: &Path) -> Result<()> {
    fetch_from(&official(name)?, data_dir)
}

/// [`fetch`] for any list of files (tests point it at a local server).
pub fn fetch_from(source: &Source, data_dir: &Path) -> Result<()> {
    for f in &source.files {
        fetch_file(&source.name, f, data_dir)?;
    }
    Ok(())
}

fn fetch_file(name: &str, f: &RemoteFile, data_dir: &Path) -> Result<()> {
    let dest = f.local_path(data_dir);
    let extracted = !f.extracts.is_empty() && f.extracts.iter().all(|p| data_dir.join(p).is_file());
    if dest.exists() {
        let sum = md5_file(&dest)?;
        if sum == f.md5 {
            if !f.extracts.is_empty() && !extracted {
                extract_tar_gz(&dest, data_dir)?;
            }
            crate::say!("{}: present, md5 ok", dest.display());
            return Ok(());
        }
        crate::say!("{}: md5 {sum} but expected {}; downloading it again", dest.display(), f.md5);
        std::fs::remove_file(&dest).with_context(|| format!("removing {}", dest.display()))?;
    } else if extracted {
        crate::say!("{}: already extracted (archive not kept), nothing to do", data_dir.display());
        return Ok(());
    }
    let dir = dest.parent().unwrap_or(data_dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let part = PathBuf::from(format!("{}.part", dest.display()));
    download(&f.url, &part).map_err(|e| {
        e.context(format!(
            "downloading {} failed. If this machine is offline, download that URL elsewhere, place the file at {} \
             (md5 {}) and run `sdp data fetch {name}` again",
            f.url,
            dest.display(),
            f.md5
        ))
    })?;
    let sum = md5_file(&part)?;
    if sum != f.md5 {
        std::fs::remove_file(&part).with_context(|| format!("removing {}", part.display()))?;
        bail!(
            "md5 mismatch for {} downloaded from {}: got {sum}, expected {} (the download was deleted; run the \
             fetch again)",
            dest.display(),
            f.url,
            f.md5
        );
    }
    std::fs::rename(&part, &dest).with_context(|| format!("renaming {} to {}", part.display(), dest.display()))?;
    crate::say!("{}: downloaded, md5 ok", dest.display());
    if !f.extracts.is_empty() {
        extract_tar_gz(&dest, data_dir)?;
    }
    Ok(())
}

/// Downloads `url` into `part`, resuming from its current length. Retries after a failed attempt as long as the
/// attempt added bytes, so a flaky connection finishes but an unreachable server fails at once.
fn download(url: &str, part: &Path) -> Result<()> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    const MAX_ATTEMPTS: usize = 20;
    let mut last_err = None;
    for _ in 0..MAX_ATTEMPTS {
        let before = part_len(part)?;
        match attempt(&agent, url, part, before) {
            Ok(()) => return Ok(()),
            Err(e) => {
                let after = part_len(part)?;
                if after <= before {
                    return Err(e);
                }
                crate::say!("{url}: connection lost after {after} bytes ({e:#}); resuming");
                last_err = Some(e);
            }
        }
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context(format!("gave up after {MAX_ATTEMPTS} attempts")))
}

fn part_len(part: &Path) -> Result<u64> {
    match std::fs::metadata(part) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("reading {}", part.display())),
    }
}

/// One HTTP request: a `Range` request when `have > 0`. 206 appends, 200 (server ignored the range) restarts, 416
/// means the part is already complete.
fn attempt(agent: &ureq::Agent, url: &str, part: &Path, have: u64) -> Result<()> {
    let mut req = agent.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(()),
        Err(ureq::Error::Status(code, r)) => {
            bail!("server answered HTTP {code} {}", r.status_text())
        }
        Err(e) => return Err(e).context("could not connect"),
    };
    let content_len: Option<u64> = resp.header("Content-Length").and_then(|v| v.trim().parse().ok());
    let (start, total) = match resp.status() {
        206 => {
            // Content-Range: bytes START-END/TOTAL
            let cr = resp.header("Content-Range").unwrap_or_default().to_string();
            let start: Option<u64> =
                cr.strip_prefix("bytes ").and_then(|s| s.split('-').next()).and_then(|s| s.trim().parse().ok());
            if start != Some(have) {
                bail!("server answered a request for bytes {have}- with Content-Range `{cr}`");
            }
            let total = cr.rsplit('/').next().and_then(|t| t.trim().parse().ok());
            (have, total.or(content_len.map(|l| l + have)))
        }
        200 => (0, content_len),
        code => bail!("server answered HTTP {code} {}", resp.status_text()),
    };
    let mut out = if start == 0 {
        File::create(part).with_context(|| format!("creating {}", part.display()))?
    } else {
        OpenOptions::new().append(true).open(part).with_context(|| format!("opening {}", part.display()))?
    };
    let mut progress = Progress::new(url, start, total);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = start;
    loop {
        let n = reader.read(&mut buf).context("reading the response body")?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).with_context(|| format!("writing {}", part.display()))?;
        done += n as u64;
        progress.set(done);
    }
    out.sync_all().with_context(|| format!("writing {}", part.display()))?;
    progress.finish();
    if let Some(t) = total {
        if done != t {
            bail!("connection closed after {done} of {t} bytes");
        }
    }
    Ok(())
}

/// A progress bar on a terminal; plain lines every 10% otherwise (logs, CI).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    url: String,
    total: Option<u64>,
    next_report: u64,
}

impl Progress {
    fn new(url: &str, start: u64, total: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
            bar.set_position(start);
            bar
        });
        if bar.is_none() {
            let size = total.map(|t| format!(" ({t} bytes)")).unwrap_or_default();
            let from = if start > 0 { format!(", resuming at byte {start}") } else { String::new() };
            crate::say!("downloading {url}{size}{from}");
        }
        let step = total.map(|t| t / 10).unwrap_or(u64::MAX).max(1);
        Self { bar, url: url.into(), total, next_report: (start / step + 1) * step }
    }

    fn set(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        } else if let Some(t) = self.total.filter(|&t| t > 0) {
            if done >= self.next_report && done < t {
                crate::say!("{}: {}% ({done} of {t} bytes)", self.url, done * 100 / t);
                let step = (t / 10).max(1);
                self.next_report = (done / step + 1) * step;
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Lowercase hex md5 of a file.
pub fn md5_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Extracts `archive` into `data_dir` through a temporary directory, then moves each top-level entry into place
/// (replacing an older copy), so a crash mid-extraction leaves no half-written dataset directory behind.
fn extract_tar_gz(archive: &Path, data_dir: &Path) -> Result<()> {
    let name = archive.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = data_dir.join(format!(".{name}.extracting"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let file = File::open(archive).with_context(|| format!("reading {}", archive.display()))?;
    tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
        .unpack(&tmp)
        .with_context(|| format!("extracting {} into {}", archive.display(), tmp.display()))?;
    for entry in std::fs::read_dir(&tmp).with_context(|| format!("reading {}", tmp.display()))? {
        let entry = entry.with_context(|| format!("reading {}", tmp.display()))?;
        let target = data_dir.join(entry.file_name());
        if target.is_dir() {
            std::fs::remove_dir_all(&target).with_context(|| format!("replacing {}", target.display()))?;
        } else if target.exists() {
            std::fs::remove_file(&target).with_context(|| format!("replacing {}", target.display()))?;
        }
        std::fs::rename(entry.path(), &target)
            .with_context(|| format!("moving {} to {}", entry.path().display(), target.display()))?;
    }
    std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    crate::say!("{}: extracted into {}", archive.display(), data_dir.display());
    Ok(())
}

/// What `sdp data info` reports: the text, and whether the dataset loaded (the command's exit status).
#[derive(Clone, Debug)]
pub struct Info {
    pub text: String,
    pub loadable: bool,
}

impl std::fmt::Display for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A human-readable report on dataset `name` (`shapes`, `cifar10`, `cifar100`, `svhn` or `folder:<path>`) in
/// `data_dir`: md5 status of the official files, samples per split and per class, image size, and where the
/// cache is. A dataset that fails to load is reported with the reason (and `loadable = false`), not an
/// error; an unknown name is.
pub fn info(name: &str, data_dir: &Path) -> Result<Info> {
    let mut s = String::new();
    let data = super::registry::DataRef::parse(name)?;
    let req =
        super::source::Request { data_dir, arg: data.arg.as_deref(), train: None, test: None, seed: 0, context: None };
    let source = data.source();
    if source.generated() {
        let _ = writeln!(s, "{name}: generated in memory (data_seed 0, the default sizes)");
    } else if data.arg.is_some() {
        let _ = writeln!(s, "{name}: at {}", req.path().display());
    } else {
        let _ = writeln!(s, "{name} in {}", data_dir.display());
    }
    let files = source.files();
    if !files.is_empty() {
        let _ = writeln!(s, "official files:");
    }
    for f in &files {
        let path = f.local_path(data_dir);
        let status = if !path.exists() {
            "missing".to_string()
        } else {
            match md5_file(&path) {
                Ok(sum) if sum == f.md5 => format!("ok (md5 {sum})"),
                Ok(sum) => format!("mismatch (md5 {sum}, expected {})", f.md5),
                Err(e) => format!("unreadable ({e:#})"),
            }
        };
        let _ = writeln!(s, "  {}: {status}", path.display());
    }
    let loaded = source.load(&req);
    let cache_note = match source.cache(&req) {
        Some(p) => describe_cache(&p),
        None if source.generated() => "none (generated)".into(),
        None => "none (the files are read directly)".into(),
    };
    let loadable = loaded.is_ok();
    match loaded {
        Ok(ds) => match (ds.train.images(), ds.test.images()) {
            (Some(t), Some(test)) => {
                let _ = writeln!(
                    s,
                    "train: {} images, test: {} images, {}x{}x{} (HxWxC), {} classes",
                    t.len(),
                    test.len(),
                    t.h,
                    t.w,
                    t.c,
                    ds.num_classes()
                );
                let _ = writeln!(s, "mean {:?}, std {:?}", ds.mean, ds.std);
                let (tr, te) = (t.class_counts(ds.num_classes()), test.class_counts(ds.num_classes()));
                let width = ds.classes.iter().map(String::len).max().unwrap_or(0);
                let _ = writeln!(s, "per class (train / test):");
                for (i, c) in ds.classes.iter().enumerate() {
                    let _ = writeln!(s, "  {i:>3} {c:<width$}  {} / {}", tr[i], te[i]);
                }
            }
            _ => {
                let _ = writeln!(
                    s,
                    "train: {} examples, test: {} examples, input shape {:?}, {} classes",
                    ds.train.len(),
                    ds.test.len(),
                    ds.train.input_shape(),
                    ds.num_classes()
                );
            }
        },
        Err(e) => {
            let _ = writeln!(s, "not loadable: {e:#}");
        }
    }
    for note in source.notes(&req) {
        let _ = writeln!(s, "{note}");
    }
    let _ = writeln!(s, "cache: {cache_note}");
    Ok(Info { text: s, loadable })
}

fn describe_cache(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!("{} ({} bytes)", path.display(), m.len()),
        Err(_) => format!("{} (not written)", path.display()),
    }
}
