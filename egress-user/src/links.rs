//! The data path's XDP or TCX link, pinned in the state directory for as
//! long as the gateway is up (the Cilium or Calico model: the data path
//! lives in the kernel, the daemon is its control plane). Pinned, the
//! link stays attached after the daemon exits however it exits (a stop, an
//! error, a crash, `kill -9`), translating on the pinned state, so no
//! packet of a flow meets the host's stack, which would answer a TCP
//! segment to a translated port with a reset. The next daemon (a start, or
//! a reload's new image) swaps its programs into the link
//! (`BPF_LINK_UPDATE`: each packet meets one program or the other);
//! `egress down` detaches it. The daemon holds the link open too, so that
//! the state directory removed by hand under it does not detach it (it is
//! pinned again, see `Gateway::keep_state_pinned`).
//!
//! The pin is named `handover-HOOK-IFINDEX`, as in the versions that
//! pinned it only across a reload's exec: those take it over too, after a
//! rollback.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::programs::links::{FdLink, PinnedLink};

use crate::{datapath::Attached, netif};

const PIN_PREFIX: &str = "handover-";

/// Where the link of `hook` on interface `ifindex` is pinned in `dir`.
pub fn pin_path(dir: &Path, hook: Attached, ifindex: u32) -> PathBuf {
    dir.join(format!("{PIN_PREFIX}{}-{ifindex}", hook.slug()))
}

/// A link pinned in a state directory, held open.
pub struct Pinned {
    pub hook: Attached,
    pub ifindex: u32,
    pub path: PathBuf,
    pub link: FdLink,
}

impl Pinned {
    /// The id of the program the link runs.
    pub fn program(&self) -> anyhow::Result<u32> {
        Ok(self
            .link
            .info()
            .with_context(|| format!("cannot read the link pinned at {}", self.path.display()))?
            .program_id())
    }

    /// Detaches the link: its pin goes, and then this, its last holder
    /// (but a daemon's that still holds it).
    pub fn detach(self) -> anyhow::Result<()> {
        fs::remove_file(&self.path)
            .with_context(|| format!("cannot unpin {}", self.path.display()))?;
        let iface = netif::name_of(self.ifindex)
            .unwrap_or_else(|| format!("interface {} (gone)", self.ifindex));
        tracing::info!(
            "detached the {} program from {iface} (its link was pinned at {})",
            self.hook.as_str(),
            self.path.display()
        );
        Ok(())
    }
}

/// The links pinned in `dir` (normally one).
pub fn pinned(dir: &Path) -> anyhow::Result<Vec<Pinned>> {
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
            .with_context(|| format!("cannot open the link pinned at {}", path.display()))?
            .into();
        links.push(Pinned {
            hook,
            ifindex,
            path,
            link,
        });
    }
    Ok(links)
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
            "HOST_CHANGES",
            "handover-",
            "handover-tcx",
            "handover-clsact-3",
            "handover-tcx-x",
        ] {
            assert_eq!(parse_pin_name(other), None, "{other}");
        }
    }
}
