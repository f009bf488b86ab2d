//! The candle side of the CPU custom ops: an op states its arithmetic on contiguous f32 slices as a
//! [`CpuOp`], and the [`Cpu`] adapter implements candle's `CustomOp1/2/3` for it once (storage and
//! layout unpacking, the dtype and contiguity checks, wrapping the f32 result).

use super::profile::{self, Part};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// One argument of a [`CpuOp`]: its contiguous f32 data (what it dereferences to) and its shape.
#[derive(Clone, Copy)]
pub(crate) struct Arg<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) shape: &'a Shape,
}

impl Arg<'_> {
    pub(crate) fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
}

impl std::ops::Deref for Arg<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        self.data
    }
}

/// What names a [`CpuOp`] in candle and in error messages: the op (`sdp-…`) and each argument
/// ("input", "gamma", ...).
pub(crate) struct Names<const N: usize> {
    pub(crate) op: &'static str,
    pub(crate) args: [&'static str; N],
}

/// A CPU custom op on `N` contiguous f32 tensors; [`Cpu`] runs it as a candle custom op.
pub(crate) trait CpuOp<const N: usize>: Send + Sync {
    const NAMES: Names<N>;
    /// How many leading arguments must have one shape (2 for a gradient and the value it belongs to).
    const SAME_SHAPE: usize = 1;
    /// The part of a step its time counts towards in a profile.
    const PART: Part = Part::OtherOps;

    /// The result and its shape.
    fn fwd(&self, args: [Arg<'_>; N]) -> Result<(Vec<f32>, Shape)>;

    /// The arguments' gradients for the output gradient `grad` of the result `res` (candle's `bwd`).
    /// Ops only run through `apply_op*_no_bwd` keep the default, an error.
    fn bwd(&self, _args: [&Tensor; N], _res: &Tensor, _grad: &Tensor) -> Result<[Option<Tensor>; N]> {
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAMES.op })
    }
}

/// The contiguous f32 data of a CPU custom op's argument; `op` and `what` name it in errors.
fn f32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: {what} must be f32, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!("{op}: {what} must be contiguous (layout {l:?})"),
    }
}

/// Unpacks the arguments (the first that is not contiguous f32 is the error), checks the shapes
/// `O::SAME_SHAPE` asks for and runs `op.fwd`.
fn cpu_fwd<O: CpuOp<N>, const N: usize>(op: &O, args: [(&CpuStorage, &Layout); N]) -> Result<(CpuStorage, Shape)> {
    let _profiled = profile::scope(O::PART);
    let mut err = None;
    let args = std::array::from_fn(|i| {
        let (s, l) = args[i];
        let data = f32_slice(O::NAMES.op, s, l, O::NAMES.args[i]).unwrap_or_else(|e| {
            err.get_or_insert(e);
            &[]
        });
        Arg { data, shape: l.shape() }
    });
    if let Some(e) = err {
        return Err(e);
    }
    if let [first, rest @ ..] = &args[..O::SAME_SHAPE.min(N)] {
        for (a, what) in rest.iter().zip(&O::NAMES.args[1..]) {
            if a.dims() != first.dims() {
                let (op, first_what) = (O::NAMES.op, O::NAMES.args[0]);
                bail!("{op}: {what} {:?} does not match {first_what} {:?}", a.dims(), first.dims());
            }
        }
    }
    let (out, shape) = op.fwd(args)?;
    Ok((CpuStorage::F32(out), shape))
}

/// A [`CpuOp`] as a candle custom op (`CustomOp1`, `CustomOp2` or `CustomOp3` by its arity).
pub(crate) struct Cpu<O>(pub(crate) O);

impl<O: CpuOp<1>> CustomOp1 for Cpu<O> {
    fn name(&self) -> &'static str {
        O::NAMES.op
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_fwd(&self.0, [(s, l)])
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [d] = self.0.bwd([arg], res, grad)?;
        Ok(d)
    }
}

impl<O: CpuOp<2>> CustomOp2 for Cpu<O> {
    fn name(&self) -> &'static str {
        O::NAMES.op
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_fwd(&self.0, [(s1, l1), (s2, l2)])
    }

    fn bwd(&self, a1: &Tensor, a2: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [d1, d2] = self.0.bwd([a1, a2], res, grad)?;
        Ok((d1, d2))
    }
}

impl<O: CpuOp<3>> CustomOp3 for Cpu<O> {
    fn name(&self) -> &'static str {
        O::NAMES.op
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_fwd(&self.0, [(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [d1, d2, d3] = self.0.bwd([a1, a2, a3], res, grad)?;
        Ok((d1, d2, d3))
    }
}

/// Rows of length `d` per rayon task of a row-wise kernel: enough work per task for short rows.
pub(crate) fn rows_per_task(d: usize) -> usize {
    (4096 / d.max(1)).max(1)
}

/// A row-wise kernel: `f(out_row, row)` for every row of length `d` of `x`, in parallel.
pub(crate) fn map_rows(x: &[f32], d: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    map_rows_indexed(x, d, |_, o, r| f(o, r))
}

/// [`map_rows`] for kernels that depend on where a row is (its position in a sequence): `f(index,
/// out_row, row)`, rows counted from 0.
pub(crate) fn map_rows_indexed(x: &[f32], d: usize, f: impl Fn(usize, &mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d)
        .with_min_len(rows_per_task(d))
        .zip(x.par_chunks(d))
        .enumerate()
        .for_each(|(i, (o, r))| f(i, o, r));
    out
}

/// A row-wise kernel on two inputs of one shape: `f(out_row, row_a, row_b)`, in parallel.
pub(crate) fn map_rows2(a: &[f32], b: &[f32], d: usize, f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) -> Vec<f32> {
    map_rows2_indexed(a, b, d, |_, o, ra, rb| f(o, ra, rb))
}

/// [`map_rows2`] with the row's index: `f(index, out_row, row_a, row_b)`.
pub(crate) fn map_rows2_indexed(
    a: &[f32],
    b: &[f32],
    d: usize,
    f: impl Fn(usize, &mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(d)
        .with_min_len(rows_per_task(d))
        .zip(a.par_chunks(d).zip(b.par_chunks(d)))
        .enumerate()
        .for_each(|(i, (o, (ra, rb)))| f(i, o, ra, rb));
    out
}

/// Elements per rayon task of the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// `f` of every element of `x`, in parallel.
pub(crate) fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, xs)| {
        for (o, &v) in o.iter_mut().zip(xs) {
            *o = f(v);
        }
    });
    out
}

/// `f` of every pair of elements of `a` and `b` (of one length), in parallel.
pub(crate) fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
        for ((o, &u), &v) in o.iter_mut().zip(a).zip(b) {
            *o = f(u, v);
        }
    });
    out
}
