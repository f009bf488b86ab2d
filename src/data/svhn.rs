//! Reader for the official SVHN cropped-digits files (`train_32x32.mat`, `test_32x32.mat`; docs/design.md §6).
//!
//! The files are MATLAB v5 MAT-files holding `X` (uint8, 32×32×3×N, column-major) and `y` (N×1, label 10 meaning
//! digit 0). No crate reads these robustly, so this module carries a small reader of exactly what is needed: the
//! 128-byte header, `miCOMPRESSED` (zlib) and plain `miMATRIX` elements, the small-data-element format, and
//! numeric arrays stored in any MATLAB numeric type (MATLAB often stores a double array as uint8 on disk).
//! Little-endian files only (every file MATLAB writes on x86 and ARM).
//!
//! Inflating and transposing ~230 MB takes a few seconds, so the decoded splits are cached next to the files
//! (see [`super::cache`]).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use super::cache::{self, Cached, Fingerprint};
use super::remote::RemoteFile;
use super::source::{Official, Shape};
use super::{ImageData, ImageSet};

/// Directory under the data directory that holds the SVHN files.
pub const SVHN_DIR: &str = "svhn";
/// Class names in label order: label `d` is digit `d` (the file's label 10 becomes 0).
pub const SVHN_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// Where the official files are downloaded from.
const STANFORD: &str = "http://ufldl.stanford.edu/housenumbers";

/// The registered `svhn` source: the official cropped-digits MAT-files, decoded once into a cache.
pub const SVHN: Official = Official {
    shape: Shape { train: 73_257, test: 26_032, classes: 10, hw: (32, 32) },
    files: || {
        [
            ("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
            ("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
        ]
        .into_iter()
        .map(|(f, md5)| RemoteFile {
            url: format!("{STANFORD}/{f}"),
            md5: md5.into(),
            dir: PathBuf::from(SVHN_DIR),
            extracts: vec![],
        })
        .collect()
    },
    load: load_svhn,
    cache: Some(|data_dir| cache::cache_path(&data_dir.join(SVHN_DIR))),
};

/// Loads SVHN from `<data_dir>/svhn/{train,test}_32x32.mat`, through the cache in `<data_dir>/svhn/`.
pub fn load_svhn(data_dir: &Path) -> Result<ImageData> {
    let dir = data_dir.join(SVHN_DIR);
    let files = svhn_files(data_dir);
    for f in &files {
        if !f.exists() {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            bail!(
                "{} not found: run `sdp data fetch svhn` (or download {STANFORD}/{name} by hand into {})",
                f.display(),
                dir.display()
            );
        }
    }
    let fp = Fingerprint::of_files("svhn", &dir, &files)?;
    let cached = cache::load_or_build(&cache::cache_path(&dir), &fp, || {
        Ok(Cached {
            train: read_svhn_mat(&files[0])?,
            test: read_svhn_mat(&files[1])?,
            classes: SVHN_CLASSES.iter().map(|s| s.to_string()).collect(),
        })
    })?;
    Ok(ImageData {
        name: "svhn".into(),
        train: cached.train,
        test: cached.test,
        classes: cached.classes,
        mean: [0.4377, 0.4438, 0.4728],
        std: [0.1980, 0.2010, 0.1970],
    })
}

/// The files [`load_svhn`] reads: train then test.
pub fn svhn_files(data_dir: &Path) -> Vec<PathBuf> {
    let dir = data_dir.join(SVHN_DIR);
    vec![dir.join("train_32x32.mat"), dir.join("test_32x32.mat")]
}

/// Reads one SVHN split (`X` and `y`) from a MAT-file, without the cache.
pub fn read_svhn_mat(path: &Path) -> Result<ImageSet> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut vars = read_mat(&bytes, &["X", "y"]).with_context(|| format!("reading {}", path.display()))?;
    let x = vars.remove("X").with_context(|| format!("{}: no variable `X` (the images)", path.display()))?;
    let y = vars.remove("y").with_context(|| format!("{}: no variable `y` (the labels)", path.display()))?;

    // MATLAB drops trailing singleton dimensions: a file of one image has dims 32×32×3.
    let mut d = x.dims.clone();
    d.resize(4.max(d.len()), 1);
    ensure!(d.len() == 4 && d[2] == 3, "{}: `X` has dims {:?}, expected H×W×3×N", path.display(), x.dims);
    let (h, w, n) = (d[0], d[1], d[3]);
    ensure!(
        y.numel() == n && y.dims.iter().filter(|&&k| k != 1).count() <= 1,
        "{}: `y` has dims {:?}, expected {n}×1 to match `X`'s {n} images",
        path.display(),
        y.dims
    );
    let pixels = x.into_u8().with_context(|| format!("{}: variable `X`", path.display()))?;
    let labels = y.labels().with_context(|| format!("{}: variable `y`", path.display()))?;

    // Column-major X(h, w, c, n) sits at h + H*(w + W*(c + 3*n)): each image is a contiguous block of three
    // planes, each plane stored column by column. Interleave to row-major HWC.
    let img = h * w * 3;
    let mut images = vec![0u8; n * img];
    images.par_chunks_mut(img).zip(pixels.par_chunks_exact(img)).for_each(|(dst, src)| {
        for c in 0..3 {
            for col in 0..w {
                let plane_col = &src[h * (col + w * c)..][..h];
                for (row, &v) in plane_col.iter().enumerate() {
                    dst[(row * w + col) * 3 + c] = v;
                }
            }
        }
    });
    ImageSet::new(images, labels, h, w, 3)
}

// MAT v5 data types (the `mi*` constants of the format description).
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
// Array classes (`mx*_CLASS`) that hold plain numeric data.
const MX_DOUBLE: u8 = 6;
const MX_UINT64: u8 = 15;
const MX_COMPLEX_FLAG: u32 = 0x0800;

/// A real numeric array from a MAT-file: its dims and its data, still in the on-disk storage type.
#[derive(Debug)]
struct MatArray {
    dims: Vec<usize>,
    data_type: u32,
    data: Vec<u8>,
}

impl MatArray {
    fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The values as f64, whatever the storage type.
    fn values(&self) -> Result<Vec<f64>> {
        fn conv<const N: usize>(d: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
            d.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect()
        }
        let d = &self.data;
        Ok(match self.data_type {
            MI_INT8 => d.iter().map(|&b| b as i8 as f64).collect(),
            MI_UINT8 => d.iter().map(|&b| b as f64).collect(),
            MI_INT16 => conv(d, |b| i16::from_le_bytes(b) as f64),
            MI_UINT16 => conv(d, |b| u16::from_le_bytes(b) as f64),
            MI_INT32 => conv(d, |b| i32::from_le_bytes(b) as f64),
            MI_UINT32 => conv(d, |b| u32::from_le_bytes(b) as f64),
            MI_SINGLE => conv(d, |b| f32::from_le_bytes(b) as f64),
            MI_DOUBLE => conv(d, f64::from_le_bytes),
            MI_INT64 => conv(d, |b| i64::from_le_bytes(b) as f64),
            MI_UINT64 => conv(d, |b| u64::from_le_bytes(b) as f64),
            t => bail!("unsupported numeric storage type {t}"),
        })
    }

    /// The values as u8 pixels; a uint8-stored array is used as is, others must hold whole numbers 0..=255.
    fn into_u8(self) -> Result<Vec<u8>> {
        if self.data_type == MI_UINT8 {
            return Ok(self.data);
        }
        self.values()?
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                if v.fract() == 0.0 && (0.0..=255.0).contains(&v) {
                    Ok(v as u8)
                } else {
                    bail!("element {i} is {v}, not a pixel value 0..=255")
                }
            })
            .collect()
    }

    /// SVHN labels 1..=10 to digits 0..=9 (10 means digit 0).
    fn labels(&self) -> Result<Vec<u32>> {
        self.values()?
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                if v.fract() == 0.0 && (1.0..=10.0).contains(&v) {
                    Ok(v as u32 % 10)
                } else {
                    bail!("record {i} has label {v}; SVHN labels are 1..=10 (10 means digit 0)")
                }
            })
            .collect()
    }
}

/// Reads the numeric arrays named in `wanted` from the bytes of a MAT v5 file; other variables are skipped.
fn read_mat(bytes: &[u8], wanted: &[&str]) -> Result<HashMap<String, MatArray>> {
    ensure!(bytes.len() >= 128, "file of {} bytes is shorter than the 128-byte MAT-file header", bytes.len());
    let text = String::from_utf8_lossy(&bytes[..116]);
    if text.starts_with("MATLAB 7.3") {
        bail!("MAT-file version 7.3 (HDF5) is not supported; save with `-v7` or `-v6`");
    }
    ensure!(
        text.starts_with("MATLAB 5.0 MAT-file"),
        "not a MATLAB v5 MAT-file (header text does not start with \"MATLAB 5.0 MAT-file\")"
    );
    match &bytes[126..128] {
        b"IM" => {}
        b"MI" => bail!("big-endian MAT-file is not supported"),
        other => bail!("bad endian indicator {other:?} at byte offset 126 (expected \"IM\")"),
    }
    let mut out = HashMap::new();
    let mut pos = 128;
    while pos < bytes.len() {
        // Some writers pad the file end with zeros; a zero tag cannot start a real element.
        if bytes[pos..].iter().all(|&b| b == 0) {
            break;
        }
        let (ty, len, data_at) = tag(bytes, pos)?;
        let end = data_at + len;
        let Some(body) = bytes.get(data_at..end) else {
            bail!(
                "data element at byte offset {pos} declares {len} bytes but only {} remain (truncated file?)",
                bytes.len().saturating_sub(data_at)
            );
        };
        match ty {
            MI_COMPRESSED => {
                let mut inflated = Vec::new();
                flate2::read::ZlibDecoder::new(body)
                    .read_to_end(&mut inflated)
                    .with_context(|| format!("inflating the compressed element at byte offset {pos} (corrupt?)"))?;
                let (ity, ilen, iat) =
                    tag(&inflated, 0).with_context(|| format!("in the compressed element at byte offset {pos}"))?;
                ensure!(
                    ity == MI_MATRIX && iat + ilen <= inflated.len(),
                    "compressed element at byte offset {pos} holds type {ity} of {ilen} bytes in {} inflated bytes \
                     (expected a miMATRIX)",
                    inflated.len()
                );
                read_matrix(&inflated[iat..iat + ilen], wanted, &mut out)
                    .with_context(|| format!("in the compressed element at byte offset {pos}"))?;
                // Compressed elements are not padded.
                pos = end;
            }
            MI_MATRIX => {
                read_matrix(body, wanted, &mut out).with_context(|| format!("in the matrix at byte offset {pos}"))?;
                pos = pad8(end);
            }
            _ => pos = pad8(end),
        }
    }
    Ok(out)
}

/// Parses a data-element tag at `pos`: (type, byte count, offset of the data). Handles the small-element format,
/// where the byte count sits in the upper half of the first word and up to 4 data bytes follow in the same 8.
fn tag(bytes: &[u8], pos: usize) -> Result<(u32, usize, usize)> {
    let Some(t) = bytes.get(pos..pos + 8) else {
        bail!("data element tag at byte offset {pos} runs past the end ({} bytes; truncated?)", bytes.len());
    };
    let first = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
    if first >> 16 != 0 {
        let len = (first >> 16) as usize;
        ensure!(len <= 4, "small data element at byte offset {pos} declares {len} bytes (at most 4 fit)");
        Ok((first & 0xffff, len, pos + 4))
    } else {
        Ok((first, u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize, pos + 8))
    }
}

fn pad8(x: usize) -> usize {
    x.div_ceil(8) * 8
}

/// A sub-element of a matrix: (type, data) and the offset after it (padded to 8 bytes).
fn sub_element(body: &[u8], pos: usize, what: &str) -> Result<(u32, std::ops::Range<usize>, usize)> {
    let (ty, len, at) = tag(body, pos).with_context(|| format!("reading the {what}"))?;
    ensure!(at + len <= body.len(), "the {what} at offset {pos} runs past the end of its matrix");
    // A small element occupies exactly 8 bytes; a normal one is padded to a multiple of 8.
    let next = if at == pos + 4 { pos + 8 } else { pad8(at + len) };
    Ok((ty, at..at + len, next))
}

/// Reads one miMATRIX body (array flags, dims, name, real part) into `out` if its name is wanted.
fn read_matrix(body: &[u8], wanted: &[&str], out: &mut HashMap<String, MatArray>) -> Result<()> {
    let (ty, flags, pos) = sub_element(body, 0, "array flags")?;
    ensure!(ty == MI_UINT32 && flags.len() == 8, "array flags have type {ty} and {} bytes", flags.len());
    let flags = u32::from_le_bytes(body[flags.start..flags.start + 4].try_into()?);
    let class = (flags & 0xff) as u8;
    let (ty, dims, pos) = sub_element(body, pos, "dimensions")?;
    ensure!(ty == MI_INT32 && dims.len() % 4 == 0, "dimensions have type {ty} and {} bytes", dims.len());
    let dims: Vec<usize> =
        body[dims].chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]).max(0) as usize).collect();
    let (_, name, pos) = sub_element(body, pos, "array name")?;
    let name = String::from_utf8_lossy(&body[name]).into_owned();
    if !wanted.contains(&name.as_str()) {
        return Ok(());
    }
    ensure!((MX_DOUBLE..=MX_UINT64).contains(&class), "variable `{name}` has array class {class}, not a numeric array");
    ensure!(flags & MX_COMPLEX_FLAG == 0, "variable `{name}` is complex");
    let (data_type, data, _) = sub_element(body, pos, "real part")?;
    let width = match data_type {
        MI_INT8 | MI_UINT8 => 1,
        MI_INT16 | MI_UINT16 => 2,
        MI_INT32 | MI_UINT32 | MI_SINGLE => 4,
        MI_DOUBLE | MI_INT64 | MI_UINT64 => 8,
        t => bail!("variable `{name}` stores its data as unsupported type {t}"),
    };
    let numel: usize = dims.iter().product();
    ensure!(
        data.len() == numel * width,
        "variable `{name}` has dims {dims:?} ({numel} elements of {width} bytes) but {} data bytes",
        data.len()
    );
    out.insert(name, MatArray { dims, data_type, data: body[data].to_vec() });
    Ok(())
}
