//! The clsact qdisc the TC program hangs from: added when missing and, so
//! the host is left as found, removed on drop only if we added it.

use std::io;

use anyhow::Context as _;
use aya::programs::tc;

use crate::netlink::{Request, Socket};

/// `TC_H_CLSACT`: the clsact qdisc's parent, and (major part) its handle.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;

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
