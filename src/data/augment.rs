//! Data augmentation and normalisation: random crop with zero padding, horizontal flip, per-channel
//! mean/std normalisation, HWC u8 → CHW f32.
//!
//! The draws for an image depend only on `(augment key of the epoch, sample index)`, not on which worker
//! loads it: DP with any K, SDP and the single-worker baseline see identical augmented data.

use super::ImageSet;

/// The augmentation a loader applies (validated from `workload.augment`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AugmentCfg {
    pub crop_pad: usize,
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

/// Writes image `index` of `set`, augmented with `bits` (from [`draw`]; `None` = no augmentation), as
/// normalised CHW f32 into `out` (length c·h·w).
pub fn write_image(set: &ImageSet, index: usize, cfg: &AugmentCfg, bits: Option<u64>, out: &mut [f32]) {
    let (h, w, c) = (set.h, set.w, set.c);
    let src = set.image(index);
    let (dy, dx, flip) = match bits {
        Some(b) if cfg.crop_pad > 0 || cfg.flip => {
            let span = (2 * cfg.crop_pad + 1) as u64;
            let dy = (b % span) as isize - cfg.crop_pad as isize;
            let dx = ((b / span) % span) as isize - cfg.crop_pad as isize;
            let flip = cfg.flip && (b >> 40) & 1 == 1;
            (dy, dx, flip)
        }
        _ => (0, 0, false),
    };
    let scale: Vec<f32> = (0..c).map(|ch| 1.0 / (255.0 * cfg.std[ch.min(2)])).collect();
    let shift: Vec<f32> = (0..c).map(|ch| -cfg.mean[ch.min(2)] / cfg.std[ch.min(2)]).collect();
    for y in 0..h {
        let sy = y as isize + dy;
        for x in 0..w {
            // A flip mirrors the crop window: output x reads source column w-1-x (then shifted).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> ImageSet {
        // 1 image, 2×3, 1 channel … use 3 channels with distinct values per pixel.
        let images: Vec<u8> = (0..2 * 3 * 3).map(|i| i as u8 * 10).collect();
        ImageSet::new(images, vec![0], 2, 3, 3).unwrap()
    }

    #[test]
    fn identity_without_augmentation_is_chw_normalised() {
        let cfg = AugmentCfg { crop_pad: 0, flip: false, mean: [0.0; 3], std: [1.0; 3] };
        let mut out = vec![0.0; 18];
        write_image(&set(), 0, &cfg, Some(12345), &mut out);
        // channel 0 of pixel (y=1, x=2) is HWC index (1*3+2)*3 = 15 -> value 150.
        assert!((out[5] - 150.0 / 255.0).abs() < 1e-6);
        assert!((out[2 * 6 + 5] - 170.0 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn flip_mirrors_columns() {
        let cfg = AugmentCfg { crop_pad: 0, flip: true, mean: [0.0; 3], std: [1.0; 3] };
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
        let cfg = AugmentCfg { crop_pad: 1, flip: false, mean: [0.5; 3], std: [0.25; 3] };
        // span 3: bits 0 -> dy = -1, dx = -1: output (0,0) reads source (-1,-1), a zero pixel.
        let mut out = vec![0.0; 18];
        write_image(&set(), 0, &cfg, Some(0), &mut out);
        assert!((out[0] - (0.0 - 0.5) / 0.25).abs() < 1e-6);
        // output (1,1) reads source (0,0) channel 0 = 0 as well; output (1,2) reads source (0,1) = 30.
        assert!((out[5] - (30.0 / 255.0 - 0.5) / 0.25).abs() < 1e-5);
    }
}
