//! Data augmentation and normalisation: random crop with zero or reflection padding, horizontal flip,
//! per-channel mean/std normalisation, HWC u8 → CHW f32.
//!
//! The draws for an image depend only on `(augment key of the epoch, sample index)`, not on which worker
//! loads it: DP with any K, SDP and the single-worker baseline see identical augmented data.

use super::ImageSet;
pub use crate::spec::PadMode;

/// The augmentation a loader applies (validated from `workload.augment`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AugmentCfg {
    pub crop_pad: usize,
    /// What the crop reads outside the image: zero pixels, or the image mirrored at its border.
    pub pad_mode: PadMode,
    pub flip: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// One 64-bit draw from the augment stream of an epoch for one sample (SplitMix64 finaliser).
pub fn draw(epoch_key: u64, index: usize) -> u64 {
    let mut z = epoch_key ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The normalisation of each channel as a table from u8 pixel value to f32: entry `v` of channel `ch` is
/// `v·scale + shift` with `scale = 1/(255·std)`, `shift = -mean/std`, computed with exactly the expression a
/// per-pixel loop would use, so that the table changes no bit of the output. Built once per batch.
#[derive(Clone, Debug)]
pub struct Normalizer {
    lut: Vec<[f32; 256]>,
}

impl Normalizer {
    /// The tables of the `c` channels (channels beyond the third reuse the third's constants).
    pub fn new(cfg: &AugmentCfg, c: usize) -> Self {
        let lut = (0..c)
            .map(|ch| {
                let scale = 1.0 / (255.0 * cfg.std[ch.min(2)]);
                let shift = -cfg.mean[ch.min(2)] / cfg.std[ch.min(2)];
                std::array::from_fn(|v| v as f32 * scale + shift)
            })
            .collect();
        Self { lut }
    }
}

/// The crop offsets `(dy, dx)` and flip that `bits` select (all zero/false without augmentation).
fn crop_and_flip(cfg: &AugmentCfg, bits: Option<u64>) -> (isize, isize, bool) {
    match bits {
        Some(b) if cfg.crop_pad > 0 || cfg.flip => {
            let span = (2 * cfg.crop_pad + 1) as u64;
            let dy = (b % span) as isize - cfg.crop_pad as isize;
            let dx = ((b / span) % span) as isize - cfg.crop_pad as isize;
            let flip = cfg.flip && (b >> 40) & 1 == 1;
            (dy, dx, flip)
        }
        _ => (0, 0, false),
    }
}

/// Writes image `index` of `set`, augmented with `bits` (from [`draw`]; `None` = no augmentation), as
/// normalised CHW f32 into `out` (length c·h·w).
pub fn write_image(set: &ImageSet, index: usize, cfg: &AugmentCfg, bits: Option<u64>, out: &mut [f32]) {
    write_image_with(set, index, cfg, &Normalizer::new(cfg, set.c), bits, out);
}

/// [`write_image`] with the normalisation tables built by the caller (once per batch, not once per image).
///
/// Output pixel (y, x) reads source pixel (y + dy, x' + dx), where x' = w-1-x under a flip (the flip mirrors
/// the crop window); source pixels outside the image are zero. Each output row is therefore a run of
/// zero-pixel values, a contiguous (or, flipped, reversed) run of one source row, and another zero run: the
/// loop works on those runs instead of testing every pixel.
pub fn write_image_with(
    set: &ImageSet,
    index: usize,
    cfg: &AugmentCfg,
    norm: &Normalizer,
    bits: Option<u64>,
    out: &mut [f32],
) {
    let (dy, dx, flip) = crop_and_flip(cfg, bits);
    if cfg.pad_mode == PadMode::Reflect && (dy != 0 || dx != 0) {
        return write_reflected(set, index, norm, (dy, dx, flip), out);
    }
    let (h, w, c) = (set.h, set.w, set.c);
    let src = set.image(index);
    // Output columns x0..x1 read inside the source row: unflipped sx = x + dx, flipped sx = w-1-x + dx.
    let (wi, hi) = (w as isize, h as isize);
    let (lo, hi_x) = if flip { (dx, wi + dx) } else { (-dx, wi - dx) };
    let x0 = lo.clamp(0, wi) as usize;
    let x1 = (hi_x.clamp(0, wi) as usize).max(x0);
    // First source column of the run (the leftmost one read, whichever direction it is read in).
    let sx0 = if flip { (wi - x1 as isize + dx).max(0) as usize } else { (x0 as isize + dx).max(0) as usize };
    let run = x1 - x0;
    for (ch, plane) in out.chunks_exact_mut(h * w).take(c).enumerate() {
        let lut = &norm.lut[ch];
        let pad = lut[0];
        for (y, o) in plane.chunks_exact_mut(w).enumerate() {
            let sy = y as isize + dy;
            if sy < 0 || sy >= hi || run == 0 {
                o.fill(pad);
                continue;
            }
            o[..x0].fill(pad);
            o[x1..].fill(pad);
            let row = &src[(sy as usize * w + sx0) * c..(sy as usize * w + sx0 + run) * c];
            let px = row.chunks_exact(c).map(|p| lut[p[ch] as usize]);
            let o = &mut o[x0..x1];
            if flip {
                o.iter_mut().zip(px.rev()).for_each(|(o, v)| *o = v);
            } else {
                o.iter_mut().zip(px).for_each(|(o, v)| *o = v);
            }
        }
    }
}

/// Index `i` (possibly outside `0..n`) mirrored into `0..n` about the border pixels, without repeating
/// them (`-1 → 1`, `n → n-2`): NumPy's and PyTorch's `reflect` padding, extended periodically for pads wider
/// than the image.
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let r = i.rem_euclid(period);
    (if r < n as isize { r } else { period - r }) as usize
}

/// [`write_image_with`] for a shifted crop with reflection padding: each output pixel reads the source pixel
/// its mirrored coordinates name (the row and column maps are computed once per image).
fn write_reflected(set: &ImageSet, index: usize, norm: &Normalizer, crop: (isize, isize, bool), out: &mut [f32]) {
    let (h, w, c) = (set.h, set.w, set.c);
    let src = set.image(index);
    let (dy, dx, flip) = crop;
    let rows: Vec<usize> = (0..h).map(|y| reflect(y as isize + dy, h)).collect();
    let cols: Vec<usize> = (0..w)
        .map(|x| {
            let xx = if flip { w - 1 - x } else { x };
            reflect(xx as isize + dx, w)
        })
        .collect();
    for (ch, plane) in out.chunks_exact_mut(h * w).take(c).enumerate() {
        let lut = &norm.lut[ch];
        for (o, &sy) in plane.chunks_exact_mut(w).zip(&rows) {
            let row = &src[sy * w * c..(sy + 1) * w * c];
            o.iter_mut().zip(&cols).for_each(|(o, &sx)| *o = lut[row[sx * c + ch] as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The original per-pixel implementation, kept as the specification the run-based loop must match bit
    /// for bit (the determinism and DP-equivalence tests depend on these exact values).
    fn reference(set: &ImageSet, index: usize, cfg: &AugmentCfg, bits: Option<u64>, out: &mut [f32]) {
        let (h, w, c) = (set.h, set.w, set.c);
        let src = set.image(index);
        let (dy, dx, flip) = crop_and_flip(cfg, bits);
        let scale: Vec<f32> = (0..c).map(|ch| 1.0 / (255.0 * cfg.std[ch.min(2)])).collect();
        let shift: Vec<f32> = (0..c).map(|ch| -cfg.mean[ch.min(2)] / cfg.std[ch.min(2)]).collect();
        for y in 0..h {
            let sy = y as isize + dy;
            for x in 0..w {
                let xx = if flip { w - 1 - x } else { x };
                let sx = xx as isize + dx;
                let inside = sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize;
                for ch in 0..c {
                    let v = if inside { src[(sy as usize * w + sx as usize) * c + ch] as f32 } else { 0.0 };
                    out[ch * h * w + y * w + x] = v * scale[ch] + shift[ch];
                }
            }
        }
    }

    #[test]
    fn run_based_loop_matches_the_per_pixel_reference_bit_for_bit() -> anyhow::Result<()> {
        // Shapes include pads wider than the image (every row or column padded) and 1 and 4 channels.
        for (h, w, c, pad) in [(32, 32, 3, 4), (5, 7, 1, 2), (3, 2, 4, 3), (4, 4, 3, 6), (1, 1, 3, 1)] {
            let images: Vec<u8> = (0..2 * h * w * c).map(|i| (i * 37 % 256) as u8).collect();
            let set = ImageSet::new(images, vec![0, 1], h, w, c)?;
            for flip in [false, true] {
                let cfg = AugmentCfg {
                    crop_pad: pad,
                    pad_mode: PadMode::Zero,
                    flip,
                    mean: [0.49, 0.48, 0.45],
                    std: [0.25, 0.24, 0.26],
                };
                for i in 0..400u64 {
                    let bits = if i == 0 { None } else { Some(draw(0xDEAD_BEEF, i as usize)) };
                    let (mut a, mut b) = (vec![0.0; h * w * c], vec![1.0; h * w * c]);
                    reference(&set, 1, &cfg, bits, &mut a);
                    write_image(&set, 1, &cfg, bits, &mut b);
                    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{h}x{w}x{c} pad {pad} flip {flip} bits {bits:?}:\n{a:?}\n{b:?}");
                }
            }
        }
        Ok(())
    }

    fn set() -> ImageSet {
        // 1 image, 2×3, 1 channel … use 3 channels with distinct values per pixel.
        let images: Vec<u8> = (0..2 * 3 * 3).map(|i| i as u8 * 10).collect();
        ImageSet::new(images, vec![0], 2, 3, 3).unwrap()
    }

    #[test]
    fn identity_without_augmentation_is_chw_normalised() {
        let cfg = AugmentCfg { crop_pad: 0, pad_mode: PadMode::Zero, flip: false, mean: [0.0; 3], std: [1.0; 3] };
        let mut out = vec![0.0; 18];
        write_image(&set(), 0, &cfg, Some(12345), &mut out);
        // channel 0 of pixel (y=1, x=2) is HWC index (1*3+2)*3 = 15 -> value 150.
        assert!((out[5] - 150.0 / 255.0).abs() < 1e-6);
        assert!((out[2 * 6 + 5] - 170.0 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn flip_mirrors_columns() {
        let cfg = AugmentCfg { crop_pad: 0, pad_mode: PadMode::Zero, flip: true, mean: [0.0; 3], std: [1.0; 3] };
        let flip_bits = 1u64 << 40;
        let mut a = vec![0.0; 18];
        let mut b = vec![0.0; 18];
        write_image(&set(), 0, &cfg, Some(0), &mut a);
        write_image(&set(), 0, &cfg, Some(flip_bits), &mut b);
        for y in 0..2 {
            for x in 0..3 {
                assert_eq!(a[y * 3 + x], b[y * 3 + (2 - x)]);
            }
        }
    }

    #[test]
    fn crop_shifts_and_pads_with_zero_pixels() {
        let cfg = AugmentCfg { crop_pad: 1, pad_mode: PadMode::Zero, flip: false, mean: [0.5; 3], std: [0.25; 3] };
        // span 3: bits 0 -> dy = -1, dx = -1: output (0,0) reads source (-1,-1), a zero pixel.
        let mut out = vec![0.0; 18];
        write_image(&set(), 0, &cfg, Some(0), &mut out);
        assert!((out[0] - (0.0 - 0.5) / 0.25).abs() < 1e-6);
        // output (1,1) reads source (0,0) channel 0 = 0 as well; output (1,2) reads source (0,1) = 30.
        assert!((out[5] - (30.0 / 255.0 - 0.5) / 0.25).abs() < 1e-5);
    }

    #[test]
    fn reflect_mirrors_without_repeating_the_border() {
        let got: Vec<usize> = (-4..8).map(|i| reflect(i, 4)).collect();
        // PyTorch: F.pad(torch.arange(4.)[None, None], (4, 4), mode="reflect") → 0 1 2 3 2 1 | 0 1 2 3 | 2 1 0 1
        assert_eq!(got, vec![2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]);
        assert_eq!(reflect(-3, 1), 0);
    }

    #[test]
    fn reflection_padding_reads_mirrored_pixels() {
        let set = set(); // 2×3, 3 channels, pixel (y, x) channel ch = ((y*3 + x)*3 + ch)*10
        let mk = |pad_mode| AugmentCfg { crop_pad: 1, pad_mode, flip: false, mean: [0.0; 3], std: [1.0; 3] };
        // bits 0 → dy = dx = -1: output (y, x) reads source (y-1, x-1), mirrored: row -1 → 1, column -1 → 1.
        let mut out = vec![0.0; 18];
        write_image(&set, 0, &mk(PadMode::Reflect), Some(0), &mut out);
        let px = |y: usize, x: usize| ((y * 3 + x) * 3) as f32 * 10.0 / 255.0;
        let want = [px(1, 1), px(1, 0), px(1, 1), px(0, 1), px(0, 0), px(0, 1)];
        for (i, w) in want.iter().enumerate() {
            assert!((out[i] - w).abs() < 1e-6, "pixel {i}: {} vs {w}", out[i]);
        }
        // Without a shift, reflection changes nothing: identical bits to zero padding.
        let (mut a, mut b) = (vec![0.0; 18], vec![0.0; 18]);
        let centred = Some(1 + 3); // dy = 0, dx = 0 for span 3
        write_image(&set, 0, &mk(PadMode::Reflect), centred, &mut a);
        write_image(&set, 0, &mk(PadMode::Zero), centred, &mut b);
        assert_eq!(a, b);
    }
}
