//! Readers of the official dataset formats and the ImageFolder tree, on small synthetic files written here in
//! exactly those formats: pixels and labels must round-trip exactly (HWC), every bad input must fail with a
//! message naming the file, and the decode cache must be reused, invalidated and rebuilt as documented.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use common::{check_contains, err_text};
use sdp::data::cache::{self, Fingerprint};
use sdp::data::{cifar, folder, svhn, ImageSet};

// ---------------------------------------------------------------- synthetic images

/// HWC images and their labels, in file order.
type Split = (Vec<Vec<u8>>, Vec<u32>);
/// HWC images, fine labels, coarse labels.
type Cifar100Split = (Vec<Vec<u8>>, Vec<u32>, Vec<u32>);
/// An ImageFolder file, its HWC pixels and its label.
type FolderImage = (PathBuf, Vec<u8>, u32);

/// A deterministic HWC image whose every byte depends on (seed, position), so any transposition shows.
fn image(seed: u32, h: usize, w: usize) -> Vec<u8> {
    (0..h * w * 3)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9E37_79B9).rotate_left(7);
            (x.wrapping_mul(0x85EB_CA6B) >> 24) as u8
        })
        .collect()
}

/// HWC → CHW, written independently of the reader's conversion.
fn to_chw(hwc: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; hwc.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                out[c * h * w + y * w + x] = hwc[(y * w + x) * 3 + c];
            }
        }
    }
    out
}

// ---------------------------------------------------------------- CIFAR

/// Writes CIFAR records (label bytes, then CHW pixels) and returns the HWC images.
fn write_cifar(path: &Path, labels: &[Vec<u8>], seed: u32) -> Result<Vec<Vec<u8>>> {
    let mut bytes = Vec::new();
    let mut images = Vec::new();
    for (i, l) in labels.iter().enumerate() {
        let img = image(seed * 1000 + i as u32, 32, 32);
        bytes.extend_from_slice(l);
        bytes.extend_from_slice(&to_chw(&img, 32, 32));
        images.push(img);
    }
    std::fs::create_dir_all(path.parent().context("no parent")?)?;
    std::fs::write(path, bytes)?;
    Ok(images)
}

fn check_set(set: &ImageSet, images: &[Vec<u8>], labels: &[u32]) -> Result<()> {
    ensure!(set.len() == images.len(), "{} images, expected {}", set.len(), images.len());
    ensure!(set.labels == labels, "labels {:?}, expected {labels:?}", set.labels);
    ensure!((set.h, set.w, set.c) == (32, 32, 3));
    for (i, img) in images.iter().enumerate() {
        ensure!(set.image(i) == &img[..], "image {i} differs");
    }
    Ok(())
}

/// A CIFAR-10 tree with batches of 7, 3, 2, 1, 4 records and a test batch of 5; returns (train, test) images+labels.
fn write_cifar10(dir: &Path) -> Result<(Split, Split)> {
    let b = dir.join("cifar-10-batches-bin");
    let (mut imgs, mut labs) = (Vec::new(), Vec::new());
    for (k, n) in [7usize, 3, 2, 1, 4].into_iter().enumerate() {
        let labels: Vec<u8> = (0..n).map(|i| ((i * 3 + k) % 10) as u8).collect();
        imgs.extend(write_cifar(
            &b.join(format!("data_batch_{}.bin", k + 1)),
            &labels.iter().map(|&l| vec![l]).collect::<Vec<_>>(),
            k as u32 + 1,
        )?);
        labs.extend(labels.iter().map(|&l| l as u32));
    }
    let tl: Vec<u8> = vec![9, 0, 5, 5, 1];
    let timgs = write_cifar(&b.join("test_batch.bin"), &tl.iter().map(|&l| vec![l]).collect::<Vec<_>>(), 99)?;
    Ok(((imgs, labs), (timgs, tl.iter().map(|&l| l as u32).collect())))
}

#[test]
fn cifar10_round_trips_pixels_and_labels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ((imgs, labs), (timgs, tlabs)) = write_cifar10(dir.path())?;
    let ds = cifar::load_cifar10(dir.path())?;
    check_set(&ds.train, &imgs, &labs)?;
    check_set(&ds.test, &timgs, &tlabs)?;
    ensure!(ds.name == "cifar10");
    ensure!(ds.classes[0] == "airplane" && ds.classes[9] == "truck");
    ensure!(ds.mean == [0.4914, 0.4822, 0.4465] && ds.std == [0.2470, 0.2435, 0.2616]);
    // One pixel by hand: image 0 of batch 1, row 1, column 2, green = CHW byte 1*1024 + 1*32 + 2 of its record.
    let raw = std::fs::read(dir.path().join("cifar-10-batches-bin/data_batch_1.bin"))?;
    ensure!(ds.train.image(0)[(32 + 2) * 3 + 1] == raw[1 + 1024 + 32 + 2]);
    Ok(())
}

#[test]
fn cifar10_class_names_come_from_batches_meta() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_cifar10(dir.path())?;
    let names: Vec<String> = (0..10).map(|i| format!("class{i}")).collect();
    std::fs::write(dir.path().join("cifar-10-batches-bin/batches.meta.txt"), names.join("\n") + "\n\n")?;
    ensure!(cifar::load_cifar10(dir.path())?.classes == names);
    std::fs::write(dir.path().join("cifar-10-batches-bin/batches.meta.txt"), "a\nb\nc\n")?;
    let msg = err_text(cifar::load_cifar10(dir.path()));
    check_contains(&msg, &["batches.meta.txt", "lists 3 class names, expected 10"])
}

#[test]
fn cifar10_missing_file_names_file_and_fetch_command() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_cifar10(dir.path())?;
    std::fs::remove_file(dir.path().join("cifar-10-batches-bin/data_batch_3.bin"))?;
    let msg = err_text(cifar::load_cifar10(dir.path()));
    check_contains(&msg, &["data_batch_3.bin not found", "sdp data fetch cifar10", "cifar-10-binary.tar.gz"])
}

#[test]
fn cifar10_truncated_file_names_file_and_offset() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_cifar10(dir.path())?;
    let p = dir.path().join("cifar-10-batches-bin/data_batch_1.bin");
    let mut bytes = std::fs::read(&p)?;
    bytes.truncate(6 * 3073 + 100);
    std::fs::write(&p, bytes)?;
    let msg = err_text(cifar::load_cifar10(dir.path()));
    check_contains(&msg, &["data_batch_1.bin is truncated", "6 whole records", &format!("byte offset {}", 6 * 3073)])?;
    std::fs::write(&p, b"")?;
    let msg = err_text(cifar::load_cifar10(dir.path()));
    check_contains(&msg, &["data_batch_1.bin is empty"])
}

#[test]
fn cifar10_label_out_of_range_names_record() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_cifar10(dir.path())?;
    let p = dir.path().join("cifar-10-batches-bin/test_batch.bin");
    let mut bytes = std::fs::read(&p)?;
    bytes[3 * 3073] = 10;
    std::fs::write(&p, bytes)?;
    let msg = err_text(cifar::load_cifar10(dir.path()));
    check_contains(&msg, &["test_batch.bin", "record 3", "label 10", "only 10 classes"])
}

fn write_cifar100(dir: &Path) -> Result<[Cifar100Split; 2]> {
    let b = dir.join("cifar-100-binary");
    let mut out = Vec::new();
    for (file, n, seed) in [("train.bin", 9usize, 1u32), ("test.bin", 4, 2)] {
        let coarse: Vec<u8> = (0..n).map(|i| ((i * 7 + 19) % 20) as u8).collect();
        let fine: Vec<u8> = (0..n).map(|i| ((i * 37 + 99) % 100) as u8).collect();
        let labels: Vec<Vec<u8>> = coarse.iter().zip(&fine).map(|(&c, &f)| vec![c, f]).collect();
        let imgs = write_cifar(&b.join(file), &labels, seed)?;
        out.push((imgs, fine.iter().map(|&l| l as u32).collect(), coarse.iter().map(|&l| l as u32).collect()));
    }
    let mut it = out.into_iter();
    Ok([it.next().context("train")?, it.next().context("test")?])
}

#[test]
fn cifar100_round_trips_fine_and_coarse_labels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let [(imgs, fine, coarse), (timgs, tfine, tcoarse)] = write_cifar100(dir.path())?;
    let ds = cifar::load_cifar100(dir.path())?;
    check_set(&ds.train, &imgs, &fine)?;
    check_set(&ds.test, &timgs, &tfine)?;
    ensure!(ds.num_classes() == 100 && ds.classes[99] == "worm" && ds.name == "cifar100");
    ensure!(ds.mean == [0.5071, 0.4865, 0.4409] && ds.std == [0.2673, 0.2564, 0.2762]);
    let c = cifar::load_cifar100_coarse_labels(dir.path())?;
    ensure!(c.train == coarse && c.test == tcoarse && c.classes.len() == 20 && c.classes[19] == "vehicles_2");
    Ok(())
}

#[test]
fn cifar100_bad_labels_name_file_and_record() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_cifar100(dir.path())?;
    let p = dir.path().join("cifar-100-binary/train.bin");
    let good = std::fs::read(&p)?;
    let mut bytes = good.clone();
    bytes[5 * 3074 + 1] = 100;
    std::fs::write(&p, &bytes)?;
    let msg = err_text(cifar::load_cifar100(dir.path()));
    check_contains(&msg, &["train.bin", "record 5", "label 100", "only 100 classes"])?;
    let mut bytes = good.clone();
    bytes[2 * 3074] = 20;
    std::fs::write(&p, &bytes)?;
    let msg = err_text(cifar::load_cifar100(dir.path()));
    check_contains(&msg, &["train.bin", "record 2", "coarse label 20"])?;
    std::fs::write(&p, &good[..3074 * 2 + 1])?;
    let msg = err_text(cifar::load_cifar100(dir.path()));
    check_contains(&msg, &["train.bin is truncated", "3074-byte records", &format!("byte offset {}", 2 * 3074)])?;
    std::fs::remove_file(&p)?;
    let msg = err_text(cifar::load_cifar100(dir.path()));
    check_contains(&msg, &["train.bin not found", "sdp data fetch cifar100"])
}

// ---------------------------------------------------------------- SVHN (MATLAB v5)

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_DOUBLE: u32 = 9;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MX_DOUBLE: u32 = 6;
const MX_UINT8: u32 = 9;

fn pad8(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(8) {
        v.push(0);
    }
}

/// A data element; data of at most 4 bytes uses the small-element format when `small` allows it.
fn element(ty: u32, data: &[u8], small: bool) -> Vec<u8> {
    let mut v = Vec::new();
    if small && data.len() <= 4 {
        v.extend_from_slice(&(((data.len() as u32) << 16) | ty).to_le_bytes());
        v.extend_from_slice(data);
    } else {
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(data);
    }
    pad8(&mut v);
    v
}

/// A whole miMATRIX element: numeric array `name` of class `class`, data stored as `data_type`.
fn matrix(name: &str, class: u32, dims: &[usize], data_type: u32, data: &[u8]) -> Vec<u8> {
    let mut body = element(MI_UINT32, &[class.to_le_bytes(), 0u32.to_le_bytes()].concat(), false);
    let d: Vec<u8> = dims.iter().flat_map(|&d| (d as i32).to_le_bytes()).collect();
    body.extend(element(MI_INT32, &d, false));
    body.extend(element(MI_INT8, name.as_bytes(), true));
    body.extend(element(data_type, data, true));
    element(MI_MATRIX, &body, false)
}

fn compressed(elem: &[u8]) -> Result<Vec<u8>> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(elem)?;
    let z = z.finish()?;
    let mut v = Vec::new();
    v.extend_from_slice(&MI_COMPRESSED.to_le_bytes());
    v.extend_from_slice(&(z.len() as u32).to_le_bytes());
    v.extend_from_slice(&z); // compressed elements are not padded
    Ok(v)
}

fn mat_header() -> Vec<u8> {
    let mut h = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024".to_vec();
    h.resize(116, b' ');
    h.extend_from_slice(&[0u8; 8]);
    h.extend_from_slice(&0x0100u16.to_le_bytes());
    h.extend_from_slice(b"IM");
    h
}

#[derive(Clone, Copy)]
enum YStorage {
    Double,
    /// class double stored as uint8, as MATLAB itself saves small whole numbers.
    DoubleAsUint8,
    Uint8,
}

/// An SVHN-style MAT-file of `n` h×w images; returns the file bytes, the HWC images, and the expected labels.
fn svhn_mat(
    n: usize,
    h: usize,
    w: usize,
    labels: &[u32],
    compress: bool,
    y: YStorage,
) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let imgs: Vec<Vec<u8>> = (0..n).map(|i| image(500 + i as u32, h, w)).collect();
    // X(h, w, c, n) column-major: index = h + H*(w + W*(c + 3*n)).
    let mut x = vec![0u8; n * h * w * 3];
    for (k, img) in imgs.iter().enumerate() {
        for row in 0..h {
            for col in 0..w {
                for c in 0..3 {
                    x[row + h * (col + w * (c + 3 * k))] = img[(row * w + col) * 3 + c];
                }
            }
        }
    }
    let mut vars = vec![matrix("X", MX_UINT8, &[h, w, 3, n], MI_UINT8, &x)];
    let yb: Vec<u8> = match y {
        YStorage::Double => labels.iter().flat_map(|&l| (l as f64).to_le_bytes()).collect(),
        _ => labels.iter().map(|&l| l as u8).collect(),
    };
    vars.push(match y {
        YStorage::Double => matrix("y", MX_DOUBLE, &[n, 1], MI_DOUBLE, &yb),
        YStorage::DoubleAsUint8 => matrix("y", MX_DOUBLE, &[n, 1], MI_UINT8, &yb),
        YStorage::Uint8 => matrix("y", MX_UINT8, &[n, 1], MI_UINT8, &yb),
    });
    // A variable the reader must skip, with a name too long for the small-element format.
    vars.insert(
        0,
        matrix("unrelated_variable", MX_DOUBLE, &[1, 2], MI_DOUBLE, &[1f64.to_le_bytes(), 2f64.to_le_bytes()].concat()),
    );
    let mut bytes = mat_header();
    for v in vars {
        bytes.extend(if compress { compressed(&v)? } else { v });
    }
    Ok((bytes, imgs))
}

fn digits(labels: &[u32]) -> Vec<u32> {
    labels.iter().map(|&l| l % 10).collect()
}

fn write_svhn(dir: &Path, compress: bool, y: YStorage) -> Result<[Split; 2]> {
    let d = dir.join("svhn");
    std::fs::create_dir_all(&d)?;
    let tl = [10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let (train, ti) = svhn_mat(tl.len(), 32, 32, &tl, compress, y)?;
    std::fs::write(d.join("train_32x32.mat"), train)?;
    let sl = [3, 10, 1];
    let (test, si) = svhn_mat(sl.len(), 32, 32, &sl, compress, y)?;
    std::fs::write(d.join("test_32x32.mat"), test)?;
    Ok([(ti, digits(&tl)), (si, digits(&sl))])
}

#[test]
fn svhn_round_trips_plain_and_compressed_files() -> Result<()> {
    for (compress, y) in [
        (false, YStorage::Double),
        (true, YStorage::DoubleAsUint8),
        (true, YStorage::Uint8),
        (false, YStorage::DoubleAsUint8),
    ] {
        let dir = tempfile::tempdir()?;
        let [(ti, tl), (si, sl)] = write_svhn(dir.path(), compress, y)?;
        let ds = svhn::load_svhn(dir.path())?;
        check_set(&ds.train, &ti, &tl)?;
        check_set(&ds.test, &si, &sl)?;
        ensure!(ds.train.labels[0] == 0, "label 10 must mean digit 0");
        ensure!(ds.classes == ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"] && ds.name == "svhn");
        ensure!(ds.mean == [0.4377, 0.4438, 0.4728] && ds.std == [0.1980, 0.2010, 0.1970]);
        // The second load comes from the cache and is identical.
        let cache_file = dir.path().join("svhn/.sdp-cache-v1.bin");
        ensure!(cache_file.is_file(), "no cache written");
        let again = svhn::load_svhn(dir.path())?;
        ensure!(again.train == ds.train && again.test == ds.test);
    }
    Ok(())
}

#[test]
fn svhn_non_square_images_keep_rows_and_columns() -> Result<()> {
    // H != W catches a swapped row/column order that a square image could hide.
    let dir = tempfile::tempdir()?;
    let labels = [1, 2, 10];
    let (bytes, imgs) = svhn_mat(3, 5, 7, &labels, true, YStorage::Double)?;
    let p = dir.path().join("x.mat");
    std::fs::write(&p, bytes)?;
    let set = svhn::read_svhn_mat(&p)?;
    ensure!((set.h, set.w, set.c) == (5, 7, 3) && set.labels == [1, 2, 0]);
    for (i, img) in imgs.iter().enumerate() {
        ensure!(set.image(i) == &img[..], "image {i} differs");
    }
    Ok(())
}

#[test]
fn svhn_single_image_without_trailing_dim() -> Result<()> {
    // MATLAB drops trailing singleton dims: X of one image is 32x32x3.
    let dir = tempfile::tempdir()?;
    let img = image(1, 32, 32);
    let mut x = vec![0u8; 3072];
    for row in 0..32 {
        for col in 0..32 {
            for c in 0..3 {
                x[row + 32 * (col + 32 * c)] = img[(row * 32 + col) * 3 + c];
            }
        }
    }
    let mut bytes = mat_header();
    bytes.extend(matrix("X", MX_UINT8, &[32, 32, 3], MI_UINT8, &x));
    bytes.extend(matrix("y", MX_DOUBLE, &[1, 1], MI_DOUBLE, &7f64.to_le_bytes()));
    let p = dir.path().join("one.mat");
    std::fs::write(&p, bytes)?;
    let set = svhn::read_svhn_mat(&p)?;
    ensure!(set.len() == 1 && set.labels == [7] && set.image(0) == &img[..]);
    Ok(())
}

#[test]
fn svhn_bad_inputs_name_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("bad.mat");
    let (good, _) = svhn_mat(3, 32, 32, &[1, 2, 3], false, YStorage::Double)?;
    let (good_z, _) = svhn_mat(3, 32, 32, &[1, 2, 3], true, YStorage::Double)?;

    let mut bytes = good.clone();
    bytes[..6].copy_from_slice(b"HELLO!");
    std::fs::write(&p, &bytes)?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "not a MATLAB v5 MAT-file"])?;

    let mut bytes = good.clone();
    bytes[126..128].copy_from_slice(b"MI");
    std::fs::write(&p, &bytes)?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "big-endian"])?;

    std::fs::write(&p, &good[..good.len() - 100])?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "byte offset", "truncated file?"])?;

    std::fs::write(&p, &good[..50])?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "shorter than the 128-byte"])?;

    std::fs::write(&p, &good_z[..good_z.len() - 100])?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "truncated file?"])?;

    // Corrupt the zlib stream of a compressed `X` (just past its 8-byte tag and 2-byte zlib header).
    let mut bytes = mat_header();
    bytes.extend(compressed(&matrix("X", MX_UINT8, &[32, 32, 3, 3], MI_UINT8, &image(3, 96, 96)))?);
    for b in &mut bytes[128 + 10..128 + 40] {
        *b ^= 0x5a;
    }
    std::fs::write(&p, &bytes)?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "compressed element at byte offset 128"])?;

    let (bytes, _) = svhn_mat(3, 32, 32, &[1, 11, 3], true, YStorage::Double)?;
    std::fs::write(&p, &bytes)?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "variable `y`", "record 1 has label 11"])?;

    let (bytes, _) = svhn_mat(3, 32, 32, &[1, 0, 3], false, YStorage::Uint8)?;
    std::fs::write(&p, &bytes)?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "record 1 has label 0"])?;

    let mut bytes = mat_header();
    bytes.extend(matrix("X", MX_UINT8, &[32, 32, 3, 1], MI_UINT8, &[0u8; 3072]));
    std::fs::write(&p, &bytes)?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "no variable `y`"])?;

    let mut bytes = mat_header();
    bytes.extend(matrix("X", MX_UINT8, &[32, 32, 3, 2], MI_UINT8, &[0u8; 6144]));
    bytes.extend(matrix("y", MX_DOUBLE, &[3, 1], MI_DOUBLE, &[0u8; 24]));
    std::fs::write(&p, &bytes)?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "`y` has dims [3, 1]", "2 images"])?;

    let mut bytes = mat_header();
    bytes.extend(matrix("X", MX_UINT8, &[32, 32, 3, 2], MI_UINT8, &[0u8; 100]));
    std::fs::write(&p, &bytes)?;
    check_contains(&err_text(svhn::read_svhn_mat(&p)), &["bad.mat", "variable `X` has dims", "100 data bytes"])?;

    let missing = dir.path().join("nothing");
    check_contains(&err_text(svhn::load_svhn(&missing)), &["train_32x32.mat not found", "sdp data fetch svhn"])
}

#[test]
fn svhn_cache_is_invalidated_when_a_source_changes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_svhn(dir.path(), true, YStorage::Double)?;
    let first = svhn::load_svhn(dir.path())?;
    // Replace the test file with a different one (different size, hence a different fingerprint).
    let sl = [5, 6];
    let (bytes, imgs) = svhn_mat(2, 32, 32, &sl, false, YStorage::Double)?;
    std::fs::write(dir.path().join("svhn/test_32x32.mat"), bytes)?;
    let second = svhn::load_svhn(dir.path())?;
    ensure!(second.train == first.train);
    check_set(&second.test, &imgs, &sl)
}

// ---------------------------------------------------------------- ImageFolder

fn save_png(path: &Path, img: &[u8], h: usize, w: usize) -> Result<()> {
    std::fs::create_dir_all(path.parent().context("no parent")?)?;
    let im = image::RgbImage::from_raw(w as u32, h as u32, img.to_vec()).context("bad buffer")?;
    im.save(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A tree with classes written out of order (`b_cls`, `a_cls`, `c`), PNGs only: exact round trip.
/// Returns, per split, the files in expected order with their images and labels.
fn png_tree(root: &Path) -> Result<[Vec<FolderImage>; 2]> {
    let mut splits = [Vec::new(), Vec::new()];
    for (s, split) in ["train", "test"].iter().enumerate() {
        for (label, class) in [(1u32, "b_cls"), (0, "a_cls"), (2, "c")] {
            let n = if *split == "train" { 3 } else { 2 };
            for i in 0..n {
                let img = image(label * 100 + i as u32 + s as u32 * 1000, 8, 6);
                let p = root.join(split).join(class).join(format!("img{i}.png"));
                save_png(&p, &img, 8, 6)?;
                splits[s].push((p, img, label));
            }
        }
        splits[s].sort_by_key(|(p, _, l)| (*l, p.clone()));
    }
    Ok(splits)
}

fn check_folder_set(set: &ImageSet, files: &[FolderImage]) -> Result<()> {
    ensure!(set.len() == files.len(), "{} images, expected {}", set.len(), files.len());
    ensure!((set.h, set.w, set.c) == (8, 6, 3), "size {}x{}x{}", set.h, set.w, set.c);
    for (i, (p, img, l)) in files.iter().enumerate() {
        ensure!(set.labels[i] == *l, "label of {} is {}, expected {l}", p.display(), set.labels[i]);
        ensure!(set.image(i) == &img[..], "pixels of {} differ", p.display());
    }
    Ok(())
}

#[test]
fn folder_round_trips_png_with_sorted_classes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let [train, test] = png_tree(dir.path())?;
    let ds = folder::load_folder(dir.path())?;
    ensure!(ds.classes == ["a_cls", "b_cls", "c"]);
    ensure!(ds.name == format!("folder:{}", dir.path().display()));
    check_folder_set(&ds.train, &train)?;
    check_folder_set(&ds.test, &test)?;
    let (mean, std) = sdp::data::channel_stats(&ds.train);
    ensure!(ds.mean == mean && ds.std == std);
    Ok(())
}

#[test]
fn folder_decodes_jpeg_grayscale_and_rgba() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let img = image(7, 8, 6);
    // JPEG is lossy: compare with the image crate's own decode of the file, and loosely with the original.
    let jpg = root.join("train/x/a.jpg");
    std::fs::create_dir_all(jpg.parent().context("no parent")?)?;
    image::RgbImage::from_raw(6, 8, img.clone()).context("buf")?.save(&jpg)?;
    let gray: Vec<u8> = (0..48).map(|i| (i * 5) as u8).collect();
    let gp = root.join("train/x/b.png");
    image::GrayImage::from_raw(6, 8, gray.clone()).context("buf")?.save(&gp)?;
    let rgba: Vec<u8> = img.chunks(3).flat_map(|p| [p[0], p[1], p[2], 17]).collect();
    let ap = root.join("test/x/c.PNG");
    std::fs::create_dir_all(ap.parent().context("no parent")?)?;
    image::RgbaImage::from_raw(6, 8, rgba).context("buf")?.save_with_format(&ap, image::ImageFormat::Png)?;

    let ds = folder::load_folder(root)?;
    ensure!(ds.train.len() == 2 && ds.test.len() == 1);
    let expect_jpg = image::open(&jpg)?.to_rgb8().into_raw();
    ensure!(ds.train.image(0) == &expect_jpg[..], "JPEG pixels differ from the image crate's decode");
    let mad: f64 = img.iter().zip(ds.train.image(0)).map(|(&a, &b)| (a as f64 - b as f64).abs()).sum::<f64>() / 144.0;
    ensure!(mad < 80.0, "JPEG decode is far from the original (mean abs diff {mad})");
    let expect_gray: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g]).collect();
    ensure!(ds.train.image(1) == &expect_gray[..], "grayscale must become R=G=B");
    ensure!(ds.test.image(0) == &img[..], "RGBA must drop alpha");
    Ok(())
}

#[test]
fn folder_bad_inputs_name_the_file() -> Result<()> {
    // Corrupt JPEG.
    let dir = tempfile::tempdir()?;
    png_tree(dir.path())?;
    let bad = dir.path().join("train/c/zz.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 definitely not a jpeg")?;
    check_contains(&err_text(folder::load_folder(dir.path())), &["zz.jpg", "decoding", "corrupt image?"])?;
    std::fs::remove_file(&bad)?;

    // Image of another size.
    let odd = dir.path().join("test/a_cls/odd.png");
    save_png(&odd, &image(1, 9, 6), 9, 6)?;
    check_contains(&err_text(folder::load_folder(dir.path())), &["odd.png is 6x9", "must share one size"])?;
    std::fs::remove_file(&odd)?;

    // A file that is not an image.
    let txt = dir.path().join("train/a_cls/notes.txt");
    std::fs::write(&txt, "hi")?;
    check_contains(&err_text(folder::load_folder(dir.path())), &["notes.txt is not a .jpg, .jpeg or .png"])?;
    std::fs::remove_file(&txt)?;

    // Empty class folder.
    std::fs::create_dir_all(dir.path().join("train/d"))?;
    std::fs::create_dir_all(dir.path().join("test/d"))?;
    check_contains(&err_text(folder::load_folder(dir.path())), &["empty class folder", "train/d"])?;

    // Mismatched class sets.
    std::fs::remove_dir(dir.path().join("train/d"))?;
    check_contains(
        &err_text(folder::load_folder(dir.path())),
        &["class folders of train and test differ", "only in test: [d]", "only in train: []"],
    )?;
    std::fs::remove_dir(dir.path().join("test/d"))?;
    folder::load_folder(dir.path())?; // and the tree is fine again

    // Missing split, missing root.
    std::fs::remove_dir_all(dir.path().join("test"))?;
    check_contains(&err_text(folder::load_folder(dir.path())), &["missing split", "test is not a directory"])?;
    let nowhere = dir.path().join("nowhere");
    check_contains(&err_text(folder::load_folder(&nowhere)), &["nowhere is not a directory"])
}

// ---------------------------------------------------------------- cache

fn no_temp_files(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        ensure!(!name.ends_with(".tmp"), "temporary file {name} left behind");
    }
    Ok(())
}

#[test]
fn folder_cache_is_written_reused_and_rebuilt() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let [train, test] = png_tree(dir.path())?;
    let cache_file = dir.path().join(".sdp-cache-v1.bin");
    let first = folder::load_folder(dir.path())?;
    ensure!(cache_file.is_file(), "no cache written");
    no_temp_files(dir.path())?;

    // The cache alone holds the data: it is read back equal to the decode.
    let listing = folder::list_tree(dir.path())?;
    let files: Vec<PathBuf> = listing.train.iter().chain(&listing.test).map(|(p, _)| p.clone()).collect();
    let fp = Fingerprint::of_files("folder", dir.path(), &files)?;
    let c = cache::read(&cache_file, &fp)?;
    ensure!(c.train == first.train && c.test == first.test && c.classes == first.classes);

    // Corrupt (one flipped pixel byte) and short caches are rejected, then rebuilt by the next load.
    let good = std::fs::read(&cache_file)?;
    let mut bad = good.clone();
    let at = bad.len() - 10;
    bad[at] ^= 1;
    std::fs::write(&cache_file, &bad)?;
    check_contains(&err_text(cache::read(&cache_file, &fp)), &[".sdp-cache-v1.bin is unusable", "checksum mismatch"])?;
    let ds = folder::load_folder(dir.path())?;
    check_folder_set(&ds.train, &train)?;
    ensure!(std::fs::read(&cache_file)? == good, "corrupt cache not rebuilt");

    std::fs::write(&cache_file, &good[..good.len() / 2])?;
    check_contains(&err_text(cache::read(&cache_file, &fp)), &["unusable", "truncated"])?;
    std::fs::write(&cache_file, b"garbage")?;
    check_contains(&err_text(cache::read(&cache_file, &fp)), &["unusable"])?;
    let ds = folder::load_folder(dir.path())?;
    check_folder_set(&ds.test, &test)?;
    ensure!(std::fs::read(&cache_file)? == good, "short cache not rebuilt");

    // A stale fingerprint is rejected by name.
    let other = Fingerprint::of_files("svhn", dir.path(), &files)?;
    check_contains(&err_text(cache::read(&cache_file, &other)), &["source files changed"])?;
    Ok(())
}

#[test]
fn folder_cache_sees_changed_images() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let [train, _] = png_tree(dir.path())?;
    folder::load_folder(dir.path())?;
    // Same size, new pixels, and an mtime set apart so a coarse-mtime file system still notices.
    let (path, _, _) = &train[0];
    let new = image(4242, 8, 6);
    save_png(path, &new, 8, 6)?;
    let f = std::fs::File::options().write(true).open(path)?;
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))?;
    drop(f);
    let ds = folder::load_folder(dir.path())?;
    ensure!(ds.train.image(0) == &new[..], "cache served stale pixels");
    // And a new image in a class invalidates it too.
    save_png(&dir.path().join("train/c/zzz.png"), &image(1, 8, 6), 8, 6)?;
    ensure!(folder::load_folder(dir.path())?.train.len() == train.len() + 1);
    no_temp_files(dir.path())
}

#[test]
fn cache_write_then_read_round_trips() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("c.bin");
    let data = cache::Cached {
        train: ImageSet::new(image(1, 4, 5).repeat(3), vec![0, 2, 1], 4, 5, 3)?,
        test: ImageSet::new(image(2, 4, 5), vec![2], 4, 5, 3)?,
        classes: vec!["x".into(), "yy".into(), "zzz".into()],
    };
    let fp = Fingerprint([7; 32]);
    cache::write(&path, &fp, &data)?;
    ensure!(cache::read(&path, &fp)? == data);
    no_temp_files(dir.path())?;
    // A cache whose labels exceed its class count is corrupt.
    let bad = cache::Cached { classes: vec!["x".into()], ..data };
    cache::write(&path, &fp, &bad)?;
    check_contains(&err_text(cache::read(&path, &fp)), &["label 2 of image 1 is out of range for 1 classes"])
}
