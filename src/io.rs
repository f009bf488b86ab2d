//! Files written so that no reader ever sees half of one, and the stamps results and locks carry: the host
//! name, the wall clock, whether a process is alive. Below results, locks and data alike (they all write files).

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: temp file + fsync + rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// The wall clock as RFC 3339 (UTC, seconds).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// This machine's host name (`unknown` where it cannot be read).
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether process `pid` exists on this host.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Writes one line to stderr in a single `write`: lines of processes that share a stderr (the `--jobs`
/// children, the ranks under `mpirun`) never interleave within a line (a pipe write of up to `PIPE_BUF`
/// bytes is atomic), which `eprintln!` (one write per formatted piece) does not promise.
pub fn say_line(line: &str) {
    let mut b = String::with_capacity(line.len() + 1);
    b.push_str(line);
    b.push('\n');
    let _ = std::io::stderr().lock().write_all(b.as_bytes());
}

/// `eprintln!` whose line reaches stderr in one write (see [`say_line`]).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::io::say_line(&format!($($arg)*)) };
}
