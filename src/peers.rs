//! Rank 0's watch over the other ranks of a run spread over processes.
//!
//! When a rank dies mid-run (killed, out of memory), the launcher ends the whole job, and rank 0, blocked in
//! a collective, would never record why: the run would be left `running`. While ranks train, rank 0 knows
//! every rank's process id and node, and a thread looks every 0.3 s (and again on the launcher's SIGTERM)
//! at the ranks on its own node; the first one found dead makes rank 0 record the run
//! `failed: rank k (pid P on HOST) died while the run trained` and exit. A rank on another node that dies is
//! not seen this way: that run stays `running` under a dead owner (`stale`) and is retrained like any other.

use crate::comm::World;
use crate::results::{Manifest, Status};
use anyhow::Result;
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::Duration;

/// One rank's process.
#[derive(Clone, Debug)]
struct Peer {
    rank: usize,
    pid: u32,
    /// A hash of its host name (48 bits, so that it travels exactly in an f64).
    host: u64,
}

struct Watch {
    /// The other ranks on this node (the ones whose death rank 0 can see).
    local: Vec<Peer>,
    manifest: PathBuf,
}

static WATCH: Mutex<Option<Watch>> = Mutex::new(None);
static THREAD: Once = Once::new();

fn host_hash() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    crate::results::host().hash(&mut h);
    h.finish() & ((1 << 48) - 1)
}

/// Every rank's process id and host (a collective call over `world`).
fn exchange(world: &World) -> Result<Vec<Peer>> {
    let n = world.size();
    let mut v = vec![0.0; 2 * n];
    v[2 * world.rank()] = std::process::id() as f64;
    v[2 * world.rank() + 1] = host_hash() as f64;
    world.comm.all_reduce_sum_f64(&mut v)?;
    Ok((0..n).map(|r| Peer { rank: r, pid: v[2 * r] as u32, host: v[2 * r + 1] as u64 }).collect())
}

/// While alive, rank 0 watches the other ranks of the run whose manifest is at `manifest`.
pub struct Watching {
    world: World,
}

/// Starts watching (every rank calls this before training a spread run: the process ids are exchanged).
pub fn watch(world: &World, manifest: PathBuf) -> Result<Watching> {
    let peers = exchange(world)?;
    if world.is_root() {
        let me = host_hash();
        let local = peers.into_iter().filter(|p| p.rank != 0 && p.host == me).collect();
        *WATCH.lock().unwrap_or_else(|p| p.into_inner()) = Some(Watch { local, manifest });
        THREAD.call_once(|| {
            std::thread::spawn(|| loop {
                std::thread::sleep(Duration::from_millis(300));
                check_now();
            });
        });
    }
    Ok(Watching { world: world.clone() })
}

impl Watching {
    /// Stops watching once training is over, before any rank may exit: rank 0 stops first, then, after a
    /// run every rank finished (`trained`), every rank passes one collective, so that no rank ends its
    /// process while rank 0 still watches it. (After a failure the job is ending: no collective.)
    pub fn end(self, trained: bool) -> Result<()> {
        if self.world.is_root() {
            *WATCH.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        if trained {
            self.world.comm.all_reduce_sum_f64(&mut [0.0])?;
        }
        Ok(())
    }
}

/// If a watched rank on this node has died: records the run failed, naming it, and ends this process.
/// Called by the watch thread and by the signal handler (the launcher's SIGTERM comes right after a death).
pub fn check_now() {
    let guard = WATCH.lock().unwrap_or_else(|p| p.into_inner());
    let Some(w) = guard.as_ref() else { return };
    let Some(dead) = w.local.iter().find(|p| !alive(p.pid)) else { return };
    let reason =
        format!("rank {} (pid {} on {}) died while the run trained", dead.rank, dead.pid, crate::results::host());
    eprintln!("rank 0: {reason}: recording the run as failed and ending the job");
    if let Ok(mut m) = Manifest::read(&w.manifest) {
        m.status = Status::Failed(reason);
        m.ended = Some(crate::results::now());
        if let Err(e) = m.write(&w.manifest) {
            eprintln!("rank 0: could not record the failure in {}: {e:#}", w.manifest.display());
        }
    }
    std::process::exit(1);
}

/// Whether process `pid` still runs (not gone, not a zombie waiting for its launcher).
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    if !exists {
        return false;
    }
    // A killed child not yet reaped by its launcher is a zombie: state `Z` in /proc/<pid>/stat.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"),
        Err(_) => true,
    }
}
