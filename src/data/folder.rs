//! Reader for ImageFolder trees (`folder:<root>` in specs): `<root>/train/<class>/*.{jpg,jpeg,png}` and
//! `<root>/test/<class>/*`, the layout torchvision's `ImageFolder` reads.
//!
//! Classes are the train split's subdirectories sorted by name (label = index); the test split must have the same
//! class set. Images are decoded in parallel (rayon), converted to RGB, and must all share one size. Files within a
//! class are taken in name order, so the image order is deterministic. Hidden entries (names starting with `.`)
//! are skipped; any other file that is not a JPEG or PNG is an error rather than silently dropped.
//!
//! Decoding is done once: the result is cached in `<root>/.sdp-cache-v1.bin` (see [`super::cache`]), keyed by
//! every image's path, size and mtime.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use super::cache::{self, Cached, Fingerprint};
use super::source::{DataSource, Request, Shape};
use super::{channel_stats, Dataset, ImageData, ImageSet};

/// The registered `folder:<path>` source (a relative path is looked up under the data directory).
pub struct Folder;

impl DataSource for Folder {
    /// Counts the files and classes and reads the first train image's size (no image is decoded).
    fn shape(&self, req: &Request) -> Result<Shape> {
        let l = list_tree(&req.path())?;
        let (first, _) = l.train.first().context("the train split has no images")?;
        let (w, h) =
            image::image_dimensions(first).with_context(|| format!("reading the size of {}", first.display()))?;
        Ok(Shape { train: l.train.len(), test: l.test.len(), classes: l.classes.len(), hw: (h as usize, w as usize) })
    }

    fn load(&self, req: &Request) -> Result<Dataset> {
        Ok(load_folder(&req.path())?.into())
    }

    fn cache(&self, req: &Request) -> Option<PathBuf> {
        Some(cache::cache_path(&req.path()))
    }
}

/// Loads the ImageFolder tree at `root`, from its cache when the cache matches the files.
pub fn load_folder(root: &Path) -> Result<ImageData> {
    let listing = list_tree(root)?;
    let fp = Fingerprint::of_files("folder", root, &listing.all_files())?;
    let cached = cache::load_or_build(&cache::cache_path(root), &fp, || decode_tree(&listing))?;
    let (mean, std) = channel_stats(&cached.train);
    Ok(ImageData {
        name: format!("folder:{}", root.display()),
        train: cached.train,
        test: cached.test,
        classes: cached.classes,
        mean,
        std,
    })
}

/// The image files of a tree, per split, in label order.
#[derive(Debug)]
pub struct Listing {
    pub classes: Vec<String>,
    pub train: Vec<(PathBuf, u32)>,
    pub test: Vec<(PathBuf, u32)>,
}

impl Listing {
    fn all_files(&self) -> Vec<PathBuf> {
        self.train.iter().chain(&self.test).map(|(p, _)| p.clone()).collect()
    }
}

/// Lists `<root>/{train,test}/<class>/*`, checking the class sets match and no class folder is empty.
pub fn list_tree(root: &Path) -> Result<Listing> {
    ensure!(root.is_dir(), "ImageFolder root {} is not a directory", root.display());
    let (train_classes, train_dirs) = list_classes(&root.join("train"))?;
    let (test_classes, test_dirs) = list_classes(&root.join("test"))?;
    if train_classes != test_classes {
        let only =
            |a: &[String], b: &[String]| a.iter().filter(|c| !b.contains(c)).cloned().collect::<Vec<_>>().join(", ");
        bail!(
            "{}: class folders of train and test differ (only in train: [{}]; only in test: [{}])",
            root.display(),
            only(&train_classes, &test_classes),
            only(&test_classes, &train_classes)
        );
    }
    Ok(Listing { classes: train_classes, train: list_images(&train_dirs)?, test: list_images(&test_dirs)? })
}

/// Sorted class names and their directories under one split directory.
fn list_classes(split: &Path) -> Result<(Vec<String>, Vec<PathBuf>)> {
    if !split.is_dir() {
        bail!(
            "missing split: {} is not a directory (expected <root>/train/<class>/ and <root>/test/<class>/)",
            split.display()
        );
    }
    let mut classes = Vec::new();
    for entry in std::fs::read_dir(split).with_context(|| format!("reading {}", split.display()))? {
        let entry = entry.with_context(|| format!("reading {}", split.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        classes.push((name, path));
    }
    classes.sort();
    ensure!(!classes.is_empty(), "{} has no class folders", split.display());
    Ok(classes.into_iter().unzip())
}

fn list_images(class_dirs: &[PathBuf]) -> Result<Vec<(PathBuf, u32)>> {
    let mut out = Vec::new();
    for (label, dir) in class_dirs.iter().enumerate() {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            if !matches!(ext.as_str(), "jpg" | "jpeg" | "png") {
                bail!("{} is not a .jpg, .jpeg or .png image", path.display());
            }
            files.push(path);
        }
        ensure!(!files.is_empty(), "empty class folder: {} has no images", dir.display());
        files.sort();
        out.extend(files.into_iter().map(|p| (p, label as u32)));
    }
    Ok(out)
}

/// Decodes every image of the listing (both splits) in parallel.
pub fn decode_tree(listing: &Listing) -> Result<Cached> {
    let (first, _) = listing.train.first().context("train split has no images")?;
    let (w, h) = decode(first)?.dimensions();
    Ok(Cached {
        train: decode_split(&listing.train, h as usize, w as usize, first)?,
        test: decode_split(&listing.test, h as usize, w as usize, first)?,
        classes: listing.classes.clone(),
    })
}

fn decode_split(files: &[(PathBuf, u32)], h: usize, w: usize, first: &Path) -> Result<ImageSet> {
    let n = h * w * 3;
    let mut images = vec![0u8; files.len() * n];
    images.par_chunks_mut(n).zip(files.par_iter()).try_for_each(|(dst, (path, _))| -> Result<()> {
        let img = decode(path)?;
        if img.dimensions() != (w as u32, h as u32) {
            bail!(
                "{} is {}x{} (WxH) but {} is {w}x{h}: all images must share one size",
                path.display(),
                img.width(),
                img.height(),
                first.display()
            );
        }
        dst.copy_from_slice(img.as_raw());
        Ok(())
    })?;
    ImageSet::new(images, files.iter().map(|(_, l)| *l).collect(), h, w, 3)
}

/// Decodes one image file (format from its content, not its name) to 8-bit RGB.
fn decode(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let img =
        image::load_from_memory(&bytes).with_context(|| format!("decoding {} (corrupt image?)", path.display()))?;
    Ok(img.to_rgb8())
}
