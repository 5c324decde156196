//! Processes the runner starts and may find again later: pid files in the state directory,
//! what `/proc` says of a pid, and stopping one within a grace period.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Hands each line the child writes to its piped stdout and stderr to `each`, as it comes,
/// until the child closes them.
pub fn forward_lines(
    child: &mut tokio::process::Child,
    each: impl Fn(String) + Clone + Send + 'static,
) {
    use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
    let streams: [Option<Box<dyn AsyncRead + Unpin + Send>>; 2] = [
        child.stdout.take().map(|s| Box::new(s) as _),
        child.stderr.take().map(|s| Box::new(s) as _),
    ];
    for stream in streams.into_iter().flatten() {
        let each = each.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                each(line);
            }
        });
    }
}

/// Whether `pid` is a live process (a zombie, dead but not yet reaped, is not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The command line of `pid`, its arguments joined by spaces.
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    Some(text.trim_end().to_owned())
}

/// Sends `signal` (a name such as `TERM`) to `pid`; a negative pid names a process group.
pub fn signal(pid: i64, signal: &str) -> bool {
    std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// SIGTERM, then SIGKILL if `pid` is still alive after `grace`. Returns true if it had to be
/// killed.
pub async fn stop(pid: u32, grace: Duration) -> bool {
    if !alive(pid) {
        return false;
    }
    signal(i64::from(pid), "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(i64::from(pid), "KILL");
    true
}

/// A file holding the pid of a process started by the runner, so that a later run (or
/// `platform down`) can find what an earlier one left running.
#[derive(Clone, Debug)]
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, pid: u32) -> std::io::Result<()> {
        if let Some(dir) = self.0.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&self.0, format!("{pid}\n"))
    }

    /// The pid recorded, whether or not it is still alive.
    pub fn read(&self) -> Option<u32> {
        std::fs::read_to_string(&self.0)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The pid recorded when that process is alive and its command line contains `marker`
    /// (so that a pid reused by an unrelated process is not taken for ours).
    pub fn live(&self, marker: &str) -> Option<u32> {
        self.read()
            .filter(|pid| alive(*pid))
            .filter(|pid| command_line(*pid).is_some_and(|c| c.contains(marker)))
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether something listens on 127.0.0.1:`port`.
pub fn port_taken(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_found_by_its_pid_file() {
        let dir = std::env::temp_dir().join(format!("pidfile-{}", std::process::id()));
        let file = PidFile::new(dir.join("me.pid"));
        file.write(std::process::id()).expect("write");
        assert_eq!(file.read(), Some(std::process::id()));
        let me = command_line(std::process::id()).expect("own command line");
        assert!(file.live(&me).is_some());
        assert!(file.live("no such command line").is_none());
        file.remove();
        assert_eq!(file.read(), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_pid_that_is_not_running_is_not_alive() {
        // Above the kernel's largest pid (4194304).
        assert!(!alive(4_999_999));
    }
}
