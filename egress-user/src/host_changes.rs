//! What the gateway changed on the host for its data path, recorded in the
//! state directory: the interface's sysctls (with the values it found),
//! the next hops' neighbour entries it marked managed, and its clsact
//! filter (kernels without TCX) with whether it added the qdisc.
//!
//! The data path outlives the daemon (see `links`), and these changes must
//! stay while it runs; the record outlives the daemon with it, so that
//! `egress down`, or a later daemon that moves the data path elsewhere,
//! leaves the host as the first start found it. It is a one-entry map
//! pinned beside the connection state (a BPF filesystem holds no plain
//! files): it goes where the pinned link goes, with a reboot or the
//! state directory's file system, and a unit's `ProtectSystem=strict`
//! leaves /sys/fs/bpf writable. Each change is recorded before it is
//! made, so a daemon killed in between leaves nothing unrecorded: a
//! clsact filter, and the qdisc its attach adds if the interface has
//! none, as what the attach may leave (`clsact_attaching`), which the
//! attach makes the record of the filter once its data path runs. Undoing
//! takes what was recorded but never made, or removed since, as done.

use std::{io, net::Ipv4Addr, path::Path};

use anyhow::{Context as _, bail};
use aya::maps::{Array, Map, MapData, MapError};
use serde::{Deserialize, Serialize};

use crate::{
    clsact::ClsactRecord,
    datapath::TC_PROGRAM,
    neighbours, pinning,
    sysctl::{self, SavedSysctl},
};

/// The record's pin in the state directory.
pub const PIN: &str = "HOST_CHANGES";
/// Room for the record, as JSON (a few hundred bytes in practice).
const SIZE: usize = 16 * 1024;
type Blob = [u8; SIZE];

/// The host changes in force for a state directory's data path. A field
/// missing from a record (written by a version before the field) is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostChanges {
    /// Interface sysctls set, with the values they had before.
    pub sysctls: Vec<SavedSysctl>,
    /// Neighbour entries marked managed: interface index and next hop.
    pub next_hops: Vec<(u32, Ipv4Addr)>,
    /// The clsact filter left attached, and whether a gateway added its
    /// qdisc.
    pub clsact: Option<ClsactRecord>,
    /// clsact filters being attached, recorded before their attach made
    /// anything: made, not made, or made in part (a daemon killed, or an
    /// attach that failed). Beside `clsact`, which may be another
    /// interface's (the data path moves once the new one runs).
    pub clsact_attaching: Vec<ClsactRecord>,
}

impl HostChanges {
    /// The record in `dir`; none there is an empty one.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(PIN);
        let map = match MapData::from_pin(&path) {
            Ok(map) => map,
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let context = || format!("cannot read {}", path.display());
        let array: Array<_, Blob> =
            Array::try_from(Map::from_map_data(map)?).with_context(context)?;
        let blob = array.get(&0, 0).with_context(context)?;
        let text = blob.split(|&b| b == 0).next().unwrap_or_default();
        if text.is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_slice(text).with_context(context)
    }

    /// Writes the record to `dir`, pinning its map there if it is not (or
    /// no longer: removed by hand); returns whether it pinned it.
    pub fn store(&self, dir: &Path) -> anyhow::Result<bool> {
        let path = dir.join(PIN);
        let context = || format!("cannot record the host changes in {}", path.display());
        let text = serde_json::to_vec(self).with_context(context)?;
        if text.len() >= SIZE {
            bail!("{}: {} bytes, room for {SIZE}", context(), text.len());
        }
        let mut blob = [0u8; SIZE];
        blob[..text.len()].copy_from_slice(&text);
        let (mut array, pinned): (Array<MapData, Blob>, bool) = match MapData::from_pin(&path) {
            Ok(map) => (
                Array::try_from(Map::from_map_data(map)?).with_context(context)?,
                false,
            ),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                let array = Array::<MapData, Blob>::create(1, 0).with_context(context)?;
                array.pin(&path).with_context(context)?;
                let map = MapData::from_pin(&path).with_context(context)?;
                (Array::try_from(Map::from_map_data(map)?)?, true)
            }
            Err(e) => return Err(e).with_context(context),
        };
        array.set(0, &blob, 0).with_context(context)?;
        Ok(pinned)
    }

    /// Removes the record from `dir`.
    pub fn unpin(dir: &Path) -> anyhow::Result<()> {
        pinning::unpin(&dir.join(PIN)).map(drop)
    }

    /// Whether a clsact filter on interface `ifindex` is recorded.
    pub fn has_clsact_on(&self, ifindex: u32) -> bool {
        self.clsact
            .iter()
            .chain(&self.clsact_attaching)
            .any(|c| c.ifindex == ifindex)
    }

    /// Whether there is anything to undo.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Records `saved` (what setting an interface's sysctls changes), but
    /// the values already recorded for them: those are the ones found
    /// before the first change.
    pub fn add_sysctls(&mut self, saved: &[SavedSysctl]) {
        for s in saved {
            if !self.sysctls.iter().any(|r| r.same_setting(s)) {
                self.sysctls.push(s.clone());
            }
        }
    }

    /// Records what a clsact attach may leave (see `datapath::RecordClsact`)
    /// with what an earlier one on its interface recorded: a gateway added
    /// the qdisc if either says so.
    pub fn attaching(&mut self, intent: ClsactRecord) {
        match self
            .clsact_attaching
            .iter_mut()
            .find(|a| a.ifindex == intent.ifindex)
        {
            Some(earlier) => *earlier = intent.merge(Some(*earlier)),
            None => self.clsact_attaching.push(intent),
        }
    }

    /// Drops what is recorded for interface `ifindex` without undoing it:
    /// the interface is gone, and what was set on it with it.
    pub fn forget_interface(&mut self, ifindex: u32) {
        self.sysctls.retain(|s| s.ifindex != ifindex);
        self.next_hops.retain(|&(i, _)| i != ifindex);
        self.clsact.take_if(|c| c.ifindex == ifindex);
        self.clsact_attaching.retain(|a| a.ifindex != ifindex);
    }

    /// The data path runs on interface `ifindex` now, through the clsact
    /// filter `clsact` if it attached so: that is recorded (with what its
    /// attach, and earlier ones, recorded of it), and what is recorded for
    /// other interfaces, or a clsact filter not used, is undone: the data
    /// path no longer runs there.
    pub fn attached(&mut self, ifindex: u32, clsact: Option<ClsactRecord>) {
        let in_force = clsact.map(|c| {
            let intent = self
                .clsact_attaching
                .extract_if(.., |a| a.ifindex == c.ifindex)
                .next();
            c.merge(intent).merge(self.clsact)
        });
        let mut unused = Self {
            sysctls: self
                .sysctls
                .extract_if(.., |s| s.ifindex != ifindex)
                .collect(),
            next_hops: self
                .next_hops
                .extract_if(.., |&mut (i, _)| i != ifindex)
                .collect(),
            clsact: self
                .clsact
                .take_if(|c| c.ifindex != ifindex || clsact.is_none()),
            clsact_attaching: std::mem::take(&mut self.clsact_attaching),
        };
        unused.undo();
        self.clsact = in_force;
    }

    /// Undoes every change recorded, last first: the clsact filters, the
    /// managed neighbour entries, the sysctls. Best effort, each failure
    /// logged; a change on an interface that is gone went with it.
    pub fn undo(&mut self) {
        for clsact in self
            .clsact
            .take()
            .into_iter()
            .chain(self.clsact_attaching.drain(..))
        {
            clsact.undo(TC_PROGRAM);
        }
        for (ifindex, hop) in self.next_hops.drain(..) {
            match neighbours::forget(ifindex, hop) {
                Ok(()) => {
                    tracing::info!(next_hop = %hop, "left the next hop's neighbour entry to the kernel again")
                }
                Err(e) => {
                    tracing::debug!(next_hop = %hop, "cannot remove the managed neighbour entry: {e}")
                }
            }
        }
        sysctl::restore(std::mem::take(&mut self.sysctls));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of a version before a field reads with that field empty.
    #[test]
    fn a_record_without_a_field_reads_it_empty() {
        let record: HostChanges = serde_json::from_str(r#"{"sysctls":[]}"#).unwrap();
        assert_eq!(record, HostChanges::default());
    }

    /// An attach recorded again (a daemon killed part way, then started
    /// again) finds the qdisc the first added: it stays the gateway's.
    #[test]
    fn an_attach_recorded_again_keeps_that_a_gateway_added_the_qdisc() {
        let record = |ifindex, added| ClsactRecord { ifindex, added };
        let mut changes = HostChanges::default();
        changes.attaching(record(2, true));
        changes.attaching(record(2, false));
        changes.attaching(record(3, false));
        assert_eq!(
            changes.clsact_attaching,
            [record(2, true), record(3, false)]
        );
        assert!(changes.has_clsact_on(3) && !changes.has_clsact_on(4));
    }
}
