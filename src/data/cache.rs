//! Compact u8 cache of a decoded dataset, written once next to its source files.
//!
//! Decoding 60,000 JPEGs (or inflating SVHN's compressed MATLAB files) on every run would dominate short
//! experiments, so a reader decodes once and stores both splits in `<source>/.sdp-cache-v1.bin`. The cache is
//! keyed by a [`Fingerprint`] of the source files (relative path, size, mtime of each), so editing, adding or
//! removing a source file invalidates it. It is written to a temporary file and renamed into place, so a crash
//! never leaves a partial cache; a cache that is short, corrupt (CRC mismatch) or stale is ignored and rebuilt.
//!
//! File layout (all integers little-endian):
//!
//! | field | bytes |
//! |---|---|
//! | magic `SDPCACHE` | 8 |
//! | format version (u32, = 1) | 4 |
//! | fingerprint | 32 |
//! | h, w, c (u32 each) | 12 |
//! | number of classes (u32), train count (u64), test count (u64) | 20 |
//! | class names: u32 byte length + UTF-8 bytes, per class | … |
//! | train labels, test labels (u32 each) | 4·(n_train + n_test) |
//! | train images, test images (u8, N×H×W×C) | … |
//! | CRC-32 of everything above (u32) | 4 |

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use super::ImageSet;

/// File name of the cache inside the source directory.
pub const CACHE_FILE: &str = ".sdp-cache-v1.bin";
const MAGIC: &[u8; 8] = b"SDPCACHE";
const VERSION: u32 = 1;
/// Upper bound on one class name; anything longer means a corrupt header, not a real name.
const MAX_NAME_LEN: u32 = 4096;

/// Where the cache of the dataset whose files live in `source_dir` is stored.
pub fn cache_path(source_dir: &Path) -> PathBuf {
    source_dir.join(CACHE_FILE)
}

/// SHA-256 over the reader kind and each source file's relative path, size and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of `files` (paths under `base`, in the order the reader will decode them). `kind` names the
    /// reader and its options (`"folder"`, `"svhn"` …) so two readers never share a cache by accident.
    pub fn of_files(kind: &str, base: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(b"sdp-cache-v1\0");
        h.update(kind.as_bytes());
        h.update(b"\0");
        for f in files {
            let meta = std::fs::metadata(f).with_context(|| format!("reading {}", f.display()))?;
            let rel = f.strip_prefix(base).unwrap_or(f);
            h.update(rel.to_string_lossy().as_bytes());
            h.update(b"\0");
            h.update(meta.len().to_le_bytes());
            // A file system without mtimes (or one before 1970) still gets a stable fingerprint from sizes.
            let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
            h.update(mtime.as_secs().to_le_bytes());
            h.update(mtime.subsec_nanos().to_le_bytes());
        }
        Ok(Self(h.finalize().into()))
    }
}

/// What a cache holds: both decoded splits and the class names.
#[derive(Clone, Debug, PartialEq)]
pub struct Cached {
    pub train: ImageSet,
    pub test: ImageSet,
    pub classes: Vec<String>,
}

/// The cached data at `path` if it is present, intact and made from the same sources (`fp`); otherwise `build`
/// it and store it at `path`. A cache that cannot be written (read-only source directory) only earns a warning.
pub fn load_or_build(path: &Path, fp: &Fingerprint, build: impl FnOnce() -> Result<Cached>) -> Result<Cached> {
    if path.exists() {
        match read(path, fp) {
            Ok(c) => return Ok(c),
            Err(e) => crate::say!("note: rebuilding cache: {e:#}"),
        }
    }
    let data = build()?;
    if let Err(e) = write(path, fp, &data) {
        crate::say!("warning: could not write cache (data decoded again next run): {e:#}");
    }
    Ok(data)
}

/// Reads the cache at `path`, failing if it is short, corrupt, of another version, or not made from `fp`.
pub fn read(path: &Path, fp: &Fingerprint) -> Result<Cached> {
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let file_len = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
    let mut r = CrcReader { inner: BufReader::with_capacity(1 << 20, file), crc: crc32fast::Hasher::new() };
    read_body(&mut r, fp, file_len).with_context(|| format!("cache {} is unusable", path.display()))
}

fn read_body<R: Read>(r: &mut CrcReader<R>, fp: &Fingerprint, file_len: u64) -> Result<Cached> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).context("reading the header")?;
    ensure!(&magic == MAGIC, "not an sdp cache file (bad magic)");
    let version = read_u32(r)?;
    ensure!(version == VERSION, "cache format version {version}, this build reads {VERSION}");
    let mut stored_fp = [0u8; 32];
    r.read_exact(&mut stored_fp).context("reading the header")?;
    ensure!(stored_fp == fp.0, "source files changed since the cache was written");
    let (h, w, c) = (read_u32(r)? as u64, read_u32(r)? as u64, read_u32(r)? as u64);
    let n_classes = read_u32(r)?;
    let (n_train, n_test) = (read_u64(r)?, read_u64(r)?);
    // Check every size against the file length before allocating, so a corrupt header cannot ask for terabytes.
    let img = h.checked_mul(w).and_then(|x| x.checked_mul(c));
    let n = n_train.checked_add(n_test);
    let payload = match (img, n) {
        (Some(img), Some(n)) => n.checked_mul(4).zip(n.checked_mul(img)).and_then(|(a, b)| a.checked_add(b)),
        _ => None,
    };
    if payload.filter(|&p| p <= file_len).is_none() {
        bail!("header declares more data than the file's {file_len} bytes (truncated?)");
    }
    ensure!((n_classes as u64) <= file_len, "header declares {n_classes} classes (corrupt)");
    let mut classes = Vec::with_capacity(n_classes as usize);
    for _ in 0..n_classes {
        let len = read_u32(r)?;
        ensure!(len <= MAX_NAME_LEN, "class name of {len} bytes (corrupt header)");
        let mut buf = vec![0u8; len as usize];
        r.read_exact(&mut buf).context("reading class names (truncated?)")?;
        classes.push(String::from_utf8(buf).context("class name is not UTF-8")?);
    }
    let train_labels = read_labels(r, n_train as usize, n_classes)?;
    let test_labels = read_labels(r, n_test as usize, n_classes)?;
    let img = (h * w * c) as usize;
    let mut train_images = vec![0u8; n_train as usize * img];
    r.read_exact(&mut train_images).context("reading train images (truncated?)")?;
    let mut test_images = vec![0u8; n_test as usize * img];
    r.read_exact(&mut test_images).context("reading test images (truncated?)")?;
    let computed = r.crc.clone().finalize();
    let mut stored = [0u8; 4];
    r.inner.read_exact(&mut stored).context("reading the checksum (truncated?)")?;
    ensure!(u32::from_le_bytes(stored) == computed, "checksum mismatch (corrupt file)");
    let mut extra = [0u8; 1];
    ensure!(r.inner.read(&mut extra)? == 0, "trailing bytes after the checksum (corrupt file)");
    let (h, w, c) = (h as usize, w as usize, c as usize);
    Ok(Cached {
        train: ImageSet::new(train_images, train_labels, h, w, c)?,
        test: ImageSet::new(test_images, test_labels, h, w, c)?,
        classes,
    })
}

fn read_labels<R: Read>(r: &mut CrcReader<R>, n: usize, n_classes: u32) -> Result<Vec<u32>> {
    let mut raw = vec![0u8; n * 4];
    r.read_exact(&mut raw).context("reading labels (truncated?)")?;
    let labels: Vec<u32> = raw.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l >= n_classes) {
        bail!("label {l} of image {i} is out of range for {n_classes} classes (corrupt file)");
    }
    Ok(labels)
}

fn read_u32<R: Read>(r: &mut R) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).context("reading the header (truncated?)")?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64<R: Read>(r: &mut R) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).context("reading the header (truncated?)")?;
    Ok(u64::from_le_bytes(b))
}

/// Writes `data` to `path` atomically: a temporary file in the same directory, synced, then renamed over `path`.
pub fn write(path: &Path, fp: &Fingerprint, data: &Cached) -> Result<()> {
    let (train, test) = (&data.train, &data.test);
    ensure!(
        (train.h, train.w, train.c) == (test.h, test.w, test.c),
        "train images are {}x{}x{} but test images are {}x{}x{}",
        train.h,
        train.w,
        train.c,
        test.h,
        test.w,
        test.c
    );
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let tmp = dir.join(format!("{name}.{}-{nanos}.tmp", std::process::id()));
    let result = write_file(&tmp, fp, data).and_then(|()| {
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_file(tmp: &Path, fp: &Fingerprint, data: &Cached) -> Result<()> {
    let file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = CrcWriter { inner: BufWriter::with_capacity(1 << 20, file), crc: crc32fast::Hasher::new() };
    let (train, test) = (&data.train, &data.test);
    let put =
        |w: &mut CrcWriter<_>, bytes: &[u8]| w.write_all(bytes).with_context(|| format!("writing {}", tmp.display()));
    put(&mut w, MAGIC)?;
    put(&mut w, &VERSION.to_le_bytes())?;
    put(&mut w, &fp.0)?;
    for v in [train.h, train.w, train.c, data.classes.len()] {
        put(&mut w, &u32::try_from(v).context("dimension does not fit the cache header")?.to_le_bytes())?;
    }
    put(&mut w, &(train.len() as u64).to_le_bytes())?;
    put(&mut w, &(test.len() as u64).to_le_bytes())?;
    for name in &data.classes {
        put(&mut w, &(name.len() as u32).to_le_bytes())?;
        put(&mut w, name.as_bytes())?;
    }
    for set in [train, test] {
        let raw: Vec<u8> = set.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        put(&mut w, &raw)?;
    }
    put(&mut w, &train.images)?;
    put(&mut w, &test.images)?;
    let crc = w.crc.clone().finalize();
    let mut inner = w.inner;
    inner.write_all(&crc.to_le_bytes()).with_context(|| format!("writing {}", tmp.display()))?;
    let file = inner.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all().with_context(|| format!("writing {}", tmp.display()))?;
    Ok(())
}

struct CrcReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
