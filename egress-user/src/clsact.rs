//! The TC program's attachment on kernels without TCX (before 6.6): a
//! netlink filter on the clsact qdisc's ingress. The qdisc is added when
//! missing and, so the host is left as found, removed on drop only if we
//! added it. Unlike a link, a filter outlives the process that added it,
//! so ours sits at a fixed place and a leftover one is removed before
//! attaching.

use std::io;

use anyhow::Context as _;
use aya::programs::tc::{self, NlOptions, TcAttach, TcAttachType, TcHandle};

use crate::netlink::{Request, Socket};

/// `TC_H_CLSACT`: the clsact qdisc's parent, and (major part) its handle.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;

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

/// Removes the filters running `program` that a gateway which did not exit
/// cleanly (killed, crashed) left on `iface`'s clsact ingress, at any
/// priority (versions before TCX support let the kernel pick one): they
/// would go on running its program beside ours. Filters are matched by the
/// program name their loader gave them, so other programs' stay.
pub fn remove_leftovers(iface: &str, ifindex: u32, program: &str) -> anyhow::Result<()> {
    match tc::qdisc_detach_program(ifindex, TcAttachType::Ingress.into(), program) {
        Ok(()) => {
            tracing::warn!(
                "removed the {program} filter that a gateway which did not exit cleanly \
                 (killed or crashed) left on {iface}'s clsact ingress"
            );
            Ok(())
        }
        // None there, or no clsact qdisc at all.
        Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!("cannot look for a leftover {program} filter on {iface}'s clsact ingress")
        }),
    }
}

pub struct Clsact {
    ifindex: u32,
    added: bool,
}

impl Clsact {
    pub fn ensure(iface: &str, ifindex: u32) -> anyhow::Result<Self> {
        let added = match tc::qdisc_add_clsact(ifindex) {
            Ok(()) => {
                tracing::info!("added the clsact qdisc to {iface}");
                true
            }
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                tracing::info!("{iface} already has a clsact qdisc; it stays after we exit");
                false
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot add a clsact qdisc to {iface}"));
            }
        };
        Ok(Self { ifindex, added })
    }
}

impl Drop for Clsact {
    fn drop(&mut self) {
        if !self.added {
            return;
        }
        match delete_clsact(self.ifindex) {
            Ok(()) => tracing::info!("removed the clsact qdisc we added"),
            // The interface went away, and its qdiscs with it.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => tracing::warn!("could not remove the clsact qdisc we added: {e}"),
        }
    }
}

/// `RTM_DELQDISC` for the clsact qdisc (aya can add the qdisc but not
/// remove it).
fn delete_clsact(ifindex: u32) -> io::Result<()> {
    // `struct tcmsg`: family, 3 pad bytes, ifindex, handle, parent, info.
    let mut tcmsg = [0u8; 20];
    tcmsg[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    tcmsg[8..12].copy_from_slice(&CLSACT_HANDLE.to_ne_bytes());
    tcmsg[12..16].copy_from_slice(&TC_H_CLSACT.to_ne_bytes());
    Socket::open(libc::NETLINK_ROUTE, 0)?
        .request(Request::new(libc::RTM_DELQDISC, &tcmsg))
        .map(drop)
}
