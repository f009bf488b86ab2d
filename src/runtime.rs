//! Process-wide tuning for training: the allocator and candle's CPU thread pool.
//!
//! # Allocator
//!
//! A train step allocates and frees the same activation-sized buffers (up to tens of MB) at every
//! step. With glibc's defaults every buffer above the (dynamic) mmap threshold is a fresh `mmap`,
//! so each step pays a zero-filled page fault per 4 KiB page and a TLB shootdown per `munmap`:
//! about 10% of a ResNet-18 step on 2 cores. Raising the mmap threshold to glibc's maximum (32 MiB)
//! and never trimming the heap keeps freed buffers in the process for the next step; the peak
//! resident memory is unchanged (the same buffers are live at the peak either way).

//!
//! # candle's thread pool
//!
//! candle 0.11 runs its large element-wise ops on its own pool of spinning threads, next to rayon's
//! (which runs this crate's kernels and the GEMMs). With both pools on the same cores, candle's main
//! thread spins in a barrier waiting for a pool thread that rayon has descheduled: 27% of a swin_t
//! step on 2 cores was `BarrierGuard::drop`. Unless `CANDLE_NUM_THREADS` is set, it is set to 1, so
//! candle's element-wise ops run inline on the calling thread and every parallel loop is rayon's.

/// Applies the tuning; call once at the start of `main`, before other threads start and before any
/// tensor op. `SDP_MALLOC=default` leaves glibc's allocator alone; an explicit `CANDLE_NUM_THREADS`
/// is respected.
pub fn tune_for_training() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Single-threaded at this point (documented precondition), so setting the variable is sound.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var("SDP_MALLOC").is_ok_and(|v| v == "default") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
