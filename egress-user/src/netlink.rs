//! Just enough netlink for the daemon and `egress check`: requests with
//! their answers (routes, links, qdiscs, generic-netlink families), and a
//! socket subscribed to link and address notifications. Hand-written over
//! libc: the messages are a fixed header plus type-length-value attributes.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
};

/// `struct nlmsghdr` is 16 bytes; messages and attributes align to 4.
const HEADER: usize = size_of::<libc::nlmsghdr>();
const ALIGN: usize = 4;
/// Generic netlink's controller, which resolves family names to ids.
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

fn align(n: usize) -> usize {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

/// One netlink message being built: header, family header, attributes.
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    /// A request of `kind` whose family-specific header is `fixed`.
    pub fn new(kind: u16, fixed: &[u8]) -> Self {
        let mut buf = vec![0; HEADER];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(fixed);
        buf.resize(align(buf.len()), 0);
        Self { buf }
    }

    /// Adds the header flags `flags` (`NLM_F_DUMP`, `NLM_F_CREATE`, ...) to
    /// those of every request.
    pub fn flags(mut self, flags: libc::c_int) -> Self {
        let all = u16::from_ne_bytes([self.buf[6], self.buf[7]]) | flags as u16;
        self.buf[6..8].copy_from_slice(&all.to_ne_bytes());
        self
    }

    /// Appends attribute `kind` holding `data`.
    pub fn attr(mut self, kind: u16, data: &[u8]) -> Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    /// The finished message, its length field filled in.
    fn bytes(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// A message received: its type and what follows the header.
#[derive(Debug)]
pub struct Message {
    pub kind: u16,
    pub payload: Vec<u8>,
}

impl Message {
    /// The attributes after a family header `fixed` bytes long.
    pub fn attrs(&self, fixed: usize) -> Attrs<'_> {
        Attrs(self.payload.get(align(fixed)..).unwrap_or_default())
    }
}

/// Type-length-value attributes, in order; a malformed tail ends them.
#[derive(Clone)]
pub struct Attrs<'a>(&'a [u8]);

impl<'a> Attrs<'a> {
    /// The attributes nested in an attribute's `data`.
    pub fn nested(data: &'a [u8]) -> Self {
        Self(data)
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let len = usize::from(u16::from_ne_bytes(self.0.get(0..2)?.try_into().ok()?));
        // The top bits of the type are the nested / byte-order flags.
        let kind = u16::from_ne_bytes(self.0.get(2..4)?.try_into().ok()?) & 0x3fff;
        let data = self.0.get(4..len)?;
        self.0 = self.0.get(align(len)..).unwrap_or_default();
        Some((kind, data))
    }
}

/// Reads a native-endian integer attribute.
pub fn attr_u32(data: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(0..4)?.try_into().ok()?))
}

/// The messages in one datagram.
fn split(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf.get(4..6)?.try_into().ok()?);
        let payload = buf.get(HEADER..len)?;
        buf = buf.get(align(len)..).unwrap_or_default();
        Some((kind, payload))
    })
}

pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// A socket of netlink `protocol` (`NETLINK_ROUTE`, `NETLINK_GENERIC`)
    /// receiving the multicast `groups` (0 for none).
    pub fn open(protocol: libc::c_int, groups: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if groups != 0 {
            // SAFETY: all-zero is a valid `sockaddr_nl`.
            let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = groups;
            // SAFETY: `addr` is a valid `sockaddr_nl` of the given size.
            let bound = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_nl>() as u32,
                )
            };
            if bound < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { fd })
    }

    /// Makes `recv` return `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self) -> io::Result<()> {
        // SAFETY: fcntl(2) on a descriptor we own; results are checked.
        let flags = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0
            || unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }
                < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram into `buf`; its length.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends `request` and collects the answer up to the kernel's
    /// acknowledgement (or the end of a dump); a negative acknowledgement
    /// is the error it carries.
    pub fn request(&self, request: Request) -> io::Result<Vec<Message>> {
        const SEQ: u32 = 1;
        let bytes = request.bytes(SEQ);
        // SAFETY: `bytes` is readable for its length.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut answer = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, payload) in split(&buf[..n]) {
                match i32::from(kind) {
                    libc::NLMSG_DONE => return Ok(answer),
                    libc::NLMSG_ERROR => {
                        let errno = payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                            .ok_or_else(|| io::Error::other("short netlink error message"))?;
                        return match errno {
                            0 => Ok(answer),
                            e => Err(io::Error::from_raw_os_error(-e)),
                        };
                    }
                    _ => answer.push(Message {
                        kind,
                        payload: payload.to_vec(),
                    }),
                }
            }
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Notifications of what can change the interface or a route: links, IPv4
/// addresses, routes and rules, and neighbours (`RTMGRP_*`), for the tokio
/// loop.
pub struct HostEvents {
    sock: tokio::io::unix::AsyncFd<Socket>,
}

impl HostEvents {
    pub fn subscribe() -> io::Result<Self> {
        let groups = (libc::RTMGRP_LINK
            | libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV4_RULE
            | libc::RTMGRP_NEIGH) as u32;
        let sock = Socket::open(libc::NETLINK_ROUTE, groups)?;
        sock.set_nonblocking()?;
        // SAFETY: `Socket` owns its descriptor and always returns it from
        // `as_raw_fd`; it stays open for as long as the `AsyncFd` holds it.
        let sock = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE)
        }?;
        Ok(Self { sock })
    }

    /// Waits until something changed, then takes every pending
    /// notification; says whether a link or address, or a route, was among
    /// them (both, if notifications were lost to a full socket buffer,
    /// `ENOBUFS`). What changed is not parsed further: the caller looks
    /// again.
    pub async fn changed(&mut self) -> io::Result<Changed> {
        let mut buf = vec![0u8; 32 * 1024];
        let mut guard = self.sock.readable().await?;
        let mut changed = Changed::default();
        loop {
            match guard.get_inner().recv(&mut buf) {
                Ok(n) => {
                    for (kind, _) in split(&buf[..n]) {
                        match kind {
                            libc::RTM_NEWLINK
                            | libc::RTM_DELLINK
                            | libc::RTM_NEWADDR
                            | libc::RTM_DELADDR => changed.interface = true,
                            libc::RTM_NEWROUTE | libc::RTM_DELROUTE => changed.routes = true,
                            _ => {}
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    changed = Changed {
                        interface: true,
                        routes: true,
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    return Ok(changed);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a batch of notifications was about (any of them may also have
/// moved a next hop: the data path's remembered routes go in any case).
#[derive(Clone, Copy, Debug, Default)]
pub struct Changed {
    /// A link or an IPv4 address.
    pub interface: bool,
    pub routes: bool,
}

/// `struct genlmsghdr`: command, version, reserved.
pub fn genl_header(cmd: u8, version: u8) -> [u8; 4] {
    [cmd, version, 0, 0]
}

/// The id of generic-netlink family `name`, or `None` if this kernel has
/// no such family.
pub fn genl_family(sock: &Socket, name: &str) -> io::Result<Option<u16>> {
    let mut cname = name.as_bytes().to_vec();
    cname.push(0);
    let request = Request::new(GENL_ID_CTRL, &genl_header(CTRL_CMD_GETFAMILY, 1))
        .attr(CTRL_ATTR_FAMILY_NAME, &cname);
    let answer = match sock.request(request) {
        Ok(answer) => answer,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(answer.iter().find_map(|m| {
        m.attrs(4).find_map(|(kind, data)| {
            (kind == CTRL_ATTR_FAMILY_ID)
                .then(|| data.get(0..2)?.try_into().ok().map(u16::from_ne_bytes))
                .flatten()
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_and_attributes_round_trip() {
        let bytes = Request::new(42, &[1, 2, 3])
            .attr(7, &[9, 9, 9, 9, 9])
            .attr(8, &5u32.to_ne_bytes())
            .bytes(3);
        // header 16 + fixed 3 padded to 4 + (4 + 5 padded to 12) + 8
        assert_eq!(bytes.len(), 40);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 40);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 3);
        let (kind, payload) = split(&bytes).next().unwrap();
        assert_eq!(kind, 42);
        let message = Message {
            kind,
            payload: payload.to_vec(),
        };
        let attrs: Vec<_> = message.attrs(3).collect();
        assert_eq!(
            attrs,
            vec![(7, &[9u8; 5][..]), (8, &5u32.to_ne_bytes()[..])]
        );
    }
}
