//! The plotting engine: a [`Plot`] says what a figure shows (lines of points with error bars and whiskers,
//! horizontal references with bands, two axes with their domains); [`write_plot`] lays it out and draws it
//! as an SVG and a 2× PNG with plotters.
//!
//! Layout choices a reader notices, made here once for every figure:
//! - each axis is fitted to what it shows: the data (with error bars) padded a little, widened to a
//!   minimum span so that seed noise of 0.01 % does not fill the height, and kept inside its domain
//!   (coverage in [0, 1], accuracy in [0, 100], ratios ≥ 0);
//! - ticks sit on round steps (1, 2 or 5 × 10^k), or on the values that were run (coverages) where those are
//!   far enough apart, computed here rather than by plotters, and are
//!   labelled with exactly the decimals the step needs (`0.6`, never `0.6000000000000001`);
//! - the legend panel is as wide as its longest entry, on the right when that costs at most 30 % of the
//!   width, else below the plot in columns (the figure grows taller instead of the plot narrower).
//!
//! Text is laid out and drawn with plotters' `ab_glyph` backend from a font embedded in the binary
//! (`assets/fonts/DejaVuSans.ttf`), so no system font library is needed and the same `Plot` always gives
//! the same bytes; PNGs are rendered into an in-memory RGB buffer and encoded with the `image` crate.

use crate::results::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::element::{DashedPathElement, ErrorBar};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::{Path, PathBuf};

/// Width of every figure in SVG user units (= pixels); the height grows with a legend placed below.
pub(super) const WIDTH: u32 = 1100;
/// Height of a figure whose legend fits on the right.
pub(super) const BASE_HEIGHT: u32 = 620;
/// PNGs are drawn at this multiple of the SVG's size.
pub(super) const PNG_SCALE: u32 = 2;
const FONT: &str = "sans-serif";
/// DejaVu Sans 2.37 (Bitstream Vera license, `assets/fonts/LICENSE-DejaVu.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
/// Height of the title and subtitle block.
const HEADER_H: u32 = 58;
/// Legend geometry: the line sample, the gap before the text, the row height, the padding around.
const SAMPLE_W: u32 = 34;
const SAMPLE_GAP: u32 = 8;
const ROW_H: u32 = 22;
const LEGEND_PAD: u32 = 14;
const LEGEND_FONT: f64 = 13.0;
/// The legend goes below the plot when a right-hand panel would take more than this fraction of the width.
const MAX_RIGHT_LEGEND: f64 = 0.3;

pub(super) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Marker {
    None,
    Circle,
    Square,
    Triangle,
    Cross,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Point {
    pub x: f64,
    pub y: f64,
    /// Vertical error bar: ± this (0: none).
    pub y_std: f64,
    /// A horizontal whisker from x to here (the largest worker, where x is the mean worker).
    pub x_hi: Option<f64>,
    /// A vertical whisker from y to here.
    pub y_hi: Option<f64>,
    /// Small text next to the marker (e.g. its coverage).
    pub tag: Option<String>,
}

impl Point {
    pub fn new(x: f64, y: f64) -> Self {
        Point { x, y, ..Default::default() }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Line {
    pub name: String,
    pub color: RGBColor,
    pub dashed: bool,
    pub marker: Marker,
    pub points: Vec<Point>,
}

/// A horizontal reference line across the plot with a ± band (0: none); an empty name has no legend entry.
#[derive(Clone, Debug)]
pub(super) struct HLine {
    pub name: String,
    pub color: RGBColor,
    pub y: f64,
    pub band: f64,
    pub dashed: bool,
}

#[derive(Clone, Debug)]
pub(super) struct Axis {
    pub label: String,
    /// The axis never extends beyond this (apart from a small padding, so that markers on the edge show whole).
    pub domain: (f64, f64),
    /// The smallest span shown.
    pub min_span: f64,
    /// Whole numbers only (epochs).
    pub integer: bool,
    /// Ticks at these values (e.g. the coverages that were run) where they are far enough apart; else round
    /// steps.
    pub preferred_ticks: Vec<f64>,
    /// A value the axis always shows (0 for ratios, so that bars of "0.35× DP" look like it).
    pub anchor: Option<f64>,
}

impl Axis {
    pub fn new(label: impl Into<String>, domain: (f64, f64), min_span: f64) -> Self {
        Axis { label: label.into(), domain, min_span, integer: false, preferred_ticks: vec![], anchor: None }
    }
}

pub(super) struct Plot {
    pub title: String,
    /// What was trained: dataset, model, K.
    pub subtitle: String,
    pub x: Axis,
    pub y: Axis,
    pub lines: Vec<Line>,
    pub hlines: Vec<HLine>,
}

/// An axis as drawn: its range and its ticks with their label precision.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Fit {
    pub lo: f64,
    pub hi: f64,
    pub ticks: Vec<f64>,
    pub decimals: usize,
}

/// A linear f64 axis whose grid lines and tick labels sit exactly at the ticks computed here (plotters'
/// own `with_key_points` cannot take a label formatter on an f64 axis).
struct Ticked {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn of(f: &Fit) -> Self {
        Ticked { lo: f.lo, hi: f.hi, ticks: f.ticks.clone() }
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    /// As plotters maps its own f64 axes.
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let frac = (v - self.lo) / (self.hi - self.lo);
        if !frac.is_finite() {
            return (limit.0 + limit.1) / 2;
        }
        let len = limit.1 - limit.0;
        if len >= 0 {
            limit.0 + (f64::from(len) * frac + 1e-3).floor() as i32
        } else {
            limit.0 - (f64::from(-len) * frac + 1e-3).floor() as i32
        }
    }

    /// The ticks as the bold (labelled) grid; no light grid in between.
    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            vec![]
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// The smallest round step (1, 2 or 5 × 10^k; at least 1 for whole numbers) that is at least `raw`. No 2.5:
/// its labels need one more decimal than the values they mark.
pub(super) fn nice_step(raw: f64, integer: bool) -> f64 {
    if !(raw > 0.0 && raw.is_finite()) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw * (1.0 - 1e-9)).unwrap_or(10.0 * mag);
    if integer {
        step.max(1.0).round()
    } else {
        step
    }
}

/// Decimals needed to write every value of `vs` exactly (up to 1e-6 relative; at most 6).
pub(super) fn decimals_for(vs: &[f64]) -> usize {
    (0..=6)
        .find(|&d| {
            let scale = 10f64.powi(d as i32);
            vs.iter().all(|v| {
                let s = (v * scale).abs();
                (s - s.round()).abs() <= 1e-6 * s.max(1.0)
            })
        })
        .unwrap_or(6)
}

/// A tick label with `decimals` decimals (`-0` written as `0`).
pub(super) fn tick_label(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// Smallest and largest value on an axis, if any.
type Extent = Option<(f64, f64)>;

/// Fits an axis to the values it shows (`None`: no values) with about `target` ticks.
pub(super) fn fit_axis(extent: Extent, axis: &Axis, target: usize) -> Fit {
    let (d0, d1) = axis.domain;
    let (mut lo, mut hi) = extent.unwrap_or((d0.max(0.0), d1.min(1.0)));
    if let Some(a) = axis.anchor {
        (lo, hi) = (lo.min(a), hi.max(a));
    }
    if hi - lo < axis.min_span {
        let c = 0.5 * (lo + hi);
        (lo, hi) = (c - 0.5 * axis.min_span, c + 0.5 * axis.min_span);
    }
    // Keep the span, but inside the domain.
    if hi > d1 {
        (lo, hi) = (lo - (hi - d1), d1);
    }
    if lo < d0 {
        (lo, hi) = (d0, (hi + (d0 - lo)).min(d1));
    }
    let in_range = |t: &f64| *t >= lo - 1e-9 * (hi - lo) && *t <= hi + 1e-9 * (hi - lo);
    let mut preferred: Vec<f64> = axis.preferred_ticks.iter().cloned().filter(in_range).collect();
    preferred.sort_by(f64::total_cmp);
    preferred.dedup();
    let far_apart = preferred.windows(2).all(|w| w[1] - w[0] >= 0.06 * (hi - lo));
    let ticks = if preferred.len() >= 2 && far_apart {
        preferred
    } else {
        let step = nice_step((hi - lo) / target.max(1) as f64, axis.integer);
        let (k0, k1) = ((lo / step - 1e-9).ceil() as i64, (hi / step + 1e-9).floor() as i64);
        (k0..=k1).map(|k| if k == 0 { 0.0 } else { k as f64 * step }).collect()
    };
    let decimals = if axis.integer { 0 } else { decimals_for(&ticks) };
    let pad = 0.04 * (hi - lo);
    Fit { lo: lo - pad, hi: hi + pad, ticks, decimals }
}

impl Plot {
    /// The span of the x and the y values shown (`None`: no values).
    fn extents(&self) -> (Extent, Extent) {
        let span = |vs: Vec<f64>| {
            let vs: Vec<f64> = vs.into_iter().filter(|v| v.is_finite()).collect();
            let lo = vs.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = vs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            lo.is_finite().then_some((lo, hi))
        };
        let pts = || self.lines.iter().flat_map(|l| l.points.iter());
        let xs = pts().flat_map(|p| [Some(p.x), p.x_hi]).flatten().collect();
        let mut ys: Vec<f64> =
            pts().flat_map(|p| [Some(p.y - p.y_std), Some(p.y + p.y_std), p.y_hi]).flatten().collect();
        ys.extend(self.hlines.iter().flat_map(|h| [h.y - h.band, h.y + h.band]));
        (span(xs), span(ys))
    }

    /// Legend entries: (name, color, line: None or dashed, marker, band). A single point has no line sample.
    fn legend(&self) -> Vec<(&str, RGBColor, Option<bool>, Marker, bool)> {
        self.hlines
            .iter()
            .filter(|h| !h.name.is_empty())
            .map(|h| (h.name.as_str(), h.color, Some(h.dashed), Marker::None, h.band > 0.0))
            .chain(self.lines.iter().map(|l| {
                let line = (l.points.len() != 1 || l.marker == Marker::None).then_some(l.dashed);
                (l.name.as_str(), l.color, line, l.marker, false)
            }))
            .collect()
    }
}

/// Where the legend goes (in SVG pixels).
#[derive(Clone, Copy, Debug, PartialEq)]
enum LegendPlace {
    /// A panel of this width on the right.
    Right(u32),
    /// Below the plot: columns of this width, this many columns and rows.
    Below { col_w: u32, cols: u32, rows: u32 },
}

fn text_width(text: &str) -> u32 {
    let font: FontDesc = (FONT, LEGEND_FONT).into_font();
    // Estimating 0.6 em per character if the font cannot lay the text out (it always can: it is embedded).
    font.box_size(text).map(|(w, _)| w).unwrap_or((text.chars().count() as f64 * LEGEND_FONT * 0.6) as u32)
}

fn legend_place(p: &Plot) -> LegendPlace {
    let entries = p.legend();
    let entry_w = entries.iter().map(|e| text_width(e.0)).max().unwrap_or(0) + SAMPLE_W + SAMPLE_GAP;
    let panel_w = entry_w + 2 * LEGEND_PAD;
    let fits_height = entries.len() as u32 * ROW_H + 2 * LEGEND_PAD <= BASE_HEIGHT - HEADER_H;
    if f64::from(panel_w) <= MAX_RIGHT_LEGEND * f64::from(WIDTH) && fits_height {
        LegendPlace::Right(panel_w)
    } else {
        let col_w = entry_w + 2 * LEGEND_PAD;
        let cols = ((WIDTH - LEGEND_PAD) / col_w).max(1);
        let rows = (entries.len() as u32).div_ceil(cols);
        LegendPlace::Below { col_w, cols, rows }
    }
}

fn figure_height(place: LegendPlace) -> u32 {
    match place {
        LegendPlace::Right(_) => BASE_HEIGHT,
        LegendPlace::Below { rows, .. } => BASE_HEIGHT + rows * ROW_H + LEGEND_PAD,
    }
}

/// Draws a marker centred on `at` (backend pixels).
fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    m: Marker,
    at: (i32, i32),
    color: RGBColor,
    k: i32,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let r = 5 * k;
    match m {
        Marker::None => Ok(()),
        Marker::Circle => area.draw(&Circle::new(at, r, color.filled())),
        Marker::Square => {
            area.draw(&Rectangle::new([(at.0 - r + k, at.1 - r + k), (at.0 + r - k, at.1 + r - k)], color.filled()))
        }
        Marker::Triangle => area.draw(&TriangleMarker::new(at, r + k, color.filled())),
        Marker::Cross => area.draw(&Cross::new(at, r, color.stroke_width(2 * k as u32))),
    }
}

fn draw_segment<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    pts: Vec<(i32, i32)>,
    dashed: bool,
    style: ShapeStyle,
    k: i32,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    if dashed {
        area.draw(&DashedPathElement::new(pts, 8 * k, 5 * k, style))
    } else {
        area.draw(&PathElement::new(pts, style))
    }
}

/// Draws `p` on `root`, every length (fonts, margins, strokes) multiplied by `k` (the PNG is drawn at 2×:
/// small text rasterised by plotters' ab_glyph backend can sit a pixel off its baseline, which 2× hides).
fn draw_plot<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, p: &Plot, place: LegendPlace, k: u32) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing: {e}");
    let ki = k as i32;
    let font = |size: f64| (FONT, size * f64::from(k));
    root.fill(&WHITE).map_err(e)?;
    root.draw(&Text::new(p.title.clone(), (12 * ki, 8 * ki), font(20.0))).map_err(e)?;
    root.draw(&Text::new(p.subtitle.clone(), (12 * ki, 34 * ki), font(14.0))).map_err(e)?;
    let (_, body) = root.split_vertically(HEADER_H * k);
    let (plot_area, legend_area) = match place {
        LegendPlace::Right(w) => body.split_horizontally((WIDTH - w) * k),
        LegendPlace::Below { .. } => body.split_vertically((BASE_HEIGHT - HEADER_H) * k),
    };
    let (xe, ye) = p.extents();
    let (xf, yf) = (fit_axis(xe, &p.x, 6), fit_axis(ye, &p.y, 8));
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(12 * k)
        .margin_right(20 * k)
        .x_label_area_size(50 * k)
        .y_label_area_size(78 * k)
        .build_cartesian_2d(Ticked::of(&xf), Ticked::of(&yf))
        .map_err(e)?;
    let (xd, yd) = (xf.decimals, yf.decimals);
    chart
        .configure_mesh()
        .x_label_formatter(&|v: &f64| tick_label(*v, xd))
        .y_label_formatter(&|v: &f64| tick_label(*v, yd))
        .x_desc(p.x.label.as_str())
        .y_desc(p.y.label.as_str())
        .axis_desc_style(font(16.0))
        .label_style(font(13.0))
        .bold_line_style(RGBColor(225, 225, 225).stroke_width(k))
        .axis_style(BLACK.stroke_width(k))
        .draw()
        .map_err(e)?;
    let stroke = |c: RGBColor, w: u32| c.stroke_width(w * k);
    let px = |x: f64, y: f64| chart.backend_coord(&(x, y));
    for h in &p.hlines {
        if h.band > 0.0 {
            let band = Rectangle::new([(xf.lo, h.y - h.band), (xf.hi, h.y + h.band)], h.color.mix(0.12).filled());
            chart.plotting_area().draw(&band).map_err(e)?;
        }
        draw_segment(root, vec![px(xf.lo, h.y), px(xf.hi, h.y)], h.dashed, stroke(h.color, 2), ki).map_err(e)?;
    }
    let mut tags: Vec<(f64, f64)> = vec![];
    for l in &p.lines {
        if l.points.len() > 1 {
            let pts = l.points.iter().map(|q| px(q.x, q.y)).collect();
            draw_segment(root, pts, l.dashed, stroke(l.color, 2), ki).map_err(e)?;
        }
        for q in &l.points {
            if q.y_std > 0.0 {
                let bar = ErrorBar::new_vertical(q.x, q.y - q.y_std, q.y, q.y + q.y_std, stroke(l.color, 1), 10 * k);
                chart.plotting_area().draw(&bar).map_err(e)?;
            }
            if let Some(x_hi) = q.x_hi.filter(|v| v.is_finite()) {
                let bar = ErrorBar::new_horizontal(q.y, q.x, q.x, x_hi, stroke(l.color, 1), 8 * k);
                chart.plotting_area().draw(&bar).map_err(e)?;
            }
            if let Some(y_hi) = q.y_hi.filter(|v| v.is_finite()) {
                let bar = ErrorBar::new_vertical(q.x, q.y, q.y, y_hi, stroke(l.color, 1), 8 * k);
                chart.plotting_area().draw(&bar).map_err(e)?;
            }
            draw_marker(root, l.marker, px(q.x, q.y), l.color, ki).map_err(e)?;
            // A tag that would overprint an earlier one is left out (decided in data space, so that the SVG
            // and the PNG agree).
            let clear = |t: &(f64, f64)| {
                (t.0 - q.x).abs() > 0.06 * (xf.hi - xf.lo) || (t.1 - q.y).abs() > 0.035 * (yf.hi - yf.lo)
            };
            if let Some(tag) = q.tag.as_ref().filter(|_| tags.iter().all(clear)) {
                tags.push((q.x, q.y));
                let (x, y) = px(q.x, q.y);
                // Below right: lines through increasing points leave that corner free.
                let style = font(12.0).into_font().color(&l.color);
                root.draw(&Text::new(tag.clone(), (x + 7 * ki, y + 5 * ki), style)).map_err(e)?;
            }
        }
    }
    // The legend, in its own panel so that it never covers data.
    let entries = p.legend();
    let pad = (LEGEND_PAD * k) as i32;
    for (i, (name, color, dashed, marker, band)) in entries.into_iter().enumerate() {
        let i = i as u32;
        let (col, row) = match place {
            LegendPlace::Right(_) => (0, i),
            // Column by column, so that entries read down as they do in a right-hand panel.
            LegendPlace::Below { rows, .. } => (i / rows, i % rows),
        };
        let col_w = match place {
            LegendPlace::Right(w) => w,
            LegendPlace::Below { col_w, .. } => col_w,
        };
        let x = pad + (col * col_w * k) as i32;
        let y = pad + ((row * ROW_H + ROW_H / 2) * k) as i32;
        let sample_w = (SAMPLE_W * k) as i32;
        if band {
            let rect = Rectangle::new([(x, y - 6 * ki), (x + sample_w, y + 6 * ki)], color.mix(0.12).filled());
            legend_area.draw(&rect).map_err(e)?;
        }
        if let Some(dashed) = dashed {
            draw_segment(&legend_area, vec![(x, y), (x + sample_w, y)], dashed, stroke(color, 2), ki).map_err(e)?;
        }
        draw_marker(&legend_area, marker, (x + sample_w / 2, y), color, ki).map_err(e)?;
        let tx = x + ((SAMPLE_W + SAMPLE_GAP) * k) as i32;
        let style = font(LEGEND_FONT).into_text_style(&legend_area).pos(Pos::new(HPos::Left, VPos::Center));
        legend_area.draw(&Text::new(name.to_string(), (tx, y), style)).map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

/// Registers the embedded font with plotters once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok());
    if ok {
        Ok(())
    } else {
        bail!("the embedded font assets/fonts/DejaVuSans.ttf could not be parsed")
    }
}

/// Writes `stem.svg` and `stem.png` (atomically) and returns their paths.
pub(super) fn write_plot(dir: &Path, stem: &str, p: &Plot) -> Result<Vec<PathBuf>> {
    ensure_font()?;
    let place = legend_place(p);
    let size = (WIDTH, figure_height(place));
    let svg_path = dir.join(format!("{stem}.svg"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        draw_plot(&root, p, place, 1).with_context(|| format!("rendering {}", svg_path.display()))?;
    }
    write_atomic(&svg_path, svg.as_bytes())?;

    let png_path = dir.join(format!("{stem}.png"));
    let (w, h) = (size.0 * PNG_SCALE, size.1 * PNG_SCALE);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw_plot(&root, p, place, PNG_SCALE).with_context(|| format!("rendering {}", png_path.display()))?;
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .with_context(|| format!("encoding {}", png_path.display()))?;
    write_atomic(&png_path, &png)?;
    Ok(vec![svg_path, png_path])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_have_the_decimals_the_step_needs() {
        // The ticks a 0.2 step gives by repeated addition carry float noise; labels must not.
        assert_eq!(tick_label(0.6000000000000001, decimals_for(&[0.2, 0.4, 0.6000000000000001])), "0.6");
        assert_eq!(tick_label(1.2000000000000002, decimals_for(&[1.0, 1.2000000000000002])), "1.2");
        assert_eq!(decimals_for(&[0.25, 0.5, 0.75, 1.0]), 2);
        assert_eq!(decimals_for(&[98.0, 98.5, 99.0]), 1);
        assert_eq!(decimals_for(&[0.0, 20.0, 40.0]), 0);
        assert_eq!(tick_label(-0.0, 1), "0.0");
        assert_eq!(tick_label(-1e-17, 2), "0.00");
        assert_eq!(tick_label(-0.5, 1), "-0.5");
        assert_eq!(tick_label(0.5, 2), "0.50");
    }

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(0.09, false), 0.1);
        assert_eq!(nice_step(0.11, false), 0.2);
        assert_eq!(nice_step(0.21, false), 0.5);
        assert_eq!(nice_step(0.3, false), 0.5);
        assert_eq!(nice_step(7.0, false), 10.0);
        assert_eq!(nice_step(0.3, true), 1.0);
        assert_eq!(nice_step(23.0, true), 50.0);
        assert_eq!(nice_step(2.1, true), 5.0);
    }

    #[test]
    fn a_flat_accuracy_axis_gets_a_minimum_span_inside_its_domain() {
        // DP alone at 99.35 %: the case that once drew an axis spanning 99.342–99.358.
        let acc = Axis::new("acc", (0.0, 100.0), 2.0);
        let f = fit_axis(Some((99.35, 99.35)), &acc, 6);
        assert!(f.hi <= 100.0 + 0.1 && f.lo >= 97.9 && f.hi - f.lo >= 2.0, "{f:?}");
        let labels: Vec<String> = f.ticks.iter().map(|t| tick_label(*t, f.decimals)).collect();
        assert_eq!(labels, ["98.0", "98.5", "99.0", "99.5", "100.0"]);
        // Coverage: ticks at the coverages that were run, never beyond 1.
        let mut cov = Axis::new("C", (0.0, 1.0), 0.2);
        cov.preferred_ticks = vec![0.25, 0.5, 0.75, 1.0];
        let f = fit_axis(Some((0.25, 1.0)), &cov, 6);
        assert_eq!(f.ticks, [0.25, 0.5, 0.75, 1.0]);
        assert_eq!(f.decimals, 2);
        assert!(f.lo > 0.2 && f.lo < 0.25 && f.hi > 1.0 && f.hi < 1.05, "{f:?}");
        // Only C = 1: a span of 0.2 ending at 1, round ticks.
        let f = fit_axis(Some((1.0, 1.0)), &Axis::new("C", (0.0, 1.0), 0.2), 6);
        assert_eq!(
            f.ticks.iter().map(|t| tick_label(*t, f.decimals)).collect::<Vec<_>>(),
            ["0.80", "0.85", "0.90", "0.95", "1.00"]
        );
        // A ratio axis anchored at 0.
        let mut ratio = Axis::new("memory / DP", (0.0, f64::INFINITY), 0.2);
        ratio.anchor = Some(0.0);
        let f = fit_axis(Some((0.35, 1.0)), &ratio, 6);
        assert_eq!(f.ticks, [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        assert_eq!(
            f.ticks.iter().map(|t| tick_label(*t, f.decimals)).collect::<Vec<_>>(),
            ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
        );
        // Epochs: whole numbers.
        let mut ep = Axis::new("epoch", (0.0, f64::INFINITY), 1.0);
        ep.integer = true;
        let f = fit_axis(Some((1.0, 2.0)), &ep, 6);
        assert_eq!((f.ticks.clone(), f.decimals), (vec![1.0, 2.0], 0));
    }

    #[test]
    fn a_long_legend_goes_below_and_a_short_one_is_sized_to_its_text() -> Result<()> {
        ensure_font()?;
        let line = |name: &str| Line {
            name: name.into(),
            color: BLACK,
            dashed: false,
            marker: Marker::Circle,
            points: vec![],
        };
        let mut p = Plot {
            title: String::new(),
            subtitle: String::new(),
            x: Axis::new("x", (0.0, 1.0), 0.1),
            y: Axis::new("y", (0.0, 1.0), 0.1),
            lines: vec![line("DP")],
            hlines: vec![],
        };
        let LegendPlace::Right(w) = legend_place(&p) else { panic!("a short legend belongs on the right") };
        assert!(w < 120, "a two-letter entry needs no {w} px");
        assert_eq!(figure_height(LegendPlace::Right(w)), BASE_HEIGHT);
        p.lines.push(line("SDP neuron backward resample_every=100 budget=flop_matched lr=0.05 momentum=0.9"));
        match legend_place(&p) {
            LegendPlace::Below { cols, rows, .. } => {
                assert_eq!((cols, rows), (1, 2));
                assert!(figure_height(legend_place(&p)) > BASE_HEIGHT);
            }
            LegendPlace::Right(w) => panic!("a {w} px legend panel wastes the plot"),
        }
        Ok(())
    }
}
