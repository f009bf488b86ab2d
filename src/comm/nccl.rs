//! NCCL collectives (feature `nccl`): the sums among rank groups run on the GPUs, over NVLink, PCIe or the
//! network, with NCCL; everything else (rank discovery, the run's control decisions, metrics) stays on the
//! host collective the launcher set up (MPI, or [`super::Solo`] for one process).
//!
//! - One world communicator per process, from a unique id rank 0 makes and broadcasts over the host
//!   collective (as nccl-tests do), and one communicator per rank group, made once with `ncclCommSplit`
//!   (a collective call over the world, in the order [`Collective::prepare`] names the groups).
//! - Every communicator is **non-blocking** (`ncclConfig_t.blocking = 0`): each call returns at once and
//!   this file polls its state and the stream, with a deadline (`SDP_NCCL_TIMEOUT_S`, 600 s). A peer that
//!   never arrives (a dead rank, a rank stuck elsewhere) aborts the communicator (`ncclCommAbort`) and
//!   fails the call with an error naming the ranks, instead of hanging the job.
//! - The grouped averager hands this collective host buffers (it gathers the held coordinates of every
//!   tensor on the host); each all-reduce copies its buffer to the device, sums it there and copies it back.

use super::Collective;
use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::sys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, CStr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `NCCL_SPLIT_NOCOLOR`: a rank that joins no communicator of a split.
const NO_COLOR: c_int = -1;

/// NCCL's `ncclConfig_t` as of NCCL 2.17: the leading fields of every later version's struct. NCCL copies
/// `size` bytes of it and keeps its defaults for the fields that follow, so this works with any NCCL ≥ 2.17
/// whatever version cudarc's bindings were generated for.
#[repr(C)]
struct Config {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default".
const UNDEF: c_int = c_int::MIN;

impl Config {
    fn non_blocking() -> Self {
        Self {
            size: std::mem::size_of::<Self>(),
            magic: 0xcafe_beef,
            version: 21700, // NCCL_VERSION(2, 17, 0)
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
            split_share: UNDEF,
        }
    }
}

/// One NCCL communicator; aborted (which also frees it) once: on a timeout or when dropped.
struct Comm {
    raw: sys::ncclComm_t,
    /// The world ranks it joins (for error messages).
    ranks: u64,
    aborted: Cell<bool>,
}

impl Comm {
    fn new(raw: sys::ncclComm_t, ranks: u64) -> Self {
        Self { raw, ranks, aborted: Cell::new(false) }
    }

    fn abort(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: `raw` came from a successful ncclCommInitRankConfig/ncclCommSplit and is aborted once.
            unsafe {
                sys::ncclCommAbort(self.raw);
            }
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        self.abort();
    }
}

/// This process's GPU collectives, next to the host collective of its launch.
pub struct NcclComm {
    host: Rc<dyn Collective>,
    stream: Arc<CudaStream>,
    world: Comm,
    /// Per rank group: its communicator (`None` on the ranks outside it).
    groups: RefCell<HashMap<u64, Option<Comm>>>,
    timeout: Duration,
}

impl NcclComm {
    /// Makes the world communicator on `device` (a collective call over every process of `host`).
    pub fn new(host: Rc<dyn Collective>, device: &candle_core::Device) -> Result<Self> {
        let candle_core::Device::Cuda(dev) = device else {
            bail!("NCCL needs a CUDA device, not {device:?}");
        };
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().context("binding the CUDA context")?;
        let timeout = Duration::from_secs_f64(
            std::env::var("SDP_NCCL_TIMEOUT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(600.0),
        );
        // Rank 0's unique id, to every rank over the host collective.
        let mut id = vec![0u8; 128];
        if host.rank() == 0 {
            let mut uid = std::mem::MaybeUninit::<sys::ncclUniqueId>::uninit();
            // SAFETY: ncclGetUniqueId writes a whole ncclUniqueId into `uid`.
            check(unsafe { sys::ncclGetUniqueId(uid.as_mut_ptr()) }, None, "ncclGetUniqueId")?;
            let uid = unsafe { uid.assume_init() };
            id = uid.internal.iter().map(|&c| c as u8).collect();
        }
        host.broadcast(0, &mut id)?;
        anyhow::ensure!(id.len() == 128, "rank 0 sent an NCCL id of {} bytes, not 128", id.len());
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(&id) {
            *d = *s as c_char;
        }
        let (n, rank) = (host.size(), host.rank());
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        let mut config = Config::non_blocking();
        // SAFETY: `raw` receives the communicator; `config` is a valid NCCL 2.17 config that outlives the call.
        let r = unsafe {
            sys::ncclCommInitRankConfig(
                &mut raw,
                n as c_int,
                uid,
                rank as c_int,
                (&mut config as *mut Config).cast::<sys::ncclConfig_t>(),
            )
        };
        let all = super::all_ranks(n);
        check(r, (!raw.is_null()).then_some(raw), "ncclCommInitRankConfig")?;
        let world = Comm::new(raw, all);
        wait_ready(&world, Instant::now() + timeout, "making the world communicator")?;
        Ok(Self { host, stream, world, groups: RefCell::new(HashMap::new()), timeout })
    }

    /// The NCCL library's version, as `2.28.9`.
    fn version() -> String {
        let mut v: c_int = 0;
        // SAFETY: ncclGetVersion writes one int.
        if unsafe { sys::ncclGetVersion(&mut v) } != sys::ncclResult_t::ncclSuccess {
            return "unknown".into();
        }
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    }

    /// Sums `buf` (device memory on this process's stream) element-wise over the ranks of `comm`, in place.
    fn all_reduce_device(&self, comm: &Comm, buf: &mut CudaSlice<f32>) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let count = buf.len();
        {
            let (ptr, _record) = buf.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` holds `count` f32 on this communicator's device; in-place is allowed.
            let r = unsafe {
                sys::ncclAllReduce(
                    ptr as *const std::ffi::c_void,
                    ptr as *mut std::ffi::c_void,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclSum,
                    comm.raw,
                    self.stream.cu_stream() as sys::cudaStream_t,
                )
            };
            check(r, Some(comm.raw), "ncclAllReduce")?;
        }
        wait_ready(comm, deadline, "enqueuing an all-reduce")?;
        // The sum is on the stream: wait for it, watching the communicator for a peer's failure.
        let done = self.stream.record_event(None).context("recording a CUDA event")?;
        let mut spins = 0u32;
        while !done.try_is_complete().context("querying a CUDA event")? {
            comm_state(comm)?;
            if Instant::now() > deadline {
                abort_with(comm, "an all-reduce", self.timeout)?;
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Sums a host buffer over the ranks of `comm`: to the device, summed there, and back.
    fn sum(&self, comm: &Comm, buf: &mut [f32]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self.stream.clone_htod(buf).context("copying a buffer to the GPU")?;
        self.all_reduce_device(comm, &mut dev)?;
        self.stream.memcpy_dtoh(&dev, buf).context("copying a buffer from the GPU")?;
        self.stream.synchronize().context("waiting for the copy from the GPU")?;
        Ok(())
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn size(&self) -> usize {
        self.host.size()
    }

    fn prepare(&self, groups: &[u64]) -> Result<()> {
        let me = 1u64 << self.rank();
        let all = super::all_ranks(self.size());
        let mut made = self.groups.borrow_mut();
        for &g in groups {
            if g == all || made.contains_key(&g) {
                continue;
            }
            let color = if g & me != 0 { 0 } else { NO_COLOR };
            let mut raw: sys::ncclComm_t = std::ptr::null_mut();
            let mut config = Config::non_blocking();
            // SAFETY: every rank of the world calls this, in the same order of groups; `raw` receives the new
            // communicator (null for NO_COLOR); `config` outlives the call.
            let r = unsafe {
                sys::ncclCommSplit(
                    self.world.raw,
                    color,
                    self.rank() as c_int,
                    &mut raw,
                    (&mut config as *mut Config).cast::<sys::ncclConfig_t>(),
                )
            };
            check(r, Some(self.world.raw), "ncclCommSplit")?;
            let what = format!("making the communicator of ranks {g:#b}");
            if raw.is_null() {
                wait_ready(&self.world, Instant::now() + self.timeout, &what)?;
                made.insert(g, None);
            } else {
                let comm = Comm::new(raw, g);
                wait_ready(&comm, Instant::now() + self.timeout, &what)?;
                made.insert(g, Some(comm));
            }
        }
        Ok(())
    }

    fn all_reduce_sum(&self, group: u64, buf: &mut [f32]) -> Result<()> {
        if group == super::all_ranks(self.size()) {
            return self.sum(&self.world, buf);
        }
        let made = self.groups.borrow();
        let comm = made
            .get(&group)
            .and_then(Option::as_ref)
            .with_context(|| format!("rank {} has no NCCL communicator for ranks {group:#b}", self.rank()))?;
        self.sum(comm, buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        // Metrics and counters: small, and read on the host.
        self.host.all_reduce_sum_f64(buf)
    }

    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.host.broadcast(root, buf)
    }

    fn describe(&self) -> String {
        format!("nccl {} (parameters), {} (control)", Self::version(), self.host.describe())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort();
        self.host.abort(code)
    }
}

/// An NCCL return code as a result, with NCCL's own last error text where a communicator is known.
fn check(r: sys::ncclResult_t, comm: Option<sys::ncclComm_t>, call: &str) -> Result<()> {
    match r {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        _ => bail!("{call} failed: {}", error_text(r, comm)),
    }
}

fn error_text(r: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> String {
    // SAFETY: both return static or communicator-owned NUL-terminated strings (or null).
    let text = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let general = text(unsafe { sys::ncclGetErrorString(r) });
    let last = comm.map(|c| text(unsafe { sys::ncclGetLastError(c) })).unwrap_or_default();
    if last.is_empty() {
        format!("{r:?} ({general})")
    } else {
        format!("{r:?} ({general}): {last}")
    }
}

/// The communicator's state: Ok(true) when idle, Ok(false) while an operation is in progress, an error when
/// NCCL reports one (a peer's failure reaches every rank this way).
fn comm_state(comm: &Comm) -> Result<bool> {
    let mut state = sys::ncclResult_t::ncclSuccess;
    // SAFETY: `comm.raw` is live; `state` receives one result code.
    let r = unsafe { sys::ncclCommGetAsyncError(comm.raw, &mut state) };
    check(r, Some(comm.raw), "ncclCommGetAsyncError")?;
    match state {
        sys::ncclResult_t::ncclSuccess => Ok(true),
        sys::ncclResult_t::ncclInProgress => Ok(false),
        e => bail!("NCCL among ranks {:#b} failed: {}", comm.ranks, error_text(e, Some(comm.raw))),
    }
}

/// Polls a non-blocking communicator until its last call has finished, or aborts it at `deadline`.
fn wait_ready(comm: &Comm, deadline: Instant, what: &str) -> Result<()> {
    let start = Instant::now();
    while !comm_state(comm)? {
        if Instant::now() > deadline {
            abort_with(comm, what, deadline - start)?;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

fn abort_with(comm: &Comm, what: &str, waited: Duration) -> Result<()> {
    comm.abort();
    bail!(
        "NCCL: {what} among ranks {:#b} did not finish within {:.0} s (a rank died or is stuck); the communicator \
         was aborted (SDP_NCCL_TIMEOUT_S sets the limit)",
        comm.ranks,
        waited.as_secs_f64()
    )
}
