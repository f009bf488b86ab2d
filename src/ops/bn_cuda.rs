//! Batch norm in training mode on CUDA: the same custom-op structure, semantics and return values as
//! the CPU path of `batchnorm.rs`, with the kernels of `kernels/batchnorm.cu` (compiled to PTX by
//! build.rs, loaded once per device through candle's `get_or_load_custom_func`, launched on candle's
//! stream).
//!
//! - [`Stats`]: x -> (3, C) rows mean, biased variance, 1/sqrt(var + eps), in one pass over x (a
//!   (C, P) grid of shifted-sum partials, combined in f64 per channel). Nothing is copied to the
//!   host: the statistics stay on the device and later ops read them from there.
//! - [`Fwd`]: (x, gamma, beta) or (x, [gamma; beta], residual) -> y = act(scale * bn(x) + residual),
//!   one elementwise pass.
//! - Backward: [`BwdReduce`] (x, dy, y) -> (6, C) rows dgamma, dbeta and the coefficients of the
//!   closed-form dx (one pass over x, dy and y, reduced like the statistics), then [`BwdDx`] (x, dy, y)
//!   -> dx, and with a residual and a ReLU also the masked dy (the residual's gradient) from the same
//!   pass.
//!
//! Activations (x, y, residual, dx) are f32, bf16 or f16; statistics, sums and coefficients are f32
//! (f64 where partial sums are combined). gamma and beta are converted to f32 first, so their
//! gradients come back in their own dtype through candle's `to_dtype` backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

use super::batchnorm::{Epilogue, TrainOutput};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/batchnorm.ptx"));
const MODULE: &str = "sdp-batchnorm";

/// Threads per block of every kernel.
pub(crate) const THREADS: u32 = 256;
/// A reduction block sums at least this many values of its channel (8 per thread)...
const MIN_CHUNK: u64 = 2048;
/// ... and a reduction launches up to about this many blocks, enough to fill an H100/H200 several
/// times over when the channels alone (C blocks) would not.
const TARGET_BLOCKS: u64 = 1024;
/// Largest grid of the elementwise kernels (grid-stride loops beyond): 8 blocks of 256 threads per SM
/// on 132 SMs is one full wave, twice that hides the tail.
const MAX_ELEMENTWISE_BLOCKS: u64 = 2112;

/// Whether the CUDA kernels handle these dtypes: x f32, bf16 or f16; gamma and beta f32 or x's dtype.
pub(crate) fn supports(x: DType, gamma: DType, beta: DType) -> bool {
    matches!(x, DType::F32 | DType::BF16 | DType::F16) && [gamma, beta].iter().all(|&d| d == DType::F32 || d == x)
}

/// How a per-channel reduction over N values is split: (P, chunk), block (c, p) summing values
/// [p * chunk, min(N, (p + 1) * chunk)) of channel c. Every value is in exactly one block, no block is
/// empty, and P fits a grid's y dimension.
pub(crate) fn reduce_partition(c: usize, n: usize) -> (u32, u64) {
    let n = (n as u64).max(1);
    let want = TARGET_BLOCKS.div_ceil(c.max(1) as u64).max(1);
    let parts = n.div_ceil(MIN_CHUNK).min(want).clamp(1, 65_535);
    let chunk = n.div_ceil(parts);
    (n.div_ceil(chunk) as u32, chunk)
}

/// Grid size of an elementwise kernel over `e` values (grid-stride loops cover the rest).
pub(crate) fn elementwise_blocks(e: usize) -> u32 {
    (e as u64).div_ceil(THREADS as u64).clamp(1, MAX_ELEMENTWISE_BLOCKS) as u32
}

/// Validated (B, C, S) of a (B, C, H, W) or (B, C) input, with C and S fitting the kernels' u32
/// indices and C the reduction grid's x dimension.
pub(crate) fn dims3(op: &str, dims: &[usize]) -> Result<(usize, usize, usize)> {
    let (b, c, s) = match *dims {
        [b, c] => (b, c, 1),
        [b, c, h, w] => (b, c, h * w),
        _ => bail!("{op}: input must be (B, C, H, W) or (B, C), got shape {dims:?}"),
    };
    if b == 0 || c == 0 || s == 0 {
        bail!("{op}: empty input of shape {dims:?}");
    }
    if c > i32::MAX as usize || s > u32::MAX as usize {
        bail!("{op}: shape {dims:?} too large for the CUDA kernels (C < 2^31 and H*W < 2^32 needed)");
    }
    Ok((b, c, s))
}

fn grid(grid_dim: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig { grid_dim, block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The launch of an elementwise kernel over `e` values.
fn elementwise_grid(e: usize) -> LaunchConfig {
    grid((elementwise_blocks(e), 1, 1))
}

/// The launch of a partial-sum kernel: block (c, p) reduces part p of channel c ([`reduce_partition`]).
fn reduce_grid(c: u32, parts: u32) -> LaunchConfig {
    grid((c, parts, 1))
}

/// The launch of a finalize kernel: one thread per channel.
fn per_channel_grid(c: usize) -> LaunchConfig {
    grid((c.div_ceil(THREADS as usize) as u32, 1, 1))
}

fn kernel_suffix(op: &str, dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("{op}: unsupported dtype {d:?} (f32, bf16 and f16 only)"),
    })
}

/// The contiguous elements of one custom-op argument, checked against the expected count.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, len: usize, op: &str, what: &str) -> Result<CudaView<'a, T>> {
    let slice: &CudaSlice<T> = s
        .as_cuda_slice::<T>()
        .map_err(|e| candle_core::Error::Msg(format!("{op}: {what} has dtype {:?}: {e}", s.dtype())))?;
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: {what} must be contiguous, got shape {:?} with strides {:?}", l.dims(), l.stride());
    };
    if end - start != len || end > slice.len() {
        bail!(
            "{op}: {what} has {} elements (shape {:?}, storage {} from offset {start}), expected {len}",
            end - start,
            l.dims(),
            slice.len()
        );
    }
    Ok(slice.slice(start..end))
}

/// Runs `f` on the CUDA storage of a tensor held by an op (the statistics, gamma, coefficients).
fn with_storage<R>(t: &Tensor, op: &str, what: &str, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(s, layout),
        _ => bail!("{op}: {what} must be on a CUDA device, got {:?}", t.device()),
    }
}

fn launch_err(op: &str, kernel: &str, detail: String, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: launching {kernel} failed for {detail}: {e:?}")).bt()
}

fn cpu_unsupported(op: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{op}: CPU tensors are not supported (the CPU path is in batchnorm.rs)")
}

/// A CUDA-only custom op of this file on `N` inputs; [`Cuda`] runs it as a candle custom op.
trait CudaOp<const N: usize>: Send + Sync {
    fn name(&self) -> &'static str;

    /// Launches the op's kernels for activations of element type `T`, named by `_x` (the first
    /// argument's slice; so the half types need no `half` dependency), whose kernel names end in `sfx`.
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        _x: &CudaSlice<T>,
        args: [(&CudaStorage, &Layout); N],
        sfx: &str,
    ) -> Result<(CudaStorage, Shape)>;

    /// The arguments' gradients (candle's `bwd`); ops run through `apply_op*_no_bwd` keep the default.
    fn bwd(&self, _args: [&Tensor; N], _res: &Tensor, _grad: &Tensor) -> Result<[Option<Tensor>; N]> {
        Err(candle_core::Error::BackwardNotSupported { op: self.name() })
    }
}

/// Picks the kernels' element type from the first argument's dtype and runs `op` with it.
fn cuda_fwd<O: CudaOp<N>, const N: usize>(op: &O, args: [(&CudaStorage, &Layout); N]) -> Result<(CudaStorage, Shape)> {
    let s = args[0].0;
    let sfx = kernel_suffix(op.name(), s.dtype())?;
    match &s.slice {
        CudaStorageSlice::F32(v) => op.run(v, args, sfx),
        CudaStorageSlice::BF16(v) => op.run(v, args, sfx),
        CudaStorageSlice::F16(v) => op.run(v, args, sfx),
        _ => unreachable!("kernel_suffix accepted the dtype"),
    }
}

/// A [`CudaOp`] as a candle custom op (`CustomOp1` or `CustomOp3` by its arity).
struct Cuda<O>(O);

impl<O: CudaOp<1>> CustomOp1 for Cuda<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda_fwd(&self.0, [(s, l)])
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [d] = self.0.bwd([arg], res, grad)?;
        Ok(d)
    }
}

impl<O: CudaOp<3>> CustomOp3 for Cuda<O> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unsupported(self.name())
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        cuda_fwd(&self.0, [(s1, l1), (s2, l2), (s3, l3)])
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

/// Entry point of the CUDA path: x f32/bf16/f16 on a CUDA device, shapes already checked.
pub(crate) fn train_cuda(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64, epi: &Epilogue) -> Result<TrainOutput> {
    let x = x.contiguous()?;
    let gamma = gamma.to_dtype(DType::F32)?.contiguous()?;
    let beta = beta.to_dtype(DType::F32)?.contiguous()?;
    let stats = x.apply_op1_no_bwd(&Cuda(Stats { eps }))?; // (3, C): mean, var, invstd
    let fwd = Fwd { stats: stats.clone(), scale: epi.scale as f32, relu: epi.relu, residual: false };
    let y = epi.apply_train_op(&x, &gamma, &beta, Cuda(fwd), |Cuda(f)| Cuda(Fwd { residual: true, ..f }))?;
    Ok((y, stats.get(0)?, stats.get(1)?))
}

/// x (B, C, ...) -> (3, C) f32: mean, biased variance, 1/sqrt(var + eps).
struct Stats {
    eps: f64,
}

impl CudaOp<1> for Stats {
    fn name(&self) -> &'static str {
        "sdp-bn-stats-cuda"
    }

    fn run<T: CudaDType + DeviceRepr>(
        &self,
        _x: &CudaSlice<T>,
        [(s, l)]: [(&CudaStorage, &Layout); 1],
        sfx: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (b, c, sp) = dims3(op, l.dims())?;
        let (n, e) = (b * sp, b * c * sp);
        let x = view::<T>(s, l, e, op, "input")?;
        let dev: &CudaDevice = &s.device;
        let (parts, chunk) = reduce_partition(c, n);
        let detail = format!("input {:?} ({:?})", l.dims(), s.dtype());
        // SAFETY: uninitialised device memory, never read before written: block (c, p) of the partial
        // kernel writes its three partials, and the finalize kernel writes all 3C statistics.
        let mut partial = unsafe { dev.alloc::<f64>(c * parts as usize * 3)? };
        // SAFETY: as above, written whole by the finalize kernel.
        let mut stats = unsafe { dev.alloc::<f32>(3 * c)? };
        let (c32, s32, n64, eps) = (c as u32, sp as u32, n as u64, self.eps);
        let name = format!("bn_stats_partial_{sfx}");
        let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut a = f.builder();
        a.arg(&x).arg(&c32).arg(&s32).arg(&n64).arg(&chunk).arg(&mut partial);
        // SAFETY: the arguments match `bn_stats_partial_*` in kernels/batchnorm.cu in order and type; x holds
        // the B*C*S elements it reads (checked by `view`) and `partial` the C*P*3 it writes.
        unsafe { a.launch(reduce_grid(c32, parts)) }.map_err(|e| launch_err(op, &name, detail.clone(), e))?;
        let f = dev.get_or_load_custom_func("bn_stats_finalize", MODULE, PTX)?;
        let mut a = f.builder();
        a.arg(&partial).arg(&c32).arg(&parts).arg(&n64).arg(&eps).arg(&mut stats);
        // SAFETY: the arguments match `bn_stats_finalize`; it reads the C*P*3 partials and writes 3C values.
        unsafe { a.launch(per_channel_grid(c)) }.map_err(|e| launch_err(op, "bn_stats_finalize", detail, e))?;
        Ok((CudaStorage::wrap_cuda_slice(stats, dev.clone()), Shape::from((3, c))))
    }
}

/// (x, gamma, beta) -> y = act(scale * bn(x)), or with `residual` (x, [gamma; beta], r) ->
/// act(scale * bn(x) + r); the batch statistics are the (3, C) output of [`Stats`].
struct Fwd {
    stats: Tensor,
    scale: f32,
    relu: bool,
    residual: bool,
}

impl CudaOp<3> for Fwd {
    fn name(&self) -> &'static str {
        if self.residual {
            "sdp-batch-norm-train-residual-cuda"
        } else {
            "sdp-batch-norm-train-cuda"
        }
    }

    fn bwd(
        &self,
        [x, gamma_or_gb, _beta_or_r]: [&Tensor; 3],
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let g = Grads { stats: &self.stats, scale: self.scale, relu: self.relu };
        if self.residual {
            let c = gamma_or_gb.dim(0)? / 2;
            let (dx, coef, dz) = g.backward(x, &gamma_or_gb.narrow(0, 0, c)?, grad, y, true)?;
            // Rows 0 and 1 of the coefficients are dgamma and dbeta: the (2C) gradient of [gamma; beta].
            let dgb = coef.narrow(0, 0, 2)?.flatten_all()?;
            Ok([dx, Some(dgb), dz])
        } else {
            let (dx, coef, _) = g.backward(x, gamma_or_gb, grad, y, false)?;
            Ok([dx, Some(coef.get(0)?), Some(coef.get(1)?)])
        }
    }

    fn run<T: CudaDType + DeviceRepr>(
        &self,
        _x: &CudaSlice<T>,
        args: [(&CudaStorage, &Layout); 3],
        sfx: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let [(s1, l1), (s2, l2), (s3, l3)] = args;
        let (b, c, sp) = dims3(op, l1.dims())?;
        let e = b * c * sp;
        let x = view::<T>(s1, l1, e, op, "input")?;
        let (gamma, beta, r) = if self.residual {
            let gb = view::<f32>(s2, l2, 2 * c, op, "gamma/beta")?;
            if l3.dims() != l1.dims() {
                bail!("{op}: residual {:?} does not match input {:?}", l3.dims(), l1.dims());
            }
            (gb.slice(..c), gb.slice(c..), view::<T>(s3, l3, e, op, "residual")?)
        } else {
            let gamma = view::<f32>(s2, l2, c, op, "gamma")?;
            let beta = view::<f32>(s3, l3, c, op, "beta")?;
            (gamma, beta, x.slice(..)) // r unused: x stands in for it
        };
        let dev: &CudaDevice = &s1.device;
        // SAFETY: uninitialised, never read before written: the elementwise kernel writes all e outputs.
        let mut y = unsafe { dev.alloc::<T>(e)? };
        let detail = format!("input {:?} ({:?})", l1.dims(), s1.dtype());
        let name = format!("bn_fwd_{sfx}");
        with_storage(&self.stats, op, "statistics", |ss, sl| {
            let stats = view::<f32>(ss, sl, 3 * c, op, "statistics")?;
            let (c32, s32, e64) = (c as u32, sp as u32, e as u64);
            let (has_r, relu) = (self.residual as i32, self.relu as i32);
            let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut a = f.builder();
            a.arg(&x).arg(&gamma).arg(&beta).arg(&stats).arg(&r);
            a.arg(&c32).arg(&s32).arg(&e64).arg(&self.scale).arg(&has_r).arg(&relu).arg(&mut y);
            // SAFETY: the arguments match `bn_fwd_*` in order and type; x, r and y hold e elements, gamma,
            // beta C and the statistics 3C (each checked by `view`); r is read only when has_r is set.
            unsafe { a.launch(elementwise_grid(e)) }.map_err(|err| launch_err(op, &name, detail, err))?;
            Ok(())
        })?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), l1.shape().clone()))
    }
}

/// The backward pass shared by both forward ops.
struct Grads<'a> {
    stats: &'a Tensor,
    scale: f32,
    relu: bool,
}

impl Grads<'_> {
    /// (dx if x is tracked, the (6, C) coefficients whose rows 0 and 1 are dgamma and dbeta, the
    /// residual's gradient when `residual`) for the output gradient `dy` of the output `y`.
    fn backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        dy: &Tensor,
        y: &Tensor,
        residual: bool,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let y = y.contiguous()?;
        let reduce =
            BwdReduce { stats: self.stats.clone(), gamma: gamma.contiguous()?, scale: self.scale, relu: self.relu };
        let coef = x.apply_op3_no_bwd(&dy, &y, &Cuda(reduce))?;
        let write_dx = x.track_op();
        // Without a ReLU the residual's gradient is dy itself; with one, dy masked by y > 0, written by
        // the dx pass.
        let write_dz = residual && self.relu;
        let mut dz = (residual && !self.relu).then(|| dy.clone());
        let mut dx = None;
        if write_dx || write_dz {
            let kernel = BwdDx { coef: coef.clone(), scale: self.scale, relu: self.relu, write_dx, write_dz };
            let out = x.apply_op3_no_bwd(&dy, &y, &Cuda(kernel))?;
            match (write_dx, write_dz) {
                (true, true) => {
                    dx = Some(out.get(0)?);
                    dz = Some(out.get(1)?);
                }
                (true, false) => dx = Some(out),
                _ => dz = Some(out),
            }
        }
        Ok((dx, coef, dz))
    }
}

/// (x, dy, y) -> (6, C) f32 rows dgamma, dbeta, a, c1, c0, mean (dx = a*dy' + c1*(x - mean) + c0,
/// dy' = scale * dy * [y > 0 if relu]).
struct BwdReduce {
    stats: Tensor,
    gamma: Tensor,
    scale: f32,
    relu: bool,
}

/// The (B, C, S) dims of a backward op's inputs (x, dy, y), which must match.
fn backward_dims(op: &str, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, usize, usize)> {
    if l2.dims() != l1.dims() || l3.dims() != l1.dims() {
        bail!("{op}: output gradient {:?} / output {:?} do not match input {:?}", l2.dims(), l3.dims(), l1.dims());
    }
    dims3(op, l1.dims())
}

impl CudaOp<3> for BwdReduce {
    fn name(&self) -> &'static str {
        "sdp-batch-norm-backward-reduce-cuda"
    }

    fn run<T: CudaDType + DeviceRepr>(
        &self,
        _x: &CudaSlice<T>,
        args: [(&CudaStorage, &Layout); 3],
        sfx: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let [(s1, l1), (s2, l2), (s3, l3)] = args;
        let (b, c, sp) = backward_dims(op, l1, l2, l3)?;
        let (n, e) = (b * sp, b * c * sp);
        let x = view::<T>(s1, l1, e, op, "input")?;
        let dy = view::<T>(s2, l2, e, op, "output gradient")?;
        let y = view::<T>(s3, l3, e, op, "output")?;
        let dev: &CudaDevice = &s1.device;
        let (parts, chunk) = reduce_partition(c, n);
        // SAFETY: uninitialised, never read before written, as in Stats: the partial kernel writes all
        // C*P*2 partials and the finalize kernel all 6C coefficients.
        let mut partial = unsafe { dev.alloc::<f64>(c * parts as usize * 2)? };
        // SAFETY: as above, written whole by the finalize kernel.
        let mut coef = unsafe { dev.alloc::<f32>(6 * c)? };
        let detail = format!("input {:?} ({:?})", l1.dims(), s1.dtype());
        let (c32, s32, n64) = (c as u32, sp as u32, n as u64);
        let relu = self.relu as i32;
        with_storage(&self.stats, op, "statistics", |ss, sl| {
            let stats = view::<f32>(ss, sl, 3 * c, op, "statistics")?;
            let name = format!("bn_bwd_partial_{sfx}");
            let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut a = f.builder();
            a.arg(&x).arg(&dy).arg(&y).arg(&stats).arg(&c32).arg(&s32).arg(&n64).arg(&chunk);
            a.arg(&self.scale).arg(&relu).arg(&mut partial);
            // SAFETY: the arguments match `bn_bwd_partial_*` in order and type; x, dy and y hold e elements
            // and the statistics 3C (checked by `view`), `partial` the C*P*2 written.
            unsafe { a.launch(reduce_grid(c32, parts)) }.map_err(|err| launch_err(op, &name, detail.clone(), err))?;
            with_storage(&self.gamma, op, "gamma", |gs, gl| {
                let gamma = view::<f32>(gs, gl, c, op, "gamma")?;
                let f = dev.get_or_load_custom_func("bn_bwd_finalize", MODULE, PTX)?;
                let mut a = f.builder();
                a.arg(&partial).arg(&stats).arg(&gamma).arg(&c32).arg(&parts).arg(&n64).arg(&mut coef);
                // SAFETY: the arguments match `bn_bwd_finalize`; gamma holds C values (checked by `view`),
                // the partials C*P*2 and `coef` the 6C written.
                unsafe { a.launch(per_channel_grid(c)) }
                    .map_err(|err| launch_err(op, "bn_bwd_finalize", detail, err))?;
                Ok(())
            })
        })?;
        Ok((CudaStorage::wrap_cuda_slice(coef, dev.clone()), Shape::from((6, c))))
    }
}

/// (x, dy, y) -> dx (x's shape), dz = dy * [y > 0] (x's shape), or both stacked as (2, ...x's shape),
/// from the coefficients of [`BwdReduce`].
struct BwdDx {
    coef: Tensor,
    scale: f32,
    relu: bool,
    write_dx: bool,
    write_dz: bool,
}

impl CudaOp<3> for BwdDx {
    fn name(&self) -> &'static str {
        "sdp-batch-norm-backward-dx-cuda"
    }

    fn run<T: CudaDType + DeviceRepr>(
        &self,
        _x: &CudaSlice<T>,
        args: [(&CudaStorage, &Layout); 3],
        sfx: &str,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        if !(self.write_dx || self.write_dz) {
            bail!("{op}: nothing to compute");
        }
        let [(s1, l1), (s2, l2), (s3, l3)] = args;
        let (b, c, sp) = backward_dims(op, l1, l2, l3)?;
        let e = b * c * sp;
        let x = view::<T>(s1, l1, e, op, "input")?;
        let dy = view::<T>(s2, l2, e, op, "output gradient")?;
        let y = view::<T>(s3, l3, e, op, "output")?;
        let dev: &CudaDevice = &s1.device;
        let outputs = self.write_dx as usize + self.write_dz as usize;
        // SAFETY: uninitialised, never read before written: the kernel writes e values per requested output.
        let mut out = unsafe { dev.alloc::<T>(outputs * e)? };
        let detail = format!("input {:?} ({:?})", l1.dims(), s1.dtype());
        let name = format!("bn_bwd_dx_{sfx}");
        with_storage(&self.coef, op, "coefficients", |cs, cl| {
            let coef = view::<f32>(cs, cl, 6 * c, op, "coefficients")?;
            let (c32, s32, e64) = (c as u32, sp as u32, e as u64);
            let (relu, wdx, wdz) = (self.relu as i32, self.write_dx as i32, self.write_dz as i32);
            let f = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut a = f.builder();
            a.arg(&x).arg(&dy).arg(&y).arg(&coef).arg(&c32).arg(&s32).arg(&e64);
            a.arg(&self.scale).arg(&relu).arg(&wdx).arg(&wdz).arg(&mut out);
            // SAFETY: the arguments match `bn_bwd_dx_*` in order and type; x, dy and y hold e elements and
            // the coefficients 6C (checked by `view`); `out` holds e for each of the wdx + wdz outputs.
            unsafe { a.launch(elementwise_grid(e)) }.map_err(|err| launch_err(op, &name, detail, err))?;
            Ok(())
        })?;
        let shape =
            if self.write_dx && self.write_dz { Shape::from([&[2], l1.dims()].concat()) } else { l1.shape().clone() };
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_partition_covers_every_value_once() {
        for c in [1usize, 3, 10, 64, 512, 1024, 5000, 70_000] {
            for n in [1usize, 2, 7, 255, 256, 2047, 2048, 2049, 16 * 1024, 131_072, 128 * 56 * 56, 1 << 26] {
                let (p, chunk) = reduce_partition(c, n);
                let (p, n64) = (p as u64, n as u64);
                assert!((1..=65_535).contains(&p), "c {c} n {n}: {p} parts");
                assert!(chunk >= 1 && p * chunk >= n64, "c {c} n {n}: {p} x {chunk} misses values");
                assert!((p - 1) * chunk < n64, "c {c} n {n}: the last of {p} parts of {chunk} is empty");
                // Enough blocks when there is enough work, and no block with less than MIN_CHUNK unless
                // the channel is that small.
                if n64 >= MIN_CHUNK {
                    assert!(chunk >= MIN_CHUNK.min(n64) / 2, "c {c} n {n}: chunk {chunk}");
                }
                assert!(c as u64 * p <= TARGET_BLOCKS.max(c as u64) + c as u64, "c {c} n {n}: {p} parts");
            }
        }
        // ResNet-18 stage 1 at batch 128 on CIFAR: 64 channels of 128 * 32 * 32 values, 16 blocks each.
        assert_eq!(reduce_partition(64, 128 * 32 * 32), (16, 8192));
        // A (B, C) input with few rows: one block per channel.
        assert_eq!(reduce_partition(10, 7), (1, 7));
    }

    #[test]
    fn elementwise_grid_is_bounded() {
        assert_eq!(elementwise_blocks(1), 1);
        assert_eq!(elementwise_blocks(256), 1);
        assert_eq!(elementwise_blocks(257), 2);
        assert_eq!(elementwise_blocks(1 << 30), MAX_ELEMENTWISE_BLOCKS as u32);
    }

    #[test]
    fn dims_and_dtypes() -> Result<()> {
        assert_eq!(dims3("op", &[4, 3, 7, 5])?, (4, 3, 35));
        assert_eq!(dims3("op", &[7, 10])?, (7, 10, 1));
        let e = dims3("bn", &[2, 3, 4]).unwrap_err().to_string();
        assert!(e.contains("bn: input must be (B, C, H, W) or (B, C), got shape [2, 3, 4]"), "{e}");
        assert!(dims3("bn", &[0, 3]).unwrap_err().to_string().contains("empty input"));
        assert!(supports(DType::BF16, DType::F32, DType::F32));
        assert!(supports(DType::BF16, DType::BF16, DType::F32));
        assert!(supports(DType::F32, DType::F32, DType::F32));
        assert!(!supports(DType::F32, DType::BF16, DType::F32));
        assert!(!supports(DType::F64, DType::F64, DType::F64));
        assert_eq!(kernel_suffix("op", DType::F16)?, "f16");
        assert!(kernel_suffix("op", DType::F64).is_err());
        Ok(())
    }

    /// The index walks of the kernels (ChanIter, PlaneIter in batchnorm.cu), mirrored step for step,
    /// against plain division.
    #[test]
    fn kernel_index_walks_match_division() {
        for (s, c) in [(1u64, 1u64), (1, 10), (35, 3), (16, 512), (1024, 64), (3, 7), (300, 2)] {
            for g in [1u64, 5, 256, 2112 * 256, 1000] {
                for i0 in [0u64, 1, 17, 255] {
                    // ChanIter
                    let plane = i0 / s;
                    let (mut ps, mut pc) = (i0 - plane * s, plane % c);
                    let q = g / s;
                    let (ds, dc) = (g - q * s, q % c);
                    let mut i = i0;
                    for _ in 0..50 {
                        assert_eq!((ps, pc), (i % s, (i / s) % c), "ChanIter s {s} c {c} g {g} at {i}");
                        ps += ds;
                        let carry = if ps >= s {
                            ps -= s;
                            1
                        } else {
                            0
                        };
                        pc += dc + carry;
                        if pc >= c {
                            pc -= c;
                        }
                        i += g;
                    }
                    // PlaneIter (g < 2^32)
                    let (mut b, mut ps) = (i0 / s, i0 % s);
                    let (db, ds) = (g / s, g % s);
                    let mut j = i0;
                    for _ in 0..50 {
                        assert_eq!((b, ps), (j / s, j % s), "PlaneIter s {s} g {g} at {j}");
                        ps += ds;
                        b += db;
                        if ps >= s {
                            ps -= s;
                            b += 1;
                        }
                        j += g;
                    }
                }
            }
        }
    }
}
