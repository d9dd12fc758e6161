//! Reloading without a gap: on SIGHUP the daemon hands its running data
//! path over to a new image of itself (the binary at its path, so an
//! upgrade, reading its settings again), as nginx does on a binary
//! upgrade: the same process, so systemd follows it.
//!
//! The data path's link is pinned and the host changes are recorded in
//! the state directory all along (see `links`, `host_changes`), so the
//! new image starts as any start does: it takes the pinned link over.
//! What goes across the exec, in an environment variable, is only that
//! this is a reload (`--reset-state` is ignored then) and, from a daemon
//! of a version whose data path did not outlive it, that daemon's list of
//! what to undo, which goes into the record.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{clsact::ClsactRecord, host_changes::HostChanges, netif, sysctl::SavedSysctl};

/// The environment variable the handover travels in.
pub const ENV: &str = "EGRESS_HANDOVER";

/// What a reloading daemon tells its new image. The shape of the versions
/// before the data path outlived the daemon, whose lists a new image
/// records; this version's are empty (an older binary reads them too,
/// after a rollback).
#[derive(Serialize, Deserialize)]
pub struct Handover {
    state_dir: PathBuf,
    /// sysctl files and the values they had before the first daemon.
    sysctls: Vec<(PathBuf, String)>,
    /// Next hops looked at: interface index, address, and whether a daemon
    /// marked the entry managed.
    next_hops: Vec<(u32, Ipv4Addr, bool)>,
    /// The clsact filter left attached (kernels without TCX: no link).
    clsact: Option<ClsactRecord>,
}

impl Handover {
    /// For the new image of a daemon on `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            sysctls: Vec::new(),
            next_hops: Vec::new(),
            clsact: None,
        }
    }

    /// The handover this image was started with, if any (a fresh start
    /// has none), its undo list recorded at once, whatever happens next.
    pub fn receive() -> Option<Self> {
        let text = std::env::var_os(ENV)?;
        // SAFETY: single-threaded yet (read first thing in `main`).
        unsafe { std::env::remove_var(ENV) };
        let handover: Self = match serde_json::from_str(&text.to_string_lossy()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("{ENV}: not a handover ({e}); ignored");
                return None;
            }
        };
        if let Err(e) = handover.record() {
            tracing::warn!(
                "{e:#}: `egress down` will not restore what the previous daemon changed on the host"
            );
        }
        Some(handover)
    }

    /// Adds the previous image's undo list to the record in its state
    /// directory.
    fn record(&self) -> anyhow::Result<()> {
        let mut handed = HostChanges {
            sysctls: self
                .sysctls
                .iter()
                .filter_map(|(path, value)| {
                    // `…/conf/IFACE/key`; one of an interface gone is moot.
                    let iface = path.parent()?.file_name()?.to_str()?;
                    Some(SavedSysctl {
                        ifindex: netif::index_of(iface)?,
                        path: path.clone(),
                        value: value.clone(),
                    })
                })
                .collect(),
            next_hops: self
                .next_hops
                .iter()
                .filter(|&&(_, _, marked)| marked)
                .map(|&(ifindex, hop, _)| (ifindex, hop))
                .collect(),
            clsact: self.clsact,
            ..HostChanges::default()
        };
        if handed.is_empty() {
            return Ok(());
        }
        let dir = &self.state_dir;
        let mut changes = HostChanges::load(dir)?;
        changes.add_sysctls(&handed.sysctls);
        for hop in handed.next_hops.drain(..) {
            if !changes.next_hops.contains(&hop) {
                changes.next_hops.push(hop);
            }
        }
        if let Some(clsact) = handed.clsact {
            changes.clsact = Some(clsact.merge(changes.clsact));
        }
        changes
            .store(dir)
            .context("cannot record the previous daemon's host changes")?;
        tracing::info!(dir = %dir.display(), "recorded the host changes the previous daemon handed over");
        Ok(())
    }

    /// The value of [`ENV`] for the new image.
    pub fn to_env(&self) -> anyhow::Result<String> {
        serde_json::to_string(self).context("cannot write the handover down")
    }
}
