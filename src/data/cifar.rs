//! Readers for the official CIFAR-10 and CIFAR-100 binary distributions (docs/design.md §6).
//!
//! CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_{1..5}.bin` and `test_batch.bin`, records of 1 label byte and
//! 3072 pixel bytes (three 32×32 planes, CHW). CIFAR-100 (`cifar-100-binary/`): `train.bin` and `test.bin`, records
//! of a coarse label byte, a fine label byte and 3072 CHW pixel bytes. Pixels are converted to HWC, the layout
//! every [`ImageSet`] uses. Any whole number of records is accepted (tests write files of a few records).
//!
//! The binary files are read directly, with no cache: they are already an uncompressed u8 layout and reading
//! them is as fast as reading a cache would be.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::remote::RemoteFile;
use super::source::{Official, Shape};
use super::{ImageData, ImageSet};

const SIDE: usize = 32;
const PIXELS: usize = SIDE * SIDE * 3;

/// Directory the CIFAR-10 archive extracts to, under the data directory.
pub const CIFAR10_DIR: &str = "cifar-10-batches-bin";
/// Directory the CIFAR-100 archive extracts to, under the data directory.
pub const CIFAR100_DIR: &str = "cifar-100-binary";

/// CIFAR-10 class names in label order (as in `batches.meta.txt`).
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// CIFAR-100 fine class names in label order (as in `fine_label_names.txt`).
#[rustfmt::skip]
pub const CIFAR100_CLASSES: [&str; 100] = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
];

/// CIFAR-100 coarse (superclass) names in label order (as in `coarse_label_names.txt`).
#[rustfmt::skip]
pub const CIFAR100_COARSE_CLASSES: [&str; 20] = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
];

/// Where the official archives are downloaded from.
const TORONTO: &str = "https://www.cs.toronto.edu/~kriz";

/// The registered `cifar10` source: the official binary batches.
pub const CIFAR10: Official = Official {
    shape: Shape { train: 50_000, test: 10_000, classes: 10, hw: (32, 32) },
    files: || vec![archive("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", cifar10_files(Path::new("")))],
    load: load_cifar10,
    cache: None,
};

/// The registered `cifar100` source: the official binary files, fine labels.
pub const CIFAR100: Official = Official {
    shape: Shape { train: 50_000, test: 10_000, classes: 100, hw: (32, 32) },
    files: || {
        vec![archive("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", cifar100_files(Path::new("")))]
    },
    load: load_cifar100,
    cache: None,
};

fn archive(name: &str, md5: &str, extracts: Vec<PathBuf>) -> RemoteFile {
    RemoteFile { url: format!("{TORONTO}/{name}"), md5: md5.into(), dir: PathBuf::new(), extracts }
}

/// Loads CIFAR-10 from `<data_dir>/cifar-10-batches-bin/`. Class names come from `batches.meta.txt` when present.
pub fn load_cifar10(data_dir: &Path) -> Result<ImageData> {
    let dir = data_dir.join(CIFAR10_DIR);
    let classes = class_names(&dir.join("batches.meta.txt"), &CIFAR10_CLASSES)?;
    let mut train = Vec::new();
    for i in 1..=5 {
        train.push(read_batch(&dir.join(format!("data_batch_{i}.bin")), Layout::CIFAR10, "cifar10")?);
    }
    let train = concat(train.into_iter().map(|b| b.images))?;
    let test = read_batch(&dir.join("test_batch.bin"), Layout::CIFAR10, "cifar10")?.images;
    Ok(ImageData {
        name: "cifar10".into(),
        train,
        test,
        classes,
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
    })
}

/// Loads CIFAR-100 from `<data_dir>/cifar-100-binary/`, labelled with the 100 fine classes (names from
/// `fine_label_names.txt` when present). The 20 coarse labels are available from [`load_cifar100_coarse_labels`].
pub fn load_cifar100(data_dir: &Path) -> Result<ImageData> {
    Ok(load_cifar100_with_coarse(data_dir)?.0)
}

/// The coarse (superclass) labels of CIFAR-100, aligned index by index with [`load_cifar100`]'s images.
#[derive(Clone, Debug, PartialEq)]
pub struct CoarseLabels {
    /// The 20 superclass names (from `coarse_label_names.txt` when present).
    pub classes: Vec<String>,
    pub train: Vec<u32>,
    pub test: Vec<u32>,
}

/// The coarse labels of CIFAR-100 (reads the same files as [`load_cifar100`]).
pub fn load_cifar100_coarse_labels(data_dir: &Path) -> Result<CoarseLabels> {
    Ok(load_cifar100_with_coarse(data_dir)?.1)
}

/// CIFAR-100 with fine labels, plus its coarse labels, from one read of the files.
pub fn load_cifar100_with_coarse(data_dir: &Path) -> Result<(ImageData, CoarseLabels)> {
    let dir = data_dir.join(CIFAR100_DIR);
    let classes = class_names(&dir.join("fine_label_names.txt"), &CIFAR100_CLASSES)?;
    let coarse_classes = class_names(&dir.join("coarse_label_names.txt"), &CIFAR100_COARSE_CLASSES)?;
    let train = read_batch(&dir.join("train.bin"), Layout::CIFAR100, "cifar100")?;
    let test = read_batch(&dir.join("test.bin"), Layout::CIFAR100, "cifar100")?;
    let coarse = CoarseLabels { classes: coarse_classes, train: train.coarse, test: test.coarse };
    let ds = ImageData {
        name: "cifar100".into(),
        train: train.images,
        test: test.images,
        classes,
        mean: [0.5071, 0.4865, 0.4409],
        std: [0.2673, 0.2564, 0.2762],
    };
    Ok((ds, coarse))
}

/// Where the labels sit in a record and how many classes each may name.
#[derive(Clone, Copy)]
struct Layout {
    label_bytes: usize,
    /// Index of the training label within the label bytes.
    fine: usize,
    fine_classes: u32,
    /// Index and class count of CIFAR-100's coarse label.
    coarse: Option<(usize, u32)>,
}

impl Layout {
    const CIFAR10: Layout = Layout { label_bytes: 1, fine: 0, fine_classes: 10, coarse: None };
    const CIFAR100: Layout = Layout { label_bytes: 2, fine: 1, fine_classes: 100, coarse: Some((0, 20)) };
}

struct Batch {
    images: ImageSet,
    coarse: Vec<u32>,
}

/// The URL of the official archive of `fetch_name` (`cifar10` or `cifar100`), for error messages.
fn official_url(fetch_name: &str) -> String {
    let source = if fetch_name == "cifar100" { &CIFAR100 } else { &CIFAR10 };
    (source.files)().first().map(|f| f.url.clone()).unwrap_or_default()
}

/// Reads one binary batch file; `fetch_name` is the `sdp data fetch` argument that provides it.
fn read_batch(path: &Path, layout: Layout, fetch_name: &str) -> Result<Batch> {
    if !path.exists() {
        bail!(
            "{} not found: run `sdp data fetch {fetch_name}` (or download {} by hand and extract it into {})",
            path.display(),
            official_url(fetch_name),
            path.parent().and_then(Path::parent).unwrap_or(Path::new(".")).display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let rec = layout.label_bytes + PIXELS;
    if bytes.is_empty() {
        bail!("{} is empty (expected {rec}-byte records)", path.display());
    }
    if bytes.len() % rec != 0 {
        let n = bytes.len() / rec;
        bail!(
            "{} is truncated: {} bytes is not a whole number of {rec}-byte records ({n} whole records, then a \
             partial record starting at byte offset {})",
            path.display(),
            bytes.len(),
            n * rec
        );
    }
    let n = bytes.len() / rec;
    let mut labels = Vec::with_capacity(n);
    let mut coarse = Vec::new();
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let fine = r[layout.fine] as u32;
        if fine >= layout.fine_classes {
            bail!(
                "{}: record {i} (byte offset {}) has label {fine}, but there are only {} classes",
                path.display(),
                i * rec + layout.fine,
                layout.fine_classes
            );
        }
        labels.push(fine);
        if let Some((at, classes)) = layout.coarse {
            let c = r[at] as u32;
            if c >= classes {
                bail!(
                    "{}: record {i} (byte offset {}) has coarse label {c}, but there are only {classes} coarse classes",
                    path.display(),
                    i * rec + at
                );
            }
            coarse.push(c);
        }
    }
    let mut images = vec![0u8; n * PIXELS];
    images.par_chunks_mut(PIXELS).zip(bytes.par_chunks_exact(rec)).for_each(|(dst, r)| {
        chw_to_hwc(&r[layout.label_bytes..], dst);
    });
    Ok(Batch { images: ImageSet::new(images, labels, SIDE, SIDE, 3)?, coarse })
}

/// One 32×32×3 image from planar CHW (as stored in the CIFAR files) to interleaved HWC.
fn chw_to_hwc(src: &[u8], dst: &mut [u8]) {
    const PLANE: usize = SIDE * SIDE;
    for (p, px) in dst.chunks_exact_mut(3).enumerate() {
        px[0] = src[p];
        px[1] = src[PLANE + p];
        px[2] = src[2 * PLANE + p];
    }
}

fn concat(sets: impl Iterator<Item = ImageSet>) -> Result<ImageSet> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for s in sets {
        images.extend_from_slice(&s.images);
        labels.extend_from_slice(&s.labels);
    }
    ImageSet::new(images, labels, SIDE, SIDE, 3)
}

/// Class names from a one-name-per-line file when it exists, else `default`. A file listing a different number
/// of names than `default` is an error (the labels would be misnamed).
fn class_names(path: &Path, default: &[&str]) -> Result<Vec<String>> {
    if !path.exists() {
        return Ok(default.iter().map(|s| s.to_string()).collect());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if names.len() != default.len() {
        bail!("{} lists {} class names, expected {}", path.display(), names.len(), default.len());
    }
    Ok(names)
}

/// The files [`load_cifar10`] reads, under `data_dir`.
pub fn cifar10_files(data_dir: &Path) -> Vec<PathBuf> {
    let dir = data_dir.join(CIFAR10_DIR);
    let mut v: Vec<PathBuf> = (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).collect();
    v.push(dir.join("test_batch.bin"));
    v
}

/// The files [`load_cifar100`] reads, under `data_dir`.
pub fn cifar100_files(data_dir: &Path) -> Vec<PathBuf> {
    let dir = data_dir.join(CIFAR100_DIR);
    vec![dir.join("train.bin"), dir.join("test.bin")]
}
