//! Where a training step's time goes (`sdp bench step --profile`).
//!
//! Code marks a part of the step with [`scope`]; while profiling is on ([`enable`]), each scope adds its
//! *exclusive* wall time (its own time less that of the scopes opened inside it on the same thread) to its
//! [`Part`]. The CPU custom ops open their part's scope in the adapter (`cpu_op.rs`), so a convolution's
//! time is the convolution's even though it runs inside the forward pass or inside candle's backward.
//! What no op claims stays with the phase around it: `forward (rest)` is candle's own forward ops
//! (pointwise ops, pooling, the linear head, copies), `backward (rest)` is candle's autograd itself (the
//! graph walk, zero-filled gradient buffers and their sums, the backward of candle's ops).
//!
//! Counted FLOPs ([`add_flops`]): 2 · (multiply-adds) of the convolutions and batched matrix products as
//! executed — conv forward 2·B·Cout·Ho·Wo·Cin·kh·kw, the same for the input gradient (skipped for an input
//! that needs none, such as the image batch) and for the weight gradient; bmm 2·batch·M·N·K. Pointwise ops,
//! normalisation, the linear head and the optimizer are not counted (at ResNet sizes they are < 1 % of the
//! multiply-adds), so GFLOP/s is the rate of the step's dense arithmetic.
//!
//! Off (the default) a scope costs one relaxed atomic load.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A part of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    ConvForward,
    ConvBackwardData,
    ConvBackwardWeight,
    BnForward,
    BnBackward,
    /// Batched matrix products (attention).
    Matmul,
    /// The other custom ops: softmax, GELU, layer norm and their gradients.
    OtherOps,
    /// The forward pass less the ops above.
    Forward,
    /// The task's loss.
    Loss,
    /// Backpropagation less the ops above: candle's autograd and its own ops' backward.
    Backward,
    /// The optimizer update.
    Optimizer,
    /// SDP's averaging among holders (and DP's gradient and statistics averaging).
    Averaging,
}

impl Part {
    pub const ALL: [Part; 12] = [
        Part::ConvForward,
        Part::ConvBackwardData,
        Part::ConvBackwardWeight,
        Part::BnForward,
        Part::BnBackward,
        Part::Matmul,
        Part::OtherOps,
        Part::Forward,
        Part::Loss,
        Part::Backward,
        Part::Optimizer,
        Part::Averaging,
    ];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Part::ConvForward => "conv forward",
            Part::ConvBackwardData => "conv backward-data",
            Part::ConvBackwardWeight => "conv backward-weight",
            Part::BnForward => "batch norm forward",
            Part::BnBackward => "batch norm backward",
            Part::Matmul => "batched matmul",
            Part::OtherOps => "other custom ops",
            Part::Forward => "forward (rest: pointwise, pool, head)",
            Part::Loss => "loss",
            Part::Backward => "backward (rest: autograd, candle ops)",
            Part::Optimizer => "optimizer update",
            Part::Averaging => "averaging",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const N: usize = Part::ALL.len();

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static CALLS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static FLOPS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

thread_local! {
    /// The open scopes of this thread: their part, start and the time of the scopes nested in them.
    static OPEN: RefCell<Vec<(Part, Instant, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Turns profiling on or off (process-wide).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Sets every part's time, call count and FLOPs to zero.
pub fn reset() {
    for a in NANOS.iter().chain(&CALLS).chain(&FLOPS) {
        a.store(0, Ordering::Relaxed);
    }
}

/// An open scope; its exclusive time is added to its part when it is dropped.
#[must_use = "a scope measures until it is dropped"]
pub struct Scope(bool);

/// Opens a scope of `part` on this thread (a no-op while profiling is off).
pub fn scope(part: Part) -> Scope {
    if !enabled() {
        return Scope(false);
    }
    OPEN.with(|o| o.borrow_mut().push((part, Instant::now(), 0)));
    Scope(true)
}

impl Drop for Scope {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        OPEN.with(|o| {
            let mut open = o.borrow_mut();
            let Some((part, start, nested)) = open.pop() else { return };
            let total = start.elapsed().as_nanos() as u64;
            NANOS[part.index()].fetch_add(total.saturating_sub(nested), Ordering::Relaxed);
            CALLS[part.index()].fetch_add(1, Ordering::Relaxed);
            if let Some(parent) = open.last_mut() {
                parent.2 += total;
            }
        });
    }
}

/// Counts `flops` floating-point operations towards `part` (while profiling is on).
pub fn add_flops(part: Part, flops: u64) {
    if enabled() {
        FLOPS[part.index()].fetch_add(flops, Ordering::Relaxed);
    }
}

/// One part's totals since the last [`reset`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartTotals {
    pub part: Part,
    pub seconds: f64,
    pub calls: u64,
    pub flops: u64,
}

/// Every part's totals since the last [`reset`], in [`Part::ALL`] order.
pub fn totals() -> Vec<PartTotals> {
    Part::ALL
        .iter()
        .map(|&part| {
            let i = part.index();
            PartTotals {
                part,
                seconds: NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9,
                calls: CALLS[i].load(Ordering::Relaxed),
                flops: FLOPS[i].load(Ordering::Relaxed),
            }
        })
        .collect()
}
