//! The path MTU toward the peers (RFC 2003 section 5.1, RFC 1191).
//!
//! A router between the gateway and a peer that cannot forward an
//! encapsulated return packet (DF set, copied from the inner header) drops
//! it and answers "fragmentation needed" to the gateway, quoting our outer
//! header. The kernel learns a path MTU from such an error only for an IP
//! protocol with a handler or a raw socket, and a gateway that replaces a
//! kernel ipip tunnel has neither for protocol 4: the error would be lost,
//! and every flow with replies that big would stall (a PMTU black hole).
//!
//! This raw socket for protocol 4 is that handler. The kernel records the
//! MTU as a route exception toward the peer (within its own limits, for
//! `net.ipv4.route.mtu_expires`; `ip route get PEER` shows it),
//! `bpf_fib_lookup` reports it, and the data path answers
//! "fragmentation needed" with that MTU less our header to the Internet host
//! whose packet was too big, as the kernel's ipip tunnel does. The socket
//! takes no packets (a filter refuses them all); with `IP_RECVERR` it takes
//! the errors, which the daemon reads to retire the data path's remembered
//! routes (they would go on answering with the old MTU) and to tell.

use std::{
    collections::HashMap,
    io::{self, IoSliceMut},
    mem::MaybeUninit,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    time::Duration,
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt::Ipv4RecvErr,
};
use socket2::{Domain, Protocol, SockFilter, Socket, Type};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::Instant,
};

/// What the gateway lacks without the socket.
pub const WITHOUT: &str = "\"fragmentation needed\" from a router on the way to a peer is \
    lost, and returning packets too big for that path are lost with it (TCP stalls)";

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// Classic BPF `ret #0`: every packet is refused.
const REFUSE_ALL: SockFilter = SockFilter::new(0x06, 0, 0, 0);
/// Reports are taken at most this often: each retires every remembered
/// route, and a flood of forged errors must not keep them retired.
const PACE: Duration = Duration::from_millis(250);
/// Errors taken off the queue per round: a flood must not hold the
/// daemon's one thread (the rest wait for the next round).
const MAX_DRAIN: usize = 256;
/// How often the same path MTU toward a peer is logged again.
const RETELL: Duration = Duration::from_secs(60);

/// A router's "fragmentation needed" about one of our tunnel packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// The quoted packet's destination: the peer.
    pub peer: Ipv4Addr,
    /// The router's next-hop MTU as it said it (0 from a router older than
    /// RFC 1191): the kernel takes no less than `net.ipv4.route.min_pmtu`.
    pub mtu: u32,
    /// Who said so.
    pub router: Option<Ipv4Addr>,
}

impl Report {
    /// The report in a queued error, if it is a "fragmentation needed".
    fn of(
        err: &libc::sock_extended_err,
        peer: Option<Ipv4Addr>,
        router: Option<Ipv4Addr>,
    ) -> Option<Self> {
        let frag_needed = err.ee_origin == libc::SO_EE_ORIGIN_ICMP
            && err.ee_type == ICMP_DEST_UNREACH
            && err.ee_code == ICMP_FRAG_NEEDED;
        frag_needed.then_some(Self {
            peer: peer?,
            mtu: err.ee_info,
            router,
        })
    }
}

/// The socket through which the kernel learns the path MTU toward the peers.
pub struct PathMtu {
    socket: AsyncFd<Socket>,
    last: Option<Instant>,
    /// What was last logged for each peer, and when.
    told: HashMap<Ipv4Addr, (u32, Instant)>,
}

impl PathMtu {
    /// Opens the socket (needs `CAP_NET_RAW`).
    pub fn open() -> io::Result<Self> {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_IPIP)),
        )?;
        socket.attach_filter(&[REFUSE_ALL])?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, Ipv4RecvErr, &true)?;
        // Packets queued before the filter was attached would sit there.
        while socket.recv(&mut [MaybeUninit::uninit(); 1]).is_ok() {}
        // SAFETY: the socket is owned here and closed only with the AsyncFd.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::ERROR)? };
        Ok(Self {
            socket,
            last: None,
            told: HashMap::new(),
        })
    }

    /// Waits for errors about tunnel packets; returns the "fragmentation
    /// needed" among them (perhaps none: other errors are only drained).
    pub async fn reports(&mut self) -> io::Result<Vec<Report>> {
        if let Some(last) = self.last {
            tokio::time::sleep_until(last + PACE).await;
        }
        let mut guard = self.socket.ready(Interest::ERROR).await?;
        let mut reports = Vec::new();
        for _ in 0..MAX_DRAIN {
            match queued(guard.get_inner())? {
                Queued::Report(r) => reports.push(r),
                Queued::Other => {}
                Queued::Empty => {
                    guard.clear_ready();
                    break;
                }
            }
        }
        self.last = Some(Instant::now());
        Ok(reports)
    }

    /// Logs `r`, a report about a peer, unless its MTU was logged for that
    /// peer within [`RETELL`]: errors come for every packet too big in
    /// flight, and forged ones as fast as they are sent.
    pub fn tell(&mut self, r: &Report) {
        let now = Instant::now();
        if let Some(&(mtu, at)) = self.told.get(&r.peer)
            && mtu == r.mtu
            && now < at + RETELL
        {
            return;
        }
        self.told.insert(r.peer, (r.mtu, now));
        tracing::info!(
            peer = %r.peer,
            mtu = r.mtu,
            router = ?r.router,
            "a router reports tunnel packets to the peer must fit {} bytes: while the kernel \
             keeps that path MTU (`ip route get {}` shows it), returning packets that would \
             not fit once encapsulated get \"fragmentation needed\"",
            r.mtu,
            r.peer
        );
    }
}

/// One error taken off the queue.
enum Queued {
    Report(Report),
    /// Not a "fragmentation needed".
    Other,
    /// None left.
    Empty,
}

fn queued(socket: &Socket) -> io::Result<Queued> {
    // The quoted packet's first bytes come along; they are not needed.
    let mut buf = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in);
    let flags = MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT;
    let msg = match recvmsg::<SockaddrIn>(socket.as_raw_fd(), &mut iov, Some(&mut space), flags) {
        Ok(msg) => msg,
        Err(nix::Error::EAGAIN) => return Ok(Queued::Empty),
        Err(e) => return Err(e.into()),
    };
    let peer = msg.address.map(|a| a.ip());
    let report = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::Ipv4RecvErr(err, offender) => {
            let router = offender.map(|o| Ipv4Addr::from(u32::from_be(o.sin_addr.s_addr)));
            Report::of(&err, peer, router)
        }
        _ => None,
    });
    Ok(report.map_or(Queued::Other, Queued::Report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(origin: u8, kind: u8, code: u8, info: u32) -> libc::sock_extended_err {
        libc::sock_extended_err {
            ee_errno: libc::EMSGSIZE as u32,
            ee_origin: origin,
            ee_type: kind,
            ee_code: code,
            ee_pad: 0,
            ee_info: info,
            ee_data: 0,
        }
    }

    const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
    const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);

    #[test]
    fn only_fragmentation_needed_from_icmp_is_a_report() {
        let icmp = libc::SO_EE_ORIGIN_ICMP;
        let report = Report::of(&error(icmp, 3, 4, 1400), Some(PEER), Some(ROUTER));
        assert_eq!(
            report,
            Some(Report {
                peer: PEER,
                mtu: 1400,
                router: Some(ROUTER)
            })
        );
        // Host unreachable, time exceeded, a local error, no address.
        assert_eq!(Report::of(&error(icmp, 3, 1, 0), Some(PEER), None), None);
        assert_eq!(Report::of(&error(icmp, 11, 0, 0), Some(PEER), None), None);
        let local = libc::SO_EE_ORIGIN_LOCAL;
        assert_eq!(
            Report::of(&error(local, 3, 4, 1400), Some(PEER), None),
            None
        );
        assert_eq!(Report::of(&error(icmp, 3, 4, 1400), None, None), None);
    }
}
