//! Process-wide tuning for training: the allocator, and candle's CPU thread pool cut to one thread.
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
//! # candle's thread pool (one thread unless the user says otherwise)
//!
//! candle 0.11 runs its large element-wise ops on its own pool of threads that spin at a barrier, next
//! to rayon's (this crate's kernels and the GEMMs). Every op of a training step that matters runs on
//! rayon now (the convolutions, normalisations, softmax, GELU, batched matmuls), and candle's pool only
//! spins beside it, taking a core from rayon's workers: with one candle thread (`CANDLE_NUM_THREADS=1`)
//! a width-16 ResNet-18 step at batch 64 took 131-135 ms against 165-178 ms with candle's default of
//! one per core, swin_t at batch 32 0.78 s against 0.87 s, full-width ResNet-18 unchanged within noise
//! (2 cores, `sdp bench step`, same run). So [`tune_for_training`] sets `CANDLE_NUM_THREADS=1` when the
//! variable is unset; a value the user set is kept.

/// Applies the tuning; call once at the start of `main`, before other threads start.
/// `SDP_MALLOC=default` leaves glibc's allocator alone (for comparisons).
pub fn tune_for_training() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Before any candle op reads it (candle builds its pool once, on first use) and before other
        // threads start.
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

/// Threads each of `jobs` concurrent CPU runs gets: the cores shared out evenly (at least one).
pub fn threads_per_job(jobs: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / jobs.max(1)).max(1)
}

/// The environment that gives a CPU run `threads` threads (rayon's pool, which runs this crate's
/// kernels and the GEMMs), unless the user set it: several runs that each start a thread per core would
/// oversubscribe the cores. candle's pool is one thread in every `sdp` process already (see above).
pub fn cpu_share_env(threads: usize) -> Vec<(&'static str, String)> {
    ["RAYON_NUM_THREADS"]
        .into_iter()
        .filter(|k| std::env::var_os(k).is_none())
        .map(|k| (k, threads.to_string()))
        .collect()
}
