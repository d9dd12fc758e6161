//! The clsact qdisc the TC program hangs from: added when missing and, so
//! the host is left as found, removed on drop only if we added it.

use std::{io, mem::size_of, os::fd::FromRawFd as _, os::fd::OwnedFd};

use anyhow::Context as _;
use aya::programs::tc;

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
            Err(e) => tracing::warn!("could not remove the clsact qdisc we added: {e}"),
        }
    }
}

/// `struct tcmsg` (linux/rtnetlink.h).
#[repr(C)]
struct TcMsg {
    family: u8,
    _pad: [u8; 3],
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

#[repr(C)]
struct DelQdisc {
    header: libc::nlmsghdr,
    tc: TcMsg,
}

/// `RTM_DELQDISC` for the clsact qdisc, waiting for the kernel's answer
/// (aya can add the qdisc but not remove it).
fn delete_clsact(ifindex: u32) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = DelQdisc {
        header: libc::nlmsghdr {
            nlmsg_len: size_of::<DelQdisc>() as u32,
            nlmsg_type: libc::RTM_DELQDISC,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        tc: TcMsg {
            family: libc::AF_UNSPEC as u8,
            _pad: [0; 3],
            ifindex: ifindex as i32,
            handle: CLSACT_HANDLE,
            parent: TC_H_CLSACT,
            info: 0,
        },
    };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // SAFETY: `request` is a fully initialised message of the given size.
    let sent = unsafe { libc::send(raw, (&raw const request).cast(), size_of::<DelQdisc>(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The answer is an NLMSG_ERROR carrying 0 (success) or a negative errno.
    let mut answer = [0u8; 256];
    // SAFETY: `answer` is a writable buffer of the given size.
    let n = unsafe { libc::recv(raw, answer.as_mut_ptr().cast(), answer.len(), 0) };
    let header = size_of::<libc::nlmsghdr>();
    if n < (header + 4) as isize {
        return Err(io::Error::other("short netlink answer"));
    }
    let errno = i32::from_ne_bytes(answer[header..header + 4].try_into().expect("4 bytes"));
    match errno {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}
