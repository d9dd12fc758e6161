//! One run of a QEMU VM that boots a kernel on the host's own root file
//! system (shared read-only over 9p), runs a script and powers off; see
//! `initrd`'s init for the guest's side.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::workspace::Workspace;

/// How the guest's CPUs run.
#[derive(Clone, Copy, Debug)]
pub enum Accel {
    Kvm,
    /// Software emulation: slow, and works everywhere.
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        }
    }
}

pub struct Vm {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Extra kernel command line: what the guest's init reads.
    pub append: String,
    /// Shared writable with the guest, tag `out`.
    pub out_dir: PathBuf,
    /// Where the kernel's console (ttyS0) is written.
    pub console_log: PathBuf,
}

pub enum Outcome {
    /// The guest's script ran to its end (it leaves its results in the
    /// `out` share).
    Finished,
    /// The guest said nothing within the boot deadline, or QEMU ended first.
    NoBoot(String),
}

/// The guest's first line, once its init runs.
const UP: &str = "egress-vm: Linux ";
/// Its last, once the script has ended.
const EXIT: &str = "egress-vm: exit ";

impl Vm {
    /// Boots the VM and passes each line of the guest's output to
    /// `on_line`. Fails if the VM runs past `limit` (killed) or stops
    /// without its script's status (a kernel panic, say).
    pub fn run(
        &self,
        ws: &Workspace,
        accel: Accel,
        boot_limit: Duration,
        limit: Duration,
        mut on_line: impl FnMut(&str),
    ) -> Result<Outcome> {
        let mut qemu = self.spawn(ws, accel)?;
        let stdout = qemu.stdout.take().expect("stdout is piped");
        let (lines, received) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if lines.send(line).is_err() {
                    break;
                }
            }
        });

        let started = Instant::now();
        let mut booted = false;
        let mut finished = false;
        let mut last = String::new();
        loop {
            let deadline = if booted { limit } else { boot_limit.min(limit) };
            let left = deadline.saturating_sub(started.elapsed());
            match received.recv_timeout(left) {
                Ok(line) => {
                    booted |= line.starts_with(UP);
                    finished |= line.starts_with(EXIT);
                    on_line(&line);
                    last = line;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    stop(&mut qemu);
                    if !booted {
                        return Ok(Outcome::NoBoot(format!(
                            "no word from the guest within {} s",
                            boot_limit.as_secs()
                        )));
                    }
                    bail!(
                        "the VM did not finish within {} s and was killed; its last line: \
                         {last:?}; the kernel console's last lines ({}):\n{}",
                        limit.as_secs(),
                        self.console_log.display(),
                        tail(&self.console_log, 20)
                    );
                }
            }
        }
        let exit = qemu.wait()?;
        if finished {
            Ok(Outcome::Finished)
        } else if !booted {
            Ok(Outcome::NoBoot(format!(
                "QEMU ended ({exit}) before the guest spoke"
            )))
        } else {
            bail!(
                "the VM stopped before its script finished (QEMU: {exit}); the kernel console's \
                 last lines ({}):\n{}",
                self.console_log.display(),
                tail(&self.console_log, 20)
            )
        }
    }

    fn spawn(&self, ws: &Workspace, accel: Accel) -> Result<Child> {
        let accel: &[&str] = match accel {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg,thread=single", "-cpu", "max"],
        };
        let share = |path: &Path, tag: &str, extra: &str| {
            format!(
                "local,path={},mount_tag={tag},security_model=none{extra}",
                path.display()
            )
        };
        ws.command("qemu-system-x86_64")
            .args(accel)
            .args(["-smp", "2", "-m", "4096", "-nodefaults", "-display", "none"])
            .args(["-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            // panic=-1: a panicking kernel reboots at once, which
            // -no-reboot turns into QEMU's exit.
            .arg(format!("console=ttyS0 panic=-1 loglevel=6 {}", self.append))
            .arg("-virtfs")
            .arg(share(
                Path::new("/"),
                "hostroot",
                ",readonly=on,multidevs=remap",
            ))
            .arg("-virtfs")
            .arg(share(&self.out_dir, "out", ""))
            .arg("-serial")
            .arg(format!("file:{}", self.console_log.display()))
            .args(["-serial", "stdio"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")
    }
}

fn stop(qemu: &mut Child) {
    // Already gone is fine: either way it is reaped below.
    let _ = qemu.kill();
    let _ = qemu.wait();
}

/// The last `n` lines of a file, or a note that it cannot be read.
fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({e})"),
    }
}
