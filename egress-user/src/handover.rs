//! Reloading without a gap: on SIGHUP the daemon hands its running data
//! path over to a new image of itself (the binary at its path, so an
//! upgrade, reading its settings again), as nginx does on a binary upgrade.
//!
//! A restart detaches the programs for a moment, and the host's stack
//! answers a TCP segment arriving then with a reset. A reload does not:
//! the outgoing daemon pins its XDP or TCX link in the state directory (a
//! clsact filter, on kernels without TCX, stays where it is) and execs;
//! the new image loads its programs, on the same pinned state, and swaps
//! them into that link (`BPF_LINK_UPDATE`) or filter atomically, so every
//! packet meets one program or the other. What the outgoing daemon would
//! undo on its way out (the interface's sysctls, the next hops' managed
//! neighbour entries) goes over in an environment variable, so that the
//! last daemon still leaves the host as the first found it.
//!
//! A handover not completed is undone: the pinned link or the filter goes
//! (the data path detaches) and the sysctls are restored, as a stop would.

use std::{
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::programs::links::{FdLink, PinnedLink};
use serde::{Deserialize, Serialize};

use crate::{
    clsact::HandedClsact,
    datapath::{Attached, TC_PROGRAM},
    neighbours,
    sysctl::Sysctls,
};

/// The environment variable the handover's undo list travels in.
pub const ENV: &str = "EGRESS_HANDOVER";
const PIN_PREFIX: &str = "handover-";

/// What the outgoing daemon set up and a successor must undo on its way
/// out: undone on drop unless taken apart by the successor.
#[derive(Serialize, Deserialize)]
pub struct Handover {
    /// Where the link is pinned.
    pub state_dir: PathBuf,
    /// sysctl files and the values they had before the first daemon.
    pub sysctls: Vec<(PathBuf, String)>,
    /// Next hops looked at: interface index, address, and whether a daemon
    /// marked the entry managed.
    pub next_hops: Vec<(u32, Ipv4Addr, bool)>,
    /// The clsact filter left attached (kernels without TCX: no link).
    pub clsact: Option<HandedClsact>,
}

impl Handover {
    /// The handover this image was started with, if any (a fresh start
    /// has none).
    pub fn receive() -> Option<Self> {
        let text = std::env::var_os(ENV)?;
        // SAFETY: single-threaded yet (read first thing in `main`).
        unsafe { std::env::remove_var(ENV) };
        match serde_json::from_str(&text.to_string_lossy()) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("{ENV}: not a handover ({e}); ignored");
                None
            }
        }
    }

    /// The value of [`ENV`] for the successor.
    pub fn to_env(&self) -> anyhow::Result<String> {
        serde_json::to_string(self).context("cannot write the handover down")
    }

    /// The sysctls to restore on the way out, taken from the handover.
    pub fn take_sysctls(&mut self) -> Sysctls {
        Sysctls::saved(std::mem::take(&mut self.sysctls))
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        drop_links(&self.state_dir);
        if let Some(clsact) = self.clsact.take() {
            clsact.undo(TC_PROGRAM);
        }
        drop(Sysctls::saved(std::mem::take(&mut self.sysctls)));
        for (ifindex, hop, _) in self.next_hops.drain(..).filter(|&(_, _, marked)| marked) {
            if let Err(e) = neighbours::forget(ifindex, hop) {
                tracing::debug!(next_hop = %hop, "cannot remove the managed neighbour entry: {e}");
            }
        }
    }
}

/// Where the link of `hook` on interface `ifindex` is pinned in `dir`.
pub fn pin_path(dir: &Path, hook: Attached, ifindex: u32) -> PathBuf {
    dir.join(format!("{PIN_PREFIX}{}-{ifindex}", hook.slug()))
}

/// A link a previous image left pinned, no longer pinned: it detaches when
/// dropped, unless a program takes it over.
pub struct HandedLink {
    pub hook: Attached,
    pub ifindex: u32,
    pub link: FdLink,
}

/// Takes the links previous images left pinned in `dir` (normally one).
pub fn take_links(dir: &Path) -> anyhow::Result<Vec<HandedLink>> {
    let mut links = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(links),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((hook, ifindex)) = parse_pin_name(name) else {
            continue;
        };
        let link = PinnedLink::from_pin(&path)
            .with_context(|| format!("cannot open the handed-over link {}", path.display()))?
            .unpin()
            .with_context(|| format!("cannot unpin {}", path.display()))?;
        links.push(HandedLink {
            hook,
            ifindex,
            link,
        });
    }
    Ok(links)
}

/// Detaches the links pinned in `dir` for a successor that is not coming.
fn drop_links(dir: &Path) {
    match take_links(dir) {
        Ok(links) if !links.is_empty() => {
            tracing::warn!("the handover did not complete: detached the data path");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot detach the handed-over data path: {e:#}"),
    }
}

fn parse_pin_name(name: &str) -> Option<(Attached, u32)> {
    let (slug, ifindex) = name.strip_prefix(PIN_PREFIX)?.rsplit_once('-')?;
    let hook = [Attached::NativeXdp, Attached::GenericXdp, Attached::Tcx]
        .into_iter()
        .find(|h| h.slug() == slug)?;
    Some((hook, ifindex.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_name_reads_back() {
        for hook in [Attached::NativeXdp, Attached::GenericXdp, Attached::Tcx] {
            let path = pin_path(Path::new("/x"), hook, 17);
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(parse_pin_name(name), Some((hook, 17)));
        }
        for other in [
            "FLOWS",
            "handover-",
            "handover-tcx",
            "handover-clsact-3",
            "handover-tcx-x",
        ] {
            assert_eq!(parse_pin_name(other), None, "{other}");
        }
    }
}
