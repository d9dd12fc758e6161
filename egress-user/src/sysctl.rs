//! Per-interface kernel settings the data path depends on, set for the
//! daemon's lifetime and restored on exit so the host is left as found.

use std::path::PathBuf;

use anyhow::Context as _;

/// What the gateway needs on its interface, and why:
/// - `forwarding`: `bpf_fib_lookup` refuses to route packets arriving on an
///   interface without forwarding, and the kernel fallback path (next hop
///   not yet resolved) forwards them itself.
/// - `accept_local`: that fallback hands the kernel packets whose source is
///   already our own (translation or tunnel) address.
pub const NEEDED: [(&str, &str); 2] = [("forwarding", "1"), ("accept_local", "1")];

/// `net.ipv4.conf.<iface>` in /proc/sys (of this process's namespace).
pub fn conf_dir(iface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{iface}"))
}

pub struct Sysctls {
    saved: Vec<(PathBuf, String)>,
}

impl Sysctls {
    /// Sets what [`NEEDED`] lists on `iface`. On an error, what was set
    /// already is restored (as the returned value is on drop).
    pub fn apply(iface: &str) -> anyhow::Result<Self> {
        let mut applied = Self { saved: Vec::new() };
        for (key, value) in NEEDED {
            let path = conf_dir(iface).join(key);
            let old = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let old = old.trim().to_owned();
            if old != value {
                std::fs::write(&path, value)
                    .with_context(|| format!("cannot set {} to {value}", path.display()))?;
                tracing::info!("set net.ipv4.conf.{iface}.{key}={value} (was {old})");
                applied.saved.push((path, old));
            }
        }
        Ok(applied)
    }
}

impl Sysctls {
    /// Values to restore on drop: `(file, value)`.
    pub fn saved(saved: Vec<(PathBuf, String)>) -> Self {
        Self { saved }
    }

    /// Restores `earlier`'s values on drop too (set by a daemon before this
    /// one, which found them set already).
    pub fn adopt(&mut self, mut earlier: Self) {
        earlier.saved.append(&mut self.saved);
        self.saved = std::mem::take(&mut earlier.saved);
    }

    /// Gives up the saved values without restoring them: the interface
    /// they belong to is gone, or they go to a successor.
    pub fn forget(mut self) -> Vec<(PathBuf, String)> {
        std::mem::take(&mut self.saved)
    }
}

impl Drop for Sysctls {
    fn drop(&mut self) {
        for (path, old) in self.saved.drain(..).rev() {
            match std::fs::write(&path, &old) {
                Ok(()) => tracing::info!("restored {} to {old}", path.display()),
                Err(e) => tracing::warn!("could not restore {} to {old}: {e}", path.display()),
            }
        }
    }
}
