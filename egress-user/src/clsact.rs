//! The TC program's attachment on kernels without TCX (before 6.6): a
//! netlink filter on the clsact qdisc's ingress. The qdisc is added when
//! missing and, so the host is left as found, removed with the filter
//! (`egress down`) only if a gateway added it; both are recorded before
//! they are made (see [`ClsactRecord::intent`]). A filter outlives the
//! process that added it, as the data path must (see `links`), and ours
//! sits at a fixed place: the next daemon (a start, or a reload's new
//! image) swaps its program into the filter there, and the gateway's
//! filters elsewhere (from versions that let the kernel pick the place)
//! are removed before attaching.

use std::io;

use anyhow::Context as _;
use aya::programs::{
    TcAttachType,
    links::Link as _,
    tc::{self, NlOptions, SchedClassifierLink, TcAttach, TcHandle},
};
use serde::{Deserialize, Serialize};

use crate::netlink::{Attrs, Request, Socket, attr_u32};

/// `TC_H_CLSACT`: the clsact qdisc's parent, and (major part) its handle.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// clsact's ingress: `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`.
const INGRESS: u32 = 0xffff_fff2;
/// `struct tcmsg`: family, 3 pad bytes, ifindex, handle, parent, info.
const TCMSG_LEN: usize = 20;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;

/// Our filter's priority ("EG"): one no tool picks by itself (`tc` numbers
/// filters added without one from 49152 down), so a filter there is ours,
/// and below those it runs first, as the old automatic priority did.
pub const PRIORITY: u16 = 0x4547;
/// Our filter's handle at [`PRIORITY`].
pub const HANDLE: TcHandle = TcHandle::new(0, 1);

/// The filter on clsact ingress at our priority and handle; attaching
/// fails (`EEXIST`) rather than stacking if a filter is already there.
pub fn ingress_filter() -> TcAttach {
    TcAttach::Netlink {
        parent: TcAttachType::Ingress.into(),
        options: NlOptions {
            priority: PRIORITY,
            handle: HANDLE,
            classid: None,
        },
    }
}

/// Our filter's place, as a link whose program can be replaced in place
/// (netlink's filter change: packets meet the old program or the new).
pub fn ours(ifindex: u32) -> io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(
        ifindex,
        TcAttachType::Ingress.into(),
        PRIORITY,
        HANDLE,
        None,
    )
}

/// What [`remove_leftovers`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Our filter is there, and stays.
    pub kept_ours: bool,
    /// The filters removed.
    pub removed: usize,
}

/// Removes the filters running `program` on `iface`'s clsact ingress but
/// the one at our place if `keep_ours`. Such filters are left by an
/// exited daemon at ours (its data path outlives it) and by versions
/// before TCX support at any priority: they would go on running their
/// program beside ours.
/// Filters are matched by the program name their loader gave them, so
/// other programs' stay.
pub fn remove_leftovers(
    iface: &str,
    ifindex: u32,
    program: &str,
    keep_ours: bool,
) -> anyhow::Result<Leftovers> {
    let context =
        || format!("cannot look for a leftover {program} filter on {iface}'s clsact ingress");
    let mut found = Leftovers::default();
    for Filter {
        priority, handle, ..
    } in filters(ifindex, program).with_context(context)?
    {
        if keep_ours && (priority, handle) == (PRIORITY, u32::from(HANDLE)) {
            found.kept_ours = true;
            continue;
        }
        SchedClassifierLink::attached(
            ifindex,
            TcAttachType::Ingress.into(),
            priority,
            TcHandle::from(handle),
            None,
        )
        .map_err(anyhow::Error::from)
        .and_then(|l| Ok(l.detach()?))
        .with_context(context)?;
        tracing::warn!(
            "removed the {program} filter (pref {priority}, handle {handle:#x}) that a gateway \
             left on {iface}'s clsact ingress"
        );
        found.removed += 1;
    }
    Ok(found)
}

/// A running gateway's filter on `ifindex`'s clsact ingress: one running
/// `program` that a live process other than this one holds open. (A
/// stopped or killed daemon's, or one across a reload's exec, is held by
/// the filter alone.) Returns its program's id and the holder's pid.
pub fn running_gateway(ifindex: u32, program: &str) -> io::Result<Option<(u32, u32)>> {
    for filter in filters(ifindex, program)? {
        if let Some(pid) = holder(filter.program_id)? {
            return Ok(Some((filter.program_id, pid)));
        }
    }
    Ok(None)
}

/// A process other than this one with the BPF program `id` open, if any:
/// each `anon_inode:bpf-prog` fd's fdinfo names its program's id.
fn holder(id: u32) -> io::Result<Option<u32>> {
    let me = std::process::id();
    let wanted = format!("prog_id:\t{id}\n");
    let pids = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me);
    for pid in pids {
        // Processes that exit, or that we may not look into, are skipped.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_program = std::fs::read_link(fd.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-prog");
            let info = || {
                let fd = fd.file_name();
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.display()))
            };
            if is_program && info().is_ok_and(|info| info.contains(&wanted)) {
                return Ok(Some(pid));
            }
        }
    }
    Ok(None)
}

/// A filter on clsact ingress.
struct Filter {
    priority: u16,
    handle: u32,
    program_id: u32,
}

/// The filters running `program` on `ifindex`'s clsact ingress.
fn filters(ifindex: u32, program: &str) -> io::Result<Vec<Filter>> {
    let mut tcmsg = [0u8; TCMSG_LEN];
    tcmsg[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    tcmsg[12..16].copy_from_slice(&INGRESS.to_ne_bytes());
    let dump = Request::new(libc::RTM_GETTFILTER, &tcmsg).flags(libc::NLM_F_DUMP);
    let answer = match Socket::open(libc::NETLINK_ROUTE, 0)?.request(dump) {
        Ok(answer) => answer,
        // No clsact qdisc, or no such interface: no filters.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)
            ) =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let name = [program.as_bytes(), b"\0"].concat();
    Ok(answer
        .iter()
        .filter(|m| m.kind == libc::RTM_NEWTFILTER)
        .filter_map(|m| {
            let mut attrs = m.attrs(TCMSG_LEN);
            if !attrs.clone().any(|(k, d)| k == TCA_KIND && d == b"bpf\0") {
                return None;
            }
            let options = attrs.find_map(|(k, d)| (k == TCA_OPTIONS).then_some(d))?;
            if !Attrs::nested(options).any(|(k, d)| k == TCA_BPF_NAME && d == name) {
                return None;
            }
            let handle = attr_u32(m.payload.get(8..12)?)?;
            let info = attr_u32(m.payload.get(16..20)?)?;
            // Each priority's head is listed too, with no handle.
            (handle != 0).then_some(Filter {
                priority: (info >> 16) as u16,
                handle,
                program_id: Attrs::nested(options)
                    .filter(|(k, _)| *k == TCA_BPF_ID)
                    .find_map(|(_, d)| attr_u32(d))?,
            })
        })
        .collect())
}

/// Our filter on an interface's clsact ingress, which outlives the daemon
/// (see `host_changes`), and whether a gateway added the qdisc it hangs
/// from (to remove with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClsactRecord {
    pub ifindex: u32,
    pub added: bool,
}

impl ClsactRecord {
    /// What attaching our filter to `iface` (index `ifindex`) may leave,
    /// to record before the attach makes anything (see `host_changes`):
    /// the filter, and the clsact qdisc, which [`Self::ensure`] adds if
    /// the interface has none now. (Only a `tc` run at the same moment
    /// can make this look and that add disagree.)
    pub fn intent(iface: &str, ifindex: u32) -> anyhow::Result<Self> {
        let there = has_qdisc(ifindex)
            .with_context(|| format!("cannot look for a clsact qdisc on {iface}"))?;
        Ok(Self {
            ifindex,
            added: !there,
        })
    }

    /// Adds the clsact qdisc to `iface` (index `ifindex`) if it has none.
    pub fn ensure(iface: &str, ifindex: u32) -> anyhow::Result<Self> {
        let added = match tc::qdisc_add_clsact(ifindex) {
            Ok(()) => {
                tracing::info!("added the clsact qdisc to {iface}");
                true
            }
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                tracing::info!("{iface} already has a clsact qdisc; it stays after the gateway");
                false
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot add a clsact qdisc to {iface}"));
            }
        };
        Ok(Self { ifindex, added })
    }

    /// The same filter after `other` was recorded for it: a gateway added
    /// the qdisc if either says so.
    pub fn merge(self, other: Option<Self>) -> Self {
        let added = other.is_some_and(|o| o.ifindex == self.ifindex && o.added);
        Self {
            added: self.added || added,
            ..self
        }
    }

    /// Removes the filter, and the qdisc if a gateway added it; either
    /// may be gone already (or never made: recorded before the attach).
    /// Returns whether it removed a filter.
    pub fn undo(self, program: &str) -> bool {
        let iface = format!("interface {}", self.ifindex);
        // None on an interface that is gone.
        let removed = match remove_leftovers(&iface, self.ifindex, program, false) {
            Ok(found) => found.removed > 0,
            Err(e) => {
                tracing::warn!("{e:#}");
                false
            }
        };
        if self.added {
            match delete_clsact(self.ifindex) {
                Ok(()) => tracing::info!("removed the clsact qdisc a gateway added"),
                // No such interface, no qdisc, or the builtin one left
                // after a delete (handle 0).
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)
                    ) => {}
                Err(e) => tracing::warn!("could not remove the clsact qdisc a gateway added: {e}"),
            }
        }
        removed
    }
}

/// Whether `ifindex` has a qdisc in clsact's place: clsact, or `ingress`,
/// which keeps clsact out (adding it fails with `EEXIST` as when there).
fn has_qdisc(ifindex: u32) -> io::Result<bool> {
    let mut tcmsg = [0u8; TCMSG_LEN];
    tcmsg[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    let dump = Request::new(libc::RTM_GETQDISC, &tcmsg).flags(libc::NLM_F_DUMP);
    let answer = Socket::open(libc::NETLINK_ROUTE, 0)?.request(dump)?;
    // A dump may list every interface's.
    Ok(answer
        .iter()
        .filter(|m| m.kind == libc::RTM_NEWQDISC)
        .any(|m| {
            m.payload.get(4..8).and_then(attr_u32) == Some(ifindex)
                && m.payload.get(12..16).and_then(attr_u32) == Some(TC_H_CLSACT)
        }))
}

/// `RTM_DELQDISC` for the clsact qdisc (aya can add the qdisc but not
/// remove it).
fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let mut tcmsg = [0u8; TCMSG_LEN];
    tcmsg[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    tcmsg[8..12].copy_from_slice(&CLSACT_HANDLE.to_ne_bytes());
    tcmsg[12..16].copy_from_slice(&TC_H_CLSACT.to_ne_bytes());
    Socket::open(libc::NETLINK_ROUTE, 0)?
        .request(Request::new(libc::RTM_DELQDISC, &tcmsg))
        .map(drop)
}
