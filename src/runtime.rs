//! Process-wide tuning for training: the allocator (and why candle's CPU thread pool is left alone).
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
//! # candle's thread pool (left alone)
//!
//! candle 0.11 runs its large element-wise ops on its own pool of spinning threads, next to rayon's
//! (this crate's kernels and the GEMMs). On an otherwise idle machine that is the faster choice
//! (swin_t batch 32 on 2 cores: 1.51 s with candle's pool, 1.80-1.90 s with `CANDLE_NUM_THREADS=1`;
//! resnet18 0.76 vs 0.79 s), so it is not changed. Under CPU contention (other jobs on the cores) the
//! pool's barrier spins waiting for descheduled threads: swin_t took 5.5 s against 2.9 s with
//! `CANDLE_NUM_THREADS=1`. Set that variable when sharing the machine.

/// Applies the tuning; call once at the start of `main`, before other threads start.
/// `SDP_MALLOC=default` leaves glibc's allocator alone (for comparisons).
pub fn tune_for_training() {
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

/// Threads each of `jobs` concurrent CPU runs gets: the cores shared out evenly (at least one).
pub fn threads_per_job(jobs: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / jobs.max(1)).max(1)
}

/// The environment that gives a CPU run `threads` threads (rayon's pool, which runs this crate's
/// kernels and the GEMMs, and candle's element-wise pool), unless the user set them: several runs that
/// each start a thread per core would oversubscribe the cores, and spinning pools then wait on
/// descheduled threads (see above).
pub fn cpu_share_env(threads: usize) -> Vec<(&'static str, String)> {
    ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"]
        .into_iter()
        .filter(|k| std::env::var_os(k).is_none())
        .map(|k| (k, threads.to_string()))
        .collect()
}
