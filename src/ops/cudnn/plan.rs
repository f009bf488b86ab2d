//! The cuDNN state behind the conv2d ops: per thread and device a handle bound to candle's stream, one
//! plan (descriptors and algorithm, chosen once by cuDNN's heuristics) per direction, dtype and shape, and
//! one workspace that only grows.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cudnn::{result as cudnn_result, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::cuda_backend::DeviceId;
use candle_core::{CudaDevice, DType, Result};

use super::{ConvShape, Direction};

/// Workspace an algorithm may need to be picked without a fallback: the heuristics rank
/// algorithms by expected speed only, and some (FFT) want several GiB for large layers.
pub(super) const WORKSPACE_CAP_BYTES: usize = 1 << 30;

/// Workspace allocations are rounded up to this, so a run of slightly larger requests does not
/// reallocate each time.
pub(super) const WORKSPACE_GRANULE_BYTES: usize = 1 << 20;

/// A plan's cache key: an algorithm is chosen once per direction, dtype and geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PlanKey {
    pub(crate) dir: Direction,
    pub(crate) dtype: DType,
    pub(crate) shape: ConvShape,
}

/// cuDNN types of one candle dtype: tensor data type, convolution compute type, and the math type
/// the algorithm query starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CudnnTypes {
    pub(crate) data: sys::cudnnDataType_t,
    pub(crate) compute: sys::cudnnDataType_t,
    pub(crate) math: sys::cudnnMathType_t,
}

pub(crate) fn types_for(dtype: DType) -> Option<CudnnTypes> {
    use sys::cudnnDataType_t as D;
    use sys::cudnnMathType_t as M;
    let (data, math) = match dtype {
        // DEFAULT_MATH on f32 permits TF32 tensor cores (Ampere+), as PyTorch's default does.
        DType::F32 => (D::CUDNN_DATA_FLOAT, M::CUDNN_DEFAULT_MATH),
        // Only the "pseudo" 16-bit configurations (16-bit storage, f32 accumulation) are used.
        DType::BF16 => (D::CUDNN_DATA_BFLOAT16, M::CUDNN_TENSOR_OP_MATH),
        DType::F16 => (D::CUDNN_DATA_HALF, M::CUDNN_TENSOR_OP_MATH),
        _ => return None,
    };
    Some(CudnnTypes { data, compute: D::CUDNN_DATA_FLOAT, math })
}

/// Descriptor dimensions as cuDNN's `int`s (in range: [`ConvShape::new`] checked them).
pub(super) fn c_dims(d: [usize; 4]) -> [i32; 4] {
    d.map(|v| v as i32)
}

/// Algorithm policy: `cudnnGet*Algorithm_v7` heuristics, not `cudnnFind*` benchmarking. The
/// heuristics cost no trial runs, no host synchronisation and no large trial workspaces (which
/// would distort the per-worker GPU memory this crate measures), and pick the same algorithm on
/// every run for a given GPU and cuDNN version, so runs stay comparable; PyTorch's default
/// (`torch.backends.cudnn.benchmark = False`) uses the same heuristics. Given the candidates the
/// heuristics return, best first, as (usable, workspace bytes): the first usable one whose
/// workspace is at most `cap`, else the usable one with the smallest workspace.
pub(crate) fn choose_algorithm(candidates: &[(bool, usize)], cap: usize) -> Option<usize> {
    let usable = || candidates.iter().enumerate().filter(|(_, c)| c.0);
    usable().find(|(_, c)| c.1 <= cap).or_else(|| usable().min_by_key(|(_, c)| c.1)).map(|(i, _)| i)
}

/// The new size of a workspace of `current` bytes when a call needs `need` bytes: `None` if it is
/// already large enough, else `need` rounded up to [`WORKSPACE_GRANULE_BYTES`].
pub(crate) fn grown_workspace(current: usize, need: usize) -> Option<usize> {
    (need > current).then(|| need.div_ceil(WORKSPACE_GRANULE_BYTES) * WORKSPACE_GRANULE_BYTES)
}

/// The per-thread, per-device cuDNN state.
pub(super) struct DeviceState {
    pub(super) handle: Handle,
    pub(super) stream: Arc<CudaStream>,
    pub(super) plans: HashMap<PlanKey, Plan>,
    pub(super) workspace: Option<CudaSlice<u8>>,
}

thread_local! {
    static STATE: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

pub(super) fn with_state<R>(dev: &CudaDevice, f: impl FnOnce(&mut DeviceState) -> Result<R>) -> Result<R> {
    STATE.with(|cell| {
        let mut map = cell.borrow_mut();
        let st = match map.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let stream = dev.cuda_stream();
                stream.context().bind_to_thread().map_err(|err| {
                    candle_core::Error::Msg(format!("cudnn-conv2d: binding the CUDA context: {err:?}"))
                })?;
                let handle = Handle::new(&stream).map_err(|err| {
                    candle_core::Error::Msg(format!("cudnn-conv2d: creating a cuDNN handle: {err:?}"))
                })?;
                e.insert(DeviceState { handle, stream, plans: HashMap::new(), workspace: None })
            }
        };
        f(st)
    })
}

/// An owned cuDNN handle bound to one stream.
pub(super) struct Handle(pub(super) sys::cudnnHandle_t);

impl Handle {
    fn new(stream: &CudaStream) -> std::result::Result<Self, cudnn_result::CudnnError> {
        let h = Handle(cudnn_result::create_handle()?);
        // SAFETY: a live handle and a live stream; the stream outlives the handle (DeviceState holds both).
        unsafe { cudnn_result::set_stream(h.0, stream.cu_stream() as sys::cudaStream_t) }?;
        Ok(h)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and destroyed once; an error at teardown is ignored.
        let _ = unsafe { cudnn_result::destroy_handle(self.0) };
    }
}

macro_rules! descriptor {
    ($name:ident, $raw:ty, $create:ident, $destroy:ident) => {
        pub(super) struct $name(pub(super) $raw);
        impl $name {
            fn create() -> std::result::Result<Self, cudnn_result::CudnnError> {
                Ok(Self(cudnn_result::$create()?))
            }
        }
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: created by the matching create call and destroyed once.
                let _ = unsafe { cudnn_result::$destroy(self.0) };
            }
        }
    };
}
descriptor!(TensorDesc, sys::cudnnTensorDescriptor_t, create_tensor_descriptor, destroy_tensor_descriptor);
descriptor!(FilterDesc, sys::cudnnFilterDescriptor_t, create_filter_descriptor, destroy_filter_descriptor);
descriptor!(ConvDesc, sys::cudnnConvolutionDescriptor_t, create_convolution_descriptor, destroy_convolution_descriptor);

#[derive(Debug, Clone, Copy)]
pub(super) enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// Descriptors and algorithm of one [`PlanKey`]. `x`, `w` and `y` describe the forward
/// convolution's input, weight and output whatever the direction (in backward-data `x` is dx
/// and `y` is dy; in backward-filter `w` is dw and `y` is dy).
pub(super) struct Plan {
    pub(super) x: TensorDesc,
    pub(super) w: FilterDesc,
    pub(super) y: TensorDesc,
    pub(super) conv: ConvDesc,
    pub(super) algo: Algo,
    pub(super) workspace: usize,
}

const FWD_ALGOS: usize = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
const DATA_ALGOS: usize = sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as usize;
const FILTER_ALGOS: usize = sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as usize;

/// `Err(CUDNN_STATUS_NOT_SUPPORTED)` for "the heuristics offered no usable algorithm".
fn not_supported() -> cudnn_result::CudnnError {
    cudnn_result::CudnnError(sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED)
}

/// The index [`choose_algorithm`] picks among the `n` returned perf results.
macro_rules! pick {
    ($perf:expr, $n:expr) => {{
        let n = ($n.max(0) as usize).min($perf.len());
        let candidates: Vec<(bool, usize)> =
            $perf[..n].iter().map(|p| (p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS, p.memory)).collect();
        let i = choose_algorithm(&candidates, WORKSPACE_CAP_BYTES).ok_or_else(not_supported)?;
        (&$perf[i]).clone()
    }};
}

impl Plan {
    pub(super) fn new(handle: &Handle, key: PlanKey) -> std::result::Result<Self, cudnn_result::CudnnError> {
        use sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW as NCHW;
        let t = types_for(key.dtype).ok_or_else(not_supported)?;
        let s = &key.shape;
        let (x, w, y, conv) =
            (TensorDesc::create()?, FilterDesc::create()?, TensorDesc::create()?, ConvDesc::create()?);
        let (p, st) = (s.pad as i32, s.stride as i32);
        // SAFETY: freshly created descriptors; the dims were range-checked by ConvShape::new.
        unsafe {
            cudnn_result::set_tensor4d_descriptor(x.0, NCHW, t.data, c_dims(s.x_dims()))?;
            cudnn_result::set_filter4d_descriptor(w.0, t.data, NCHW, c_dims(s.w_dims()))?;
            cudnn_result::set_tensor4d_descriptor(y.0, NCHW, t.data, c_dims(s.y_dims()))?;
            cudnn_result::set_convolution2d_descriptor(
                conv.0,
                p,
                p,
                st,
                st,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                t.compute,
            )?;
            cudnn_result::set_convolution_math_type(conv.0, t.math)?;
        }
        let h = handle.0;
        let mut n = 0i32;
        // SAFETY (all three arms): live handle and descriptors, perf arrays of the requested length;
        // the chosen perf result's math type is set on the descriptor before the workspace query
        // (as PyTorch does), since the algorithm's workspace and validity depend on it.
        let (algo, workspace) = unsafe {
            match key.dir {
                Direction::Forward => {
                    let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>(); FWD_ALGOS];
                    cudnn_result::get_convolution_forward_algorithm(
                        h,
                        x.0,
                        w.0,
                        conv.0,
                        y.0,
                        FWD_ALGOS as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                    )?;
                    let best = pick!(perf, n);
                    cudnn_result::set_convolution_math_type(conv.0, best.mathType)?;
                    let ws = cudnn_result::get_convolution_forward_workspace_size(h, x.0, w.0, conv.0, y.0, best.algo)?;
                    (Algo::Forward(best.algo), ws)
                }
                Direction::BackwardData => {
                    let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>(); DATA_ALGOS];
                    cudnn_result::get_convolution_backward_data_algorithm(
                        h,
                        w.0,
                        y.0,
                        conv.0,
                        x.0,
                        DATA_ALGOS as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                    )?;
                    let best = pick!(perf, n);
                    cudnn_result::set_convolution_math_type(conv.0, best.mathType)?;
                    let ws = cudnn_result::get_convolution_backward_data_workspace_size(
                        h, w.0, y.0, conv.0, x.0, best.algo,
                    )?;
                    (Algo::Data(best.algo), ws)
                }
                Direction::BackwardFilter => {
                    let mut perf = [std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>(); FILTER_ALGOS];
                    cudnn_result::get_convolution_backward_filter_algorithm(
                        h,
                        x.0,
                        y.0,
                        conv.0,
                        w.0,
                        FILTER_ALGOS as i32,
                        &mut n,
                        perf.as_mut_ptr(),
                    )?;
                    let best = pick!(perf, n);
                    cudnn_result::set_convolution_math_type(conv.0, best.mathType)?;
                    let ws = cudnn_result::get_convolution_backward_filter_workspace_size(
                        h, x.0, y.0, conv.0, w.0, best.algo,
                    )?;
                    (Algo::Filter(best.algo), ws)
                }
            }
        };
        Ok(Plan { x, w, y, conv, algo, workspace })
    }
}
