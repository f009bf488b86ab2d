//! Rank 0's watch over the other ranks of a run spread over processes: a rank that dies mid-run (killed,
//! out of memory), on any node, is recorded, naming it, instead of leaving the run `running`.
//!
//! When a rank dies, the launcher ends the whole job (Open MPI's `mpirun`: about 1 s later a SIGTERM to
//! every other rank, a SIGKILL 1 s after that), and rank 0, blocked in a collective, would never record why.
//! While ranks train, rank 0 knows every rank's process id and node (exchanged when the watch starts):
//! - a rank on rank 0's node is looked at directly: its process gone, or a zombie;
//! - a rank on another node writes a heartbeat, `<run>/ranks/rank<r>.beat`, every 0.25 s from a thread of
//!   its own (rank 0 reads it: the results folder must be shared by the nodes, as checkpoints need too; a
//!   rank whose heartbeat rank 0 never sees is not watched, and rank 0 says so). It is dead when its
//!   heartbeat has not changed for `SDP_PEER_TIMEOUT_S` seconds (default 30: a launcher that leaves the
//!   other ranks running, as `srun` without `--kill-on-bad-exit` or `mpirun --enable-recovery` do), or,
//!   on a signal to rank 0 (the launcher's SIGTERM that follows a death), as soon as it has stood still
//!   for 1.2 s (about five beats; `mpirun` signals about 1 s after a death), or when it does not change
//!   within 0.75 s of the signal, in which every live rank's heartbeat changes about three times.
//!
//! A thread looks every 0.3 s, and the signal handler at once; the first rank found dead makes rank 0
//! record the run `failed: rank k (pid P on HOST) died while the run trained` and exit. `SDP_PEER_HOST`
//! replaces the host name a rank reports (a test runs a rank "on another node" of one machine this way).

use crate::comm::World;
use crate::results::{Manifest, Status};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// How often a rank on another node writes its heartbeat.
const BEAT_EVERY: Duration = Duration::from_millis(250);
/// How long rank 0, on a signal, waits for every rank on another node to show a new heartbeat.
const SIGNAL_WINDOW: Duration = Duration::from_millis(750);
/// On a signal, a heartbeat that has stood still this long is a dead rank's at once (rank 0 has about 1 s
/// between mpirun's SIGTERM and its SIGKILL).
const STILL_ON_SIGNAL: Duration = Duration::from_millis(1200);
/// How long after the watch starts rank 0 says that it sees no heartbeat of a rank on another node.
const NOTE_AFTER: Duration = Duration::from_secs(10);

/// One rank's process.
#[derive(Clone, Debug)]
struct Peer {
    rank: usize,
    pid: u32,
    /// A hash of its host name (48 bits, so that it travels exactly in an f64).
    host: u64,
}

/// A rank on another node, as rank 0 sees its heartbeat file.
struct Remote {
    peer: Peer,
    path: PathBuf,
    /// The file's last content, when it was first seen so (rank 0's clock), and the host it names.
    last: Option<Vec<u8>>,
    changed: Instant,
    host: String,
    /// Whether rank 0 was told it cannot see this heartbeat.
    noted: bool,
    /// The rank removed its heartbeat file: it ended its training in order (not watched any more).
    ended: bool,
}

impl Remote {
    /// Reads the heartbeat file; a change (a newer beat of this rank's process) resets its age.
    fn poll(&mut self) {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                self.ended |= self.last.is_some() && e.kind() == std::io::ErrorKind::NotFound;
                return;
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut fields = text.split_whitespace();
        if fields.next().and_then(|p| p.parse::<u32>().ok()) != Some(self.peer.pid) {
            return; // empty (being rewritten), or not this process's
        }
        if self.last.as_deref() != Some(bytes.as_slice()) {
            self.host = fields.next().unwrap_or_default().to_string();
            self.last = Some(bytes);
            self.changed = Instant::now();
        }
    }

    /// Whether rank 0 watches it: its heartbeat was seen, and the rank has not ended in order.
    fn watched(&self) -> bool {
        self.last.is_some() && !self.ended
    }
}

struct Watch {
    /// The other ranks on this node (their processes can be looked at).
    local: Vec<Peer>,
    /// The ranks on other nodes (their heartbeats).
    remote: Vec<Remote>,
    manifest: PathBuf,
    started: Instant,
}

impl Watch {
    fn dead_local(&self) -> Option<String> {
        let dead = self.local.iter().find(|p| !alive(p.pid))?;
        Some(format!("rank {} (pid {} on {}) died while the run trained", dead.rank, dead.pid, host_name()))
    }

    fn poll(&mut self) {
        self.remote.iter_mut().for_each(Remote::poll);
    }
}

fn dead_remote(r: &Remote) -> String {
    format!(
        "rank {} (pid {} on {}) died while the run trained (no heartbeat from it for {:.1} s)",
        r.peer.rank,
        r.peer.pid,
        r.host,
        r.changed.elapsed().as_secs_f64()
    )
}

static WATCH: Mutex<Option<Watch>> = Mutex::new(None);
static THREAD: Once = Once::new();

/// The host name this rank reports: `SDP_PEER_HOST` if set, else the machine's.
fn host_name() -> String {
    std::env::var("SDP_PEER_HOST").ok().filter(|h| !h.is_empty()).unwrap_or_else(crate::results::host)
}

fn host_hash() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    host_name().hash(&mut h);
    h.finish() & ((1 << 48) - 1)
}

/// How long a heartbeat of a rank on another node may stand still before rank 0 takes the rank as dead.
fn timeout() -> Duration {
    std::env::var("SDP_PEER_TIMEOUT_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_secs(30), Duration::from_secs_f64)
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

/// A rank's heartbeat thread (ranks on another node than rank 0's).
struct Beat {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl Beat {
    fn start(path: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, file) = (stop.clone(), path.clone());
        let thread = std::thread::spawn(move || {
            let line = |seq: u64| format!("{} {} {seq}\n", std::process::id(), host_name());
            let mut said = false;
            for seq in 0.. {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let wrote = file
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&file, line(seq)));
                if let (Err(e), false) = (wrote, said) {
                    said = true;
                    crate::say!(
                        "cannot write the heartbeat {} ({e}): rank 0 would not see this rank die",
                        file.display()
                    );
                }
                std::thread::park_timeout(BEAT_EVERY); // woken early by `end`
            }
        });
        Self { stop, thread: Some(thread), path }
    }

    fn end(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// While alive, rank 0 watches the other ranks of the run (and the ranks on other nodes beat).
pub struct Watching {
    world: World,
    beat: Option<Beat>,
    beats: PathBuf,
}

/// Starts watching the ranks of the run in `run_dir` (every rank calls this before training a spread run:
/// the process ids are exchanged, and the ranks on another node than rank 0's start their heartbeat).
pub fn watch(world: &World, run_dir: &Path) -> Result<Watching> {
    let beats = run_dir.join("ranks");
    if world.is_root() {
        let _ = std::fs::remove_dir_all(&beats); // an earlier job's (no rank beats before the exchange)
    }
    let peers = exchange(world)?;
    let root_host = peers[0].host;
    let beat_file = |r: usize| beats.join(format!("rank{r}.beat"));
    let me = &peers[world.rank()];
    let beat = (!world.is_root() && me.host != root_host).then(|| Beat::start(beat_file(me.rank)));
    if world.is_root() {
        let others = peers.into_iter().filter(|p| p.rank != 0);
        let (local, remote): (Vec<Peer>, Vec<Peer>) = others.partition(|p| p.host == root_host);
        let now = Instant::now();
        let remote = remote
            .into_iter()
            .map(|peer| Remote {
                path: beat_file(peer.rank),
                peer,
                last: None,
                changed: now,
                host: String::new(),
                noted: false,
                ended: false,
            })
            .collect();
        *WATCH.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Watch { local, remote, manifest: run_dir.join("manifest.json"), started: now });
        THREAD.call_once(|| {
            std::thread::spawn(|| loop {
                std::thread::sleep(Duration::from_millis(300));
                check();
            });
        });
    }
    Ok(Watching { world: world.clone(), beat, beats })
}

impl Watching {
    /// Stops watching once training is over, before any rank may exit: rank 0 stops first, then, where
    /// every rank ended training at the same point (`together`: done, an agreed stop or failure), every
    /// rank passes one collective, so that no rank ends its process while rank 0 still watches it. (After
    /// a failure of one rank the job is ending: no collective.)
    pub fn end(mut self, together: bool) -> Result<()> {
        if self.world.is_root() {
            *WATCH.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        if let Some(b) = self.beat.take() {
            b.end();
        }
        if together {
            self.world.comm.all_reduce_sum_f64(&mut [0.0])?;
            if self.world.is_root() {
                let _ = std::fs::remove_dir_all(&self.beats);
            }
        }
        Ok(())
    }
}

/// The watch thread's look: a dead rank on this node, or a rank on another node whose heartbeat stopped
/// for the timeout.
fn check() {
    let mut guard = WATCH.lock().unwrap_or_else(|p| p.into_inner());
    let Some(w) = guard.as_mut() else { return };
    if let Some(reason) = w.dead_local() {
        fail(w, reason);
    }
    w.poll();
    let limit = timeout();
    if let Some(r) = w.remote.iter().find(|r| r.watched() && r.changed.elapsed() >= limit) {
        fail(w, dead_remote(r));
    }
    if w.started.elapsed() >= NOTE_AFTER {
        for r in w.remote.iter_mut().filter(|r| r.last.is_none() && !r.noted) {
            r.noted = true;
            crate::say!(
                "rank 0: no heartbeat of rank {} in {}: is the results folder shared by the nodes? If that rank \
                 dies, the run cannot be recorded as failed",
                r.peer.rank,
                r.path.display()
            );
        }
    }
}

/// On a signal (the launcher's SIGTERM comes right after a rank dies): if a watched rank has died, records
/// the run failed, naming it, and ends this process. A rank on another node is dead when its heartbeat
/// has stood still for 1.2 s, or does not change within 0.75 s of the signal; the call returns as soon as
/// every heartbeat has changed since the signal or been removed (every rank alive, or done: a rank that
/// ends its training in order removes its heartbeat before it waits for rank 0).
pub fn on_signal() {
    let mut guard = WATCH.lock().unwrap_or_else(|p| p.into_inner());
    let Some(w) = guard.as_mut() else { return };
    w.poll();
    let before: Vec<Option<Vec<u8>>> = w.remote.iter().map(|r| r.last.clone()).collect();
    let t = Instant::now();
    loop {
        if let Some(reason) = w.dead_local() {
            fail(w, reason);
        }
        // The watched ranks on other nodes whose heartbeat has not changed since the signal.
        let still: Vec<&Remote> =
            w.remote.iter().zip(&before).filter(|(r, b)| r.watched() && r.last == **b).map(|(r, _)| r).collect();
        if let Some(r) = still.iter().find(|r| r.changed.elapsed() >= STILL_ON_SIGNAL) {
            fail(w, dead_remote(r));
        }
        match still.first() {
            None => return,
            Some(r) if t.elapsed() >= SIGNAL_WINDOW => fail(w, dead_remote(r)),
            Some(_) => {}
        }
        std::thread::sleep(Duration::from_millis(50));
        w.poll();
    }
}

/// Records the run failed for `reason` and ends this process.
fn fail(w: &Watch, reason: String) -> ! {
    crate::say!("rank 0: {reason}: recording the run as failed and ending the job");
    if let Ok(mut m) = Manifest::read(&w.manifest) {
        m.status = Status::Failed(reason);
        m.ended = Some(crate::results::now());
        if let Err(e) = m.write(&w.manifest) {
            crate::say!("rank 0: could not record the failure in {}: {e:#}", w.manifest.display());
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
