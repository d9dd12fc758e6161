//! Per-interface kernel settings the data path depends on, set while it
//! runs (after the daemon too) and restored when it is removed, so the
//! host is left as found (see `host_changes`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::netif;

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

/// A sysctl file of interface `ifindex` that the gateway set, and the
/// value it had before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSysctl {
    pub ifindex: u32,
    pub path: PathBuf,
    pub value: String,
}

impl SavedSysctl {
    /// Whether `other` is about the same file of the same interface.
    pub fn same_setting(&self, other: &Self) -> bool {
        (self.ifindex, &self.path) == (other.ifindex, &other.path)
    }
}

/// Sets what [`NEEDED`] lists on `iface` (index `ifindex`), each file that
/// differs: `record` hears of them, with the values they have, before any
/// is written. Returns them. On an error, what was set already is
/// restored.
pub fn apply(
    iface: &str,
    ifindex: u32,
    record: impl FnOnce(&[SavedSysctl]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<SavedSysctl>> {
    let mut changes = Vec::new();
    for (key, value) in NEEDED {
        let path = conf_dir(iface).join(key);
        let old = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let old = old.trim();
        if old != value {
            changes.push(SavedSysctl {
                ifindex,
                path,
                value: old.to_owned(),
            });
        }
    }
    if changes.is_empty() {
        return Ok(changes);
    }
    record(&changes)?;
    for (done, change) in changes.iter().enumerate() {
        let value = needed(&change.path);
        if let Err(e) = std::fs::write(&change.path, value) {
            restore(changes[..done].to_vec());
            return Err(e)
                .with_context(|| format!("cannot set {} to {value}", change.path.display()));
        }
        let key = change.path.file_name().unwrap_or_default().display();
        tracing::info!(
            "set net.ipv4.conf.{iface}.{key}={value} (was {})",
            change.value
        );
    }
    Ok(changes)
}

/// The value [`NEEDED`] gives the file at `path`.
fn needed(path: &Path) -> &'static str {
    let key = path.file_name().and_then(|k| k.to_str());
    NEEDED
        .iter()
        .find(|(k, _)| Some(*k) == key)
        .map_or("1", |(_, v)| v)
}

/// Writes the saved values back, last set first; skips those of an
/// interface that is gone (or replaced under its name: a new index),
/// whose settings went with it.
pub fn restore(saved: Vec<SavedSysctl>) {
    for s in saved.into_iter().rev() {
        // `…/conf/IFACE/key`
        let iface = s
            .path
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str());
        let current = iface.and_then(netif::index_of);
        if current != Some(s.ifindex) {
            tracing::info!(
                "{} is of an interface that is gone: not restored",
                s.path.display()
            );
            continue;
        }
        match std::fs::write(&s.path, &s.value) {
            Ok(()) => tracing::info!("restored {} to {}", s.path.display(), s.value),
            Err(e) => tracing::warn!("could not restore {} to {}: {e}", s.path.display(), s.value),
        }
    }
}
