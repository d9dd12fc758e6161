//! A long-running child process with its output in a log file, stopped on drop.

use anyhow::{Context, Result, bail};
use aya::programs::loaded_programs;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(50);
/// How long a daemon gets to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

pub struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stdout and stderr appended to `log`. It gets its own
    /// process group so a terminal's Ctrl-C reaches only our process, which
    /// then stops it in order.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// The process id (programs that exec the next, like `ip netns exec`
    /// and `env`, keep it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process (a gateway reloads on SIGHUP).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), signal)
            .with_context(|| format!("send {signal} to {}", self.name))
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; the error shows the log if the
    /// process exits or `timeout` passes first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_times(needle, 1, timeout)
    }

    /// As [`Daemon::wait_for`], until the log contains `needle` `times`
    /// times (a process that execs itself logs on).
    pub fn wait_for_times(&mut self, needle: &str, times: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= times {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?} {times} time(s); its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not log {needle:?} {times} time(s) within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Daemon {
    /// Sends SIGTERM and waits up to `timeout` for the process to exit;
    /// returns how it exited.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        // Already reaped: its pid may belong to another process by now.
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit by itself, for at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops the process: SIGTERM first so it can clean up (the gateway
    /// detaches XDP), SIGKILL if it has not exited after a grace period.
    pub fn stop(&mut self) {
        if self.terminate(GRACE).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Kills the process with SIGKILL, as a crash or the OOM killer ends
    /// it: no chance to clean up. Returns once it is reaped.
    pub fn kill(&mut self) -> Result<()> {
        self.child
            .kill()
            .with_context(|| format!("kill {}", self.name))?;
        self.child.wait()?;
        Ok(())
    }
}

impl Daemon {
    /// The names of the BPF programs the process holds open, sorted: each
    /// `anon_inode:bpf-prog` fd's fdinfo names its program's id.
    pub fn bpf_programs(&self) -> Result<Vec<String>> {
        let pid = self.pid();
        let dir = format!("/proc/{pid}/fd");
        let mut ids = Vec::new();
        for fd in std::fs::read_dir(&dir).with_context(|| format!("list {dir}"))? {
            let fd = fd?;
            if !std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog")
            {
                continue;
            }
            let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().display());
            let info = std::fs::read_to_string(&info).with_context(|| format!("read {info}"))?;
            let id = info
                .lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse::<u32>().ok())
                .with_context(|| format!("no prog_id in {info}"))?;
            ids.push(id);
        }
        let mut names: Vec<String> = loaded_programs()
            .filter_map(|p| p.ok())
            .filter(|p| ids.contains(&p.id()))
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect();
        names.sort();
        Ok(names)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
