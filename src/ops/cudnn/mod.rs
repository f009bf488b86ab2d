//! CUDA conv2d (NCHW, no bias, dilation 1, groups 1) as candle custom ops on cuDNN: forward
//! convolution, and a backward pass whose input gradient is cuDNN backward-data and whose weight
//! gradient is cuDNN backward-filter.
//!
//! candle's own `Tensor::conv2d` backward on CUDA computes the input gradient with its generic
//! `conv_transpose2d` kernel and the weight gradient as a batch-transposed convolution (two
//! transposing copies around a cuDNN forward call that re-picks its algorithm and allocates a
//! fresh workspace every time); together that made a ResNet-18 step on an H200 ~11x slower than
//! PyTorch. Here every direction is one cuDNN call.
//!
//! Data types: f32 (cuDNN's default math, which lets cuDNN use TF32 tensor cores on Ampere and
//! newer, as PyTorch does by default with `torch.backends.cudnn.allow_tf32`; run with
//! `NVIDIA_TF32_OVERRIDE=0` for strict fp32), bf16 and f16 (storage in 16 bits, accumulation in
//! f32: cuDNN has no true bf16 compute type, and PyTorch also uses a float compute type for f16).
//!
//! State, per thread and CUDA device (`cudnnHandle_t` is not thread-safe, so, like candle's own
//! cuDNN code, it lives in a thread-local; in this crate one thread drives a device):
//! - one cuDNN handle, created on first use and bound to the device's candle stream, so cuDNN
//!   work is ordered with candle's kernels without any synchronisation;
//! - one plan per (direction, dtype, shape): the descriptors and the algorithm, chosen once;
//! - one workspace buffer that only grows (to the largest workspace any plan has needed so far).

mod plan;

use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::result as cudnn_result;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::conv::Geom;
use plan::{grown_workspace, types_for, with_state, Algo, DeviceState, Plan, PlanKey};

/// Whether [`conv2d`] handles tensors of this dtype.
pub(crate) fn supports(dtype: DType) -> bool {
    types_for(dtype).is_some()
}

/// cuDNN convolution of `x` (B, Cin, H, W) with `w` (Cout, Cin, kh, kw), both on the same CUDA
/// device and of one supported dtype; differentiable w.r.t. both.
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let shape = ConvShape::new(x.dims(), w.dims(), stride, padding)?;
    if x.dtype() != w.dtype() || !supports(x.dtype()) {
        candle_core::bail!(
            "cudnn-conv2d: unsupported dtypes {:?} (input {:?}) and {:?} (weight {:?})",
            x.dtype(),
            x.dims(),
            w.dtype(),
            w.dims()
        );
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, CudnnConv { dir: Direction::Forward, shape })
}

/// Which cuDNN convolution call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Direction {
    /// y = conv(x, w); inputs (x, w).
    Forward,
    /// dx from (dy, w).
    BackwardData,
    /// dw from (x, dy).
    BackwardFilter,
}

/// A validated convolution geometry (the CPU path's, see `conv.rs`) whose every dimension and element
/// count also fits cuDNN's `int`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvShape(Geom);

impl ConvShape {
    pub(crate) fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        // The checks every conv2d path shares (ranks, empty tensors, channels, stride, fit) ...
        let s = Self(Geom::new(x, w, stride, pad)?);
        // ... and cuDNN's own: every dimension and element count fits an `int`.
        let limit = i32::MAX as usize;
        let too_big = [s.x_dims(), s.w_dims(), s.y_dims()]
            .iter()
            .any(|d| d.iter().try_fold(1usize, |acc, &v| acc.checked_mul(v)).is_none_or(|n| n > limit));
        if too_big || stride > limit || pad > limit {
            candle_core::bail!(
                "cudnn-conv2d: input {x:?}, weight {w:?}, stride {stride}, padding {pad} exceed cuDNN's 2^31-1 \
                 element limit"
            );
        }
        Ok(s)
    }
}

/// The geometry's dims, stride and padding.
impl std::ops::Deref for ConvShape {
    type Target = Geom;

    fn deref(&self) -> &Geom {
        &self.0
    }
}

impl std::fmt::Display for ConvShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "input {:?}, weight {:?}, output {:?}, stride {}, padding {}",
            self.x_dims(),
            self.w_dims(),
            self.y_dims(),
            self.stride,
            self.pad
        )
    }
}

impl Direction {
    pub(crate) fn op_name(self) -> &'static str {
        match self {
            Direction::Forward => "cudnn-conv2d",
            Direction::BackwardData => "cudnn-conv2d-bwd-data",
            Direction::BackwardFilter => "cudnn-conv2d-bwd-filter",
        }
    }

    /// The shapes of the op's two inputs and of its output.
    pub(crate) fn dims(self, s: &ConvShape) -> ([usize; 4], [usize; 4], [usize; 4]) {
        match self {
            Direction::Forward => (s.x_dims(), s.w_dims(), s.y_dims()),
            Direction::BackwardData => (s.y_dims(), s.w_dims(), s.x_dims()),
            Direction::BackwardFilter => (s.x_dims(), s.y_dims(), s.w_dims()),
        }
    }
}

/// The custom op: one struct for the three directions (only the forward one has a backward).
#[derive(Debug, Clone, Copy)]
struct CudnnConv {
    dir: Direction,
    shape: ConvShape,
}

impl CudnnConv {
    fn error(&self, what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("{}: {what} failed for {}: {e:?}", self.dir.op_name(), self.shape)).bt()
    }
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        self.dir.op_name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: CPU tensors are not supported ({})", self.dir.op_name(), self.shape)
    }

    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let (d1, d2, dout) = self.dir.dims(&self.shape);
        for (i, (l, d)) in [(l1, d1), (l2, d2)].into_iter().enumerate() {
            if l.dims() != d || !l.is_contiguous() {
                candle_core::bail!(
                    "{}: argument {} must be a contiguous {d:?} tensor, got shape {:?} (contiguous: {}) for {}",
                    self.dir.op_name(),
                    i + 1,
                    l.dims(),
                    l.is_contiguous(),
                    self.shape
                );
            }
        }
        let dev = s1.device();
        let (o1, o2) = (l1.start_offset(), l2.start_offset());
        let out = match (&s1.slice, &s2.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => self.launch(dev, DType::F32, a, o1, b, o2)?,
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => self.launch(dev, DType::BF16, a, o1, b, o2)?,
            (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => self.launch(dev, DType::F16, a, o1, b, o2)?,
            _ => candle_core::bail!(
                "{}: unsupported dtypes {:?} and {:?} for {} (f32, bf16 and f16 only, both the same)",
                self.dir.op_name(),
                s1.dtype(),
                s2.dtype(),
                self.shape
            ),
        };
        Ok((out, Shape::from(dout.to_vec())))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.dir != Direction::Forward {
            candle_core::bail!("{}: no backward pass ({})", self.dir.op_name(), self.shape);
        }
        let grad = grad.contiguous()?;
        let shape = self.shape;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &CudnnConv { dir: Direction::BackwardData, shape })?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &CudnnConv { dir: Direction::BackwardFilter, shape })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl CudnnConv {
    /// Runs the op's cuDNN call on `a` and `b` (contiguous, starting at the given element offsets)
    /// into a new tensor.
    fn launch<T: DeviceRepr + CudaDType>(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        a: &CudaSlice<T>,
        a_off: usize,
        b: &CudaSlice<T>,
        b_off: usize,
    ) -> Result<CudaStorage> {
        let (da, db, dout) = self.dir.dims(&self.shape);
        let numel = |d: [usize; 4]| d.iter().product::<usize>();
        for (i, (s, off, d)) in [(a, a_off, da), (b, b_off, db)].into_iter().enumerate() {
            if s.len() < off + numel(d) {
                candle_core::bail!(
                    "{}: argument {} holds {} elements from offset {off}, fewer than its shape {d:?} needs ({})",
                    self.dir.op_name(),
                    i + 1,
                    s.len().saturating_sub(off),
                    self.shape
                );
            }
        }
        let key = PlanKey { dir: self.dir, dtype, shape: self.shape };
        with_state(dev, |st| {
            let DeviceState { handle, stream, plans, workspace } = st;
            stream.context().bind_to_thread().map_err(|e| self.error("binding the CUDA context", e))?;
            let plan = match plans.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Plan::new(handle, key).map_err(|e| self.error("choosing an algorithm", e))?)
                }
            };
            let current = workspace.as_ref().map_or(0, |w| w.len());
            if let Some(bytes) = grown_workspace(current, plan.workspace) {
                // The old buffer is freed in stream order, after the calls that used it.
                *workspace = None;
                // SAFETY: scratch memory for cuDNN, which writes it before reading it.
                *workspace = Some(unsafe { dev.alloc::<u8>(bytes) }?);
            }
            // SAFETY: cuDNN writes every element of the output (beta = 0, so it is not read).
            let mut out = unsafe { dev.alloc::<T>(numel(dout)) }?;
            let (av, bv) = (a.slice(a_off..), b.slice(b_off..));
            let (pa, _ga) = av.device_ptr(stream);
            let (pb, _gb) = bv.device_ptr(stream);
            let (po, _go) = out.device_ptr_mut(stream);
            let (pws, ws_len, _gws) = match workspace.as_mut() {
                Some(ws) if plan.workspace > 0 => {
                    let len = ws.len();
                    let (p, g) = ws.device_ptr_mut(stream);
                    (p as *mut c_void, len, Some(g))
                }
                _ => (std::ptr::null_mut(), 0, None),
            };
            let (pa, pb, po) = (pa as *const c_void, pb as *const c_void, po as *mut c_void);
            // alpha/beta are f32 for f32, bf16 and f16 data (only f64 data takes f64 scalars).
            let (alpha, beta) = (1f32, 0f32);
            let (alpha, beta) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
            let h = handle.0;
            // SAFETY: the descriptors describe the contiguous buffers behind the pointers (shapes and
            // lengths checked above), the workspace holds `ws_len` >= `plan.workspace` bytes, and
            // everything is ordered on the handle's stream, which is candle's stream for `dev`.
            let status = unsafe {
                match plan.algo {
                    Algo::Forward(algo) => cudnn_result::convolution_forward(
                        h,
                        alpha,
                        plan.x.0,
                        pa,
                        plan.w.0,
                        pb,
                        plan.conv.0,
                        algo,
                        pws,
                        ws_len,
                        beta,
                        plan.y.0,
                        po,
                    ),
                    Algo::Data(algo) => cudnn_result::convolution_backward_data(
                        h,
                        alpha,
                        plan.w.0,
                        pb,
                        plan.y.0,
                        pa,
                        plan.conv.0,
                        algo,
                        pws,
                        ws_len,
                        beta,
                        plan.x.0,
                        po,
                    ),
                    Algo::Filter(algo) => cudnn_result::convolution_backward_filter(
                        h,
                        alpha,
                        plan.x.0,
                        pa,
                        plan.y.0,
                        pb,
                        plan.conv.0,
                        algo,
                        pws,
                        ws_len,
                        beta,
                        plan.w.0,
                        po,
                    ),
                }
            };
            status.map_err(|e| self.error(&format!("the cuDNN call ({:?}, {dtype:?})", plan.algo), e))?;
            drop((_ga, _gb, _go, _gws));
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::plan::*;
    use super::*;
    use candle_core::cuda_backend::cudarc::cudnn::sys;
    use std::collections::HashSet;

    #[test]
    fn shape_arithmetic() {
        // ResNet-18 downsampling 3x3 stride 2 pad 1 on an odd size, and the 1x1 stride-2 shortcut.
        let s = ConvShape::new(&[1, 64, 33, 17], &[128, 64, 3, 3], 2, 1).unwrap();
        assert_eq!(s.y_dims(), [1, 128, 17, 9]);
        let s = ConvShape::new(&[4, 64, 33, 17], &[128, 64, 1, 1], 2, 0).unwrap();
        assert_eq!(s.y_dims(), [4, 128, 17, 9]);
        // Kernel exactly covering the padded input.
        let s = ConvShape::new(&[2, 3, 1, 1], &[5, 3, 3, 3], 1, 1).unwrap();
        assert_eq!(s.y_dims(), [2, 5, 1, 1]);
        assert_eq!(c_dims(s.w_dims()), [5, 3, 3, 3]);
    }

    #[test]
    fn direction_shapes() {
        let s = ConvShape::new(&[8, 16, 10, 12], &[32, 16, 3, 3], 2, 1).unwrap();
        let (x, w, y) = (s.x_dims(), s.w_dims(), s.y_dims());
        assert_eq!(y, [8, 32, 5, 6]);
        assert_eq!(Direction::Forward.dims(&s), (x, w, y));
        assert_eq!(Direction::BackwardData.dims(&s), (y, w, x));
        assert_eq!(Direction::BackwardFilter.dims(&s), (x, y, w));
        let names: HashSet<_> =
            [Direction::Forward, Direction::BackwardData, Direction::BackwardFilter].map(|d| d.op_name()).into();
        assert_eq!(names.len(), 3);
    }

    #[test]
    fn invalid_shapes_are_errors_naming_the_shapes() {
        let err = |x: &[usize], w: &[usize], s, p| ConvShape::new(x, w, s, p).unwrap_err().to_string();
        assert!(err(&[1, 3, 8], &[4, 3, 3, 3], 1, 0).contains("[1, 3, 8]"));
        assert!(err(&[1, 3, 8, 8], &[4, 3, 3], 1, 0).contains("[4, 3, 3]"));
        assert!(err(&[1, 3, 8, 8], &[4, 2, 3, 3], 1, 0).contains("channels"));
        assert!(err(&[1, 3, 8, 8], &[4, 3, 3, 3], 0, 0).contains("stride"));
        assert!(err(&[1, 3, 2, 8], &[4, 3, 5, 3], 1, 1).contains("does not fit"));
        assert!(err(&[0, 3, 8, 8], &[4, 3, 3, 3], 1, 0).contains("empty"));
        // 2^31 elements in the input: beyond cuDNN's int-sized descriptors.
        let e = err(&[1 << 11, 1 << 10, 32, 32], &[1, 1 << 10, 1, 1], 1, 0);
        assert!(e.contains("2^31") && e.contains("[2048, 1024, 32, 32]"), "{e}");
        assert!(ConvShape::new(&[1 << 10, 1 << 10, 32, 32], &[1, 1 << 10, 1, 1], 1, 0).is_ok());
    }

    #[test]
    fn plan_keys_distinguish_direction_dtype_and_geometry() {
        let s = ConvShape::new(&[8, 16, 10, 12], &[32, 16, 3, 3], 2, 1).unwrap();
        let mut keys = HashSet::new();
        for dir in [Direction::Forward, Direction::BackwardData, Direction::BackwardFilter] {
            for dtype in [DType::F32, DType::BF16] {
                for shape in [
                    s,
                    ConvShape::new(&[8, 16, 10, 12], &[32, 16, 3, 3], 2, 0).unwrap(),
                    ConvShape::new(&[8, 16, 10, 12], &[32, 16, 3, 3], 1, 1).unwrap(),
                    ConvShape::new(&[8, 16, 11, 12], &[32, 16, 3, 3], 2, 1).unwrap(),
                    ConvShape::new(&[7, 16, 10, 12], &[32, 16, 3, 3], 2, 1).unwrap(),
                ] {
                    assert!(keys.insert(PlanKey { dir, dtype, shape }));
                }
            }
        }
        // The same call maps to the same key.
        let again = ConvShape::new(&[8, 16, 10, 12], &[32, 16, 3, 3], 2, 1).unwrap();
        assert!(keys.contains(&PlanKey { dir: Direction::Forward, dtype: DType::F32, shape: again }));
    }

    #[test]
    fn dtype_mapping() {
        use sys::cudnnDataType_t as D;
        use sys::cudnnMathType_t as M;
        let f32t = types_for(DType::F32).unwrap();
        assert_eq!(
            (f32t.data, f32t.compute, f32t.math),
            (D::CUDNN_DATA_FLOAT, D::CUDNN_DATA_FLOAT, M::CUDNN_DEFAULT_MATH)
        );
        let bf = types_for(DType::BF16).unwrap();
        assert_eq!(
            (bf.data, bf.compute, bf.math),
            (D::CUDNN_DATA_BFLOAT16, D::CUDNN_DATA_FLOAT, M::CUDNN_TENSOR_OP_MATH)
        );
        assert_eq!(types_for(DType::F16).unwrap().data, D::CUDNN_DATA_HALF);
        assert!(supports(DType::F32) && supports(DType::BF16) && supports(DType::F16));
        assert!(!supports(DType::F64) && !supports(DType::U32) && !supports(DType::U8));
    }

    #[test]
    fn algorithm_choice() {
        let cap = 100;
        // First usable within the cap, in the heuristics' order.
        assert_eq!(choose_algorithm(&[(false, 0), (true, 50), (true, 0)], cap), Some(1));
        assert_eq!(choose_algorithm(&[(true, 500), (true, 100), (true, 0)], cap), Some(1));
        // None within the cap: the usable one needing the least workspace.
        assert_eq!(choose_algorithm(&[(true, 500), (false, 0), (true, 300)], cap), Some(2));
        assert_eq!(choose_algorithm(&[(false, 0), (false, 0)], cap), None);
        assert_eq!(choose_algorithm(&[], cap), None);
    }

    #[test]
    fn workspace_only_grows_in_granules() {
        let g = WORKSPACE_GRANULE_BYTES;
        assert_eq!(grown_workspace(0, 0), None);
        assert_eq!(grown_workspace(0, 1), Some(g));
        assert_eq!(grown_workspace(g, g), None);
        assert_eq!(grown_workspace(g, 10), None);
        assert_eq!(grown_workspace(g, g + 1), Some(2 * g));
        assert_eq!(grown_workspace(3 * g, 2 * g + 5), None);
    }
}
