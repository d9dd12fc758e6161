//! Namespaces owned by one test (`Lab`), and running things inside them.

use crate::daemon::Daemon;
use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Every namespace name starts with this, then the owning pid: that is how a
/// later run recognises leftovers of a killed one.
const PREFIX: &str = "egt-";

/// Runs `cmd` (split on whitespace, no quoting) in namespace `ns` and returns
/// its stdout; a non-zero exit is an error carrying stderr.
pub fn exec(ns: &str, cmd: &str) -> Result<String> {
    let out = exec_output(ns, cmd)?;
    if !out.status.success() {
        bail!(
            "[{ns}] {cmd}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` as [`exec`] does, whatever its exit status.
pub fn exec_output(ns: &str, cmd: &str) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd.split_whitespace())
        .output()
        .with_context(|| format!("[{ns}] {cmd}: cannot start"))
}

/// Runs `ip` commands (each without its leading `ip`) in namespace `ns`
/// through one `ip -n NS -batch -`, stopping at the first that fails:
/// one process where [`exec`] starts two a command, and one mount of
/// /sys for `ns` where it makes one each (0.4 s apiece on Linux 6.1 under
/// emulation).
pub fn ip_batch(ns: &str, cmds: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("[{ns}] ip -batch: cannot start"))?;
    let script = cmds.join("\n") + "\n";
    child
        .stdin
        .take()
        .context("ip -batch: no stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "[{ns}] ip -batch: {}\n{script}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Sets the sysctl at `path` (under /proc/sys, as `net/ipv4/...`) in
/// namespace `ns`, from a thread inside it: /proc/sys/net shows the
/// namespace of the thread that looks, and no process is started.
pub fn sysctl(ns: &str, path: &str, value: &str) -> Result<()> {
    let file = Path::new("/proc/sys").join(path);
    in_netns(ns, || std::fs::write(&file, value))?
        .with_context(|| format!("[{ns}] write {value} to {}", file.display()))
}

/// The index of interface `name` in namespace `ns`.
pub fn ifindex(ns: &str, name: &str) -> Result<u32> {
    in_netns(ns, || nix::net::if_::if_nametoindex(name))?
        .with_context(|| format!("[{ns}] no interface {name}"))
}

/// Runs `f` on a thread that has joined namespace `ns`; sockets it creates
/// stay in `ns` wherever they are used afterwards.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).with_context(|| format!("open {path}"))?;
            setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns {path}"))?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Namespaces and a log directory that are removed on drop, panic or not
/// (the directory is kept after a failure). Processes still running inside
/// the namespaces are killed first.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    dir: PathBuf,
    keep_dir: AtomicBool,
}

impl Lab {
    pub fn new() -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self {
            prefix,
            namespaces: Vec::new(),
            dir,
            keep_dir: AtomicBool::new(false),
        })
    }

    /// Creates namespace `<prefix>-<role>` with loopback up and returns its name.
    pub fn add_ns(&mut self, role: &str) -> Result<String> {
        let name = format!("{}-{role}", self.prefix);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name.clone());
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        Ok(name)
    }

    /// Directory for logs and scratch files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A directory for a gateway's pinned state, on a BPF filesystem of
    /// this lab's own (mounted on first use, unmounted on drop). Not under
    /// /sys/fs/bpf: `ip netns exec` mounts a fresh /sys for each command,
    /// which would hide that from a gateway started again.
    pub fn state_dir(&self) -> Result<PathBuf> {
        let bpffs = self.dir.join(BPFFS_DIR);
        if !bpffs.exists() {
            std::fs::create_dir(&bpffs)?;
            mount(
                Some("bpf"),
                &bpffs,
                Some("bpf"),
                MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("mount bpffs on {}", bpffs.display()))?;
        }
        Ok(bpffs.join("state"))
    }

    /// Passes `result` through; an error keeps the directory for a look at
    /// the logs (a later run removes it) and says where it is.
    pub fn keep_logs_on_err<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.keep_dir.store(true, Ordering::Relaxed);
        }
        result.with_context(|| format!("logs in {}", self.dir.display()))
    }

    /// Starts `program args` (args split on whitespace) in `ns`, logging to
    /// `<dir>/<role>-<name>.log`.
    pub fn spawn(
        &self,
        ns: &str,
        name: &str,
        program: impl AsRef<OsStr>,
        args: &str,
    ) -> Result<Daemon> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args.split_whitespace());
        let role = ns
            .strip_prefix(&self.prefix)
            .unwrap_or(ns)
            .trim_start_matches('-');
        Daemon::spawn(name, cmd, &self.dir.join(format!("{role}-{name}.log")))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            delete_ns(ns);
        }
        unmount_bpffs(&self.dir);
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.dir.display());
        } else if !self.keep_dir.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Kills what runs in `ns` (never this process), then deletes it.
fn delete_ns(ns: &str) {
    let me = std::process::id();
    for pid in pids_in(ns).into_iter().filter(|&pid| pid != me) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    if let Err(e) = run(Command::new("ip").args(["netns", "del", ns])) {
        eprintln!("cleanup: {e}");
    }
}

fn pids_in(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes namespaces and log directories left by test processes that no
/// longer exist (killed before their `Lab` could drop).
fn remove_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next().filter(|n| is_stale(n)) {
                delete_ns(name);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(is_stale) {
                unmount_bpffs(&entry.path());
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The lab directory's BPF filesystem mount point.
const BPFFS_DIR: &str = "bpffs";

/// Unmounts a lab directory's BPF filesystem, if it has one; its pins go
/// with it.
fn unmount_bpffs(lab_dir: &Path) {
    let _ = umount2(&lab_dir.join(BPFFS_DIR), MntFlags::MNT_DETACH);
}

/// `egt-<pid>-...` whose pid is gone.
fn is_stale(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}
