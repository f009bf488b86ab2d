//! One owner per run: a run folder is claimed with `lock.json` before training, so that several `sdp run`
//! processes (a `--jobs` pool, a Slurm array, machines sharing a folder) never train one run twice, and
//! `sdp list` can tell a live run from one whose process died.
//!
//! The lock holds the owner's pid, host, start time and a heartbeat (Unix seconds) that a background
//! thread refreshes, with the run's progress, while the run trains. A lock is live while its owner is:
//! on this host, its pid exists and its heartbeat is fresh; on another host (a shared file system), its
//! heartbeat is fresh. A stale lock (dead pid here, or no heartbeat for `stale_after`) is taken over.
//!
//! Claiming is `create_new` (atomic on local and NFSv3+ file systems); a takeover replaces the stale lock
//! by rename, then reads it back after a short pause, so of two processes taking over at once only the
//! one whose lock is on disk proceeds.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// `lock.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LockInfo {
    pub pid: u32,
    pub host: String,
    /// When the owner claimed the run (RFC 3339).
    pub started: String,
    /// Unix seconds of the owner's last sign of life.
    pub heartbeat: i64,
    /// Tells two owners apart (pid, host and claim time in nanoseconds).
    pub token: String,
    #[serde(default)]
    pub epoch: usize,
    #[serde(default)]
    pub step: usize,
    #[serde(default)]
    pub total_steps: usize,
}

impl LockInfo {
    /// Seconds since the last heartbeat.
    pub fn age(&self) -> i64 {
        unix_now() - self.heartbeat
    }

    /// Whether the owner is alive (see the module docs).
    pub fn is_live(&self, stale_after: Duration) -> bool {
        let fresh = self.age() <= stale_after.as_secs() as i64;
        if self.host == crate::io::host() {
            fresh && pid_alive(self.pid)
        } else {
            fresh
        }
    }

    /// "pid 123 on host, heartbeat 4 s ago".
    pub fn describe(&self) -> String {
        format!("pid {} on {}, heartbeat {} s ago", self.pid, self.host, self.age())
    }
}

pub use crate::io::{pid_alive, unix_now};

/// The lock file of a run folder.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join("lock.json")
}

/// The lock of `run_dir`, if it has a readable one.
pub fn read(run_dir: &Path) -> Option<LockInfo> {
    serde_json::from_str(&std::fs::read_to_string(path(run_dir)).ok()?).ok()
}

/// Progress the heartbeat publishes.
#[derive(Default)]
pub struct Progress {
    pub epoch: AtomicUsize,
    pub step: AtomicUsize,
    pub total_steps: AtomicUsize,
}

/// A claimed run: released (the file removed, if still ours) on drop.
pub struct RunLock {
    path: PathBuf,
    token: String,
    pub progress: Arc<Progress>,
    /// Set when the lock on disk stopped naming this process (another took it over as stale).
    pub lost: Arc<AtomicBool>,
    stop: Option<Sender<()>>,
    beat: Option<JoinHandle<()>>,
}

/// The outcome of [`claim`].
pub enum Claim {
    Acquired(RunLock),
    /// Another live process holds the run.
    Busy(LockInfo),
}

/// Claims `run_dir` for this process, taking over a stale lock; the heartbeat runs every `beat` until the
/// lock is dropped.
pub fn claim(run_dir: &Path, stale_after: Duration, beat: Duration) -> Result<Claim> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let path = path(run_dir);
    let token = format!(
        "{}:{}:{}",
        crate::io::host(),
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    let info = LockInfo {
        pid: std::process::id(),
        host: crate::io::host(),
        started: crate::io::now(),
        heartbeat: unix_now(),
        token: token.clone(),
        epoch: 0,
        step: 0,
        total_steps: 0,
    };
    let bytes = serde_json::to_vec_pretty(&info)?;
    let created = std::fs::OpenOptions::new().write(true).create_new(true).open(&path);
    match created {
        Ok(mut f) => {
            f.write_all(&bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A lock being written this instant may not parse yet: look twice before calling it stale.
            let mut held = read(run_dir);
            if held.is_none() {
                std::thread::sleep(Duration::from_millis(200));
                held = read(run_dir);
            }
            if let Some(h) = held.filter(|h| h.is_live(stale_after)) {
                return Ok(Claim::Busy(h));
            }
            crate::io::write_atomic(&path, &bytes)?;
            std::thread::sleep(Duration::from_millis(300));
            match read(run_dir) {
                Some(h) if h.token == token => {}
                Some(h) => return Ok(Claim::Busy(h)),
                None => anyhow::bail!("{}: the lock vanished while taking it over", path.display()),
            }
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    let progress = Arc::new(Progress::default());
    let lost = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel::<()>();
    let (p, l, file, tok, run_dir) = (progress.clone(), lost.clone(), path.clone(), token.clone(), run_dir.to_owned());
    let handle = std::thread::Builder::new()
        .name("sdp-heartbeat".into())
        .spawn(move || loop {
            match rx.recv_timeout(beat) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let Some(mut cur) = read(&run_dir) else { continue };
            if cur.token != tok {
                l.store(true, Ordering::SeqCst);
                return;
            }
            cur.heartbeat = unix_now();
            cur.epoch = p.epoch.load(Ordering::Relaxed);
            cur.step = p.step.load(Ordering::Relaxed);
            cur.total_steps = p.total_steps.load(Ordering::Relaxed);
            if let Ok(b) = serde_json::to_vec_pretty(&cur) {
                // A failed beat (disk full) is retried at the next one; the run itself reports the disk.
                let _ = crate::io::write_atomic(&file, &b);
            }
        })
        .context("starting the heartbeat thread")?;
    Ok(Claim::Acquired(RunLock { path, token, progress, lost, stop: Some(tx), beat: Some(handle) }))
}

impl Drop for RunLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.beat.take() {
            let _ = h.join();
        }
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str::<LockInfo>(&t).ok())
            .is_some_and(|h| h.token == self.token);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(60);
    const BEAT: Duration = Duration::from_millis(50);

    #[test]
    fn a_live_lock_is_busy_and_a_dead_one_is_taken_over() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let Claim::Acquired(lock) = claim(dir.path(), STALE, BEAT)? else { panic!("first claim") };
        match claim(dir.path(), STALE, BEAT)? {
            Claim::Busy(h) => assert_eq!(h.pid, std::process::id()),
            Claim::Acquired(_) => panic!("claimed a live run twice"),
        }
        lock.progress.step.store(7, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(read(dir.path()).map(|h| h.step), Some(7), "the heartbeat publishes progress");
        drop(lock);
        assert!(!path(dir.path()).exists(), "released on drop");

        // A lock of a pid that does not exist on this host, and one without a heartbeat for too long.
        for (pid, age) in [(u32::MAX / 2, 0), (std::process::id(), 3600)] {
            let dead = LockInfo {
                pid,
                host: crate::io::host(),
                started: crate::io::now(),
                heartbeat: unix_now() - age,
                token: "old".into(),
                epoch: 1,
                step: 2,
                total_steps: 3,
            };
            std::fs::write(path(dir.path()), serde_json::to_vec(&dead)?)?;
            assert!(!dead.is_live(STALE));
            let Claim::Acquired(lock) = claim(dir.path(), STALE, BEAT)? else { panic!("stale lock not taken over") };
            assert_eq!(read(dir.path()).map(|h| h.pid), Some(std::process::id()));
            drop(lock);
        }
        Ok(())
    }

    #[test]
    fn a_lock_taken_over_is_reported_lost_and_left_alone() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let Claim::Acquired(lock) = claim(dir.path(), STALE, BEAT)? else { panic!("claim") };
        let mut other = read(dir.path()).context("lock")?;
        other.token = "someone else".into();
        std::fs::write(path(dir.path()), serde_json::to_vec(&other)?)?;
        std::thread::sleep(Duration::from_millis(200));
        assert!(lock.lost.load(Ordering::SeqCst));
        drop(lock);
        assert_eq!(read(dir.path()).map(|h| h.token), Some("someone else".into()), "not ours to remove");
        Ok(())
    }
}
