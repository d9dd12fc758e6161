//! ICMP errors about our own tunnel packets: the path MTU toward the peers
//! (RFC 2003 section 5.1, RFC 1191), and peers a router cannot reach.
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
//!
//! The other errors about tunnel packets (a peer unreachable, its tunnel
//! down, a routing loop on the way) are what an operator needs to hear of:
//! returning packets to that peer are lost. The servers that sent them
//! hear of it too ([`crate::tunnel_relay`]).

use std::{
    borrow::Cow,
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
    lost, and returning packets too big for that path are lost with it (TCP stalls); \
    routers' errors about the tunnel are not reported";

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
const ICMP_FRAG_NEEDED: u8 = 4;
/// Classic BPF `ret #0`: every packet is refused.
const REFUSE_ALL: SockFilter = SockFilter::new(0x06, 0, 0, 0);
/// Errors are taken at most this often: each "fragmentation needed"
/// retires every remembered route, and a flood of forged errors must not
/// keep them retired.
const PACE: Duration = Duration::from_millis(250);
/// Errors taken off the queue per round: a flood must not hold the
/// daemon's one thread (the rest wait for the next round).
const MAX_DRAIN: usize = 256;
/// How often an error of one kind about a peer is logged again.
const RETELL: Duration = Duration::from_secs(60);

/// What a router said about one of our tunnel packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// "Fragmentation needed", with the router's next-hop MTU as it said it
    /// (0 from a router older than RFC 1191, or always with
    /// `net.ipv4.ip_no_pmtu_disc=1`): the kernel takes no less than
    /// `net.ipv4.route.min_pmtu`.
    TooBig { mtu: u32 },
    /// "Destination unreachable" with another code (0 to 15, the kernel
    /// drops others): net, host, protocol or port (from the peer itself,
    /// which takes no IP-in-IP from us), administratively prohibited.
    Unreachable { code: u8 },
    /// TTL run out on the way (code 0; the kernel drops reassembly
    /// timeouts): a routing loop, or a path too long.
    TimeExceeded,
    /// Our header refused as malformed.
    ParameterProblem,
}

impl Kind {
    /// Every kind's name, in the order of [`Kind::index`].
    pub const NAMES: [&str; 4] = [
        "fragmentation_needed",
        "unreachable",
        "time_exceeded",
        "parameter_problem",
    ];

    pub fn index(self) -> usize {
        match self {
            Self::TooBig { .. } => 0,
            Self::Unreachable { .. } => 1,
            Self::TimeExceeded => 2,
            Self::ParameterProblem => 3,
        }
    }

    fn of(err: &libc::sock_extended_err) -> Option<Self> {
        if err.ee_origin != libc::SO_EE_ORIGIN_ICMP {
            return None;
        }
        Some(match (err.ee_type, err.ee_code) {
            (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED) => Self::TooBig { mtu: err.ee_info },
            (ICMP_DEST_UNREACH, code) => Self::Unreachable { code },
            (ICMP_TIME_EXCEEDED, _) => Self::TimeExceeded,
            (ICMP_PARAMETERPROB, _) => Self::ParameterProblem,
            _ => return None,
        })
    }
}

/// A router's error about one of our tunnel packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelError {
    /// The quoted packet's destination: the peer.
    pub peer: Ipv4Addr,
    pub kind: Kind,
    /// Who said so.
    pub router: Option<Ipv4Addr>,
    /// What the router quoted of the packet inside ours.
    pub quote: Quote,
}

/// The start of the packet inside one of our tunnel packets, as far as a
/// router quoted it: the kernel hands a raw socket the quote that follows
/// our outer header. Kept up to a whole IP header, options included, and
/// the 8 bytes after it that name a flow (RFC 792).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    bytes: [u8; Quote::MAX],
    len: usize,
}

impl Quote {
    pub const MAX: usize = 60 + 8;

    /// The first [`Quote::MAX`] bytes of `quoted`.
    pub fn new(quoted: &[u8]) -> Self {
        let len = quoted.len().min(Self::MAX);
        let mut bytes = [0; Self::MAX];
        bytes[..len].copy_from_slice(&quoted[..len]);
        Self { bytes, len }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The socket through which the kernel learns the path MTU toward the
/// peers, and the daemon hears of routers' errors about the tunnel.
pub struct TunnelErrors {
    socket: AsyncFd<Socket>,
    last: Option<Instant>,
    told: Told,
}

impl TunnelErrors {
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
            told: Told::default(),
        })
    }

    /// Waits for errors about tunnel packets; returns those from routers
    /// (perhaps none: other queued errors are only drained).
    pub async fn next(&mut self) -> io::Result<Vec<TunnelError>> {
        if let Some(last) = self.last {
            tokio::time::sleep_until(last + PACE).await;
        }
        let mut guard = self.socket.ready(Interest::ERROR).await?;
        let mut errors = Vec::new();
        for _ in 0..MAX_DRAIN {
            match queued(guard.get_inner())? {
                Queued::Router(e) => errors.push(e),
                Queued::Other => {}
                Queued::Empty => {
                    guard.clear_ready();
                    break;
                }
            }
        }
        self.last = Some(Instant::now());
        Ok(errors)
    }

    /// Logs `e`, an error about a peer, unless an error of its kind about
    /// that peer was logged within [`RETELL`]: errors come for every packet
    /// in flight, and forged ones as fast as they are sent (with any MTU or
    /// code: the kind alone bounds what is remembered, and the log).
    pub fn tell(&mut self, e: &TunnelError) {
        if !self.told.due(e, Instant::now()) {
            return;
        }
        let peer = e.peer;
        let from = match e.router {
            Some(r) if r == peer => "the peer".to_owned(),
            Some(r) => r.to_string(),
            None => "a router".to_owned(),
        };
        let lost = "returning packets to the peer are lost";
        match e.kind {
            Kind::TooBig { mtu: 0 } => tracing::info!(
                %peer,
                %from,
                "{from} reports tunnel packets to the peer are too big, naming no MTU (an old \
                 router, or net.ipv4.ip_no_pmtu_disc=1 here): the kernel takes \
                 net.ipv4.route.min_pmtu (`ip route get {peer}` shows it)"
            ),
            Kind::TooBig { mtu } => tracing::info!(
                %peer,
                mtu,
                %from,
                "{from} reports tunnel packets to the peer must fit {mtu} bytes: while the \
                 kernel keeps that path MTU (`ip route get {peer}` shows the MTU in force), \
                 returning packets that would not fit once encapsulated get \"fragmentation \
                 needed\""
            ),
            Kind::Unreachable { code } => tracing::warn!(
                %peer,
                code,
                %from,
                "{from} reports the peer unreachable ({}): {lost}",
                unreachable(code)
            ),
            Kind::TimeExceeded => tracing::warn!(
                %peer,
                %from,
                "{from} reports tunnel packets to the peer ran out of TTL on the way (a \
                 routing loop?): {lost}"
            ),
            Kind::ParameterProblem => tracing::warn!(
                %peer,
                %from,
                "{from} refused tunnel packets to the peer as malformed (parameter problem): \
                 {lost}"
            ),
        }
    }
}

/// When an error of each kind ([`Kind::index`]) about each peer was last
/// logged: at most four entries per peer.
#[derive(Default)]
struct Told(HashMap<(Ipv4Addr, usize), Instant>);

impl Told {
    /// Whether `e` is to be logged `now`, and if so, notes it.
    fn due(&mut self, e: &TunnelError, now: Instant) -> bool {
        let told = (e.peer, e.kind.index());
        if self.0.get(&told).is_some_and(|&at| now < at + RETELL) {
            return false;
        }
        self.0.insert(told, now);
        true
    }
}

/// What an unreachable `code` about a tunnel packet means (RFC 792, 1122,
/// 1812), and for the codes a peer sends itself, what to look at there.
fn unreachable(code: u8) -> Cow<'static, str> {
    Cow::Borrowed(match code {
        0 | 6 | 11 => "network unreachable: a router has no route to it",
        1 | 7 | 12 => "host unreachable: a router has no route to it, or it does not answer ARP",
        2 => {
            "protocol unreachable: the peer takes no IP-in-IP at all (on Linux, the ipip module \
             is not loaded)"
        }
        3 => {
            "port unreachable: the peer takes IP-in-IP, but has no tunnel up whose remote is \
             this gateway's tunnel-local, or a firewall there rejects it"
        }
        9 | 10 | 13 => "administratively prohibited: a firewall on the way refuses it",
        _ => return Cow::Owned(format!("code {code}")),
    })
}

/// One error taken off the queue.
enum Queued {
    Router(TunnelError),
    /// Not from ICMP, of another type, or naming no destination.
    Other,
    /// None left.
    Empty,
}

fn queued(socket: &Socket) -> io::Result<Queued> {
    // The quote after our outer header, as much of it as is kept.
    let mut buf = [0u8; Quote::MAX];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in);
    let flags = MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT;
    let msg = match recvmsg::<SockaddrIn>(socket.as_raw_fd(), &mut iov, Some(&mut space), flags) {
        Ok(msg) => msg,
        Err(nix::Error::EAGAIN) => return Ok(Queued::Empty),
        Err(e) => return Err(e.into()),
    };
    let peer = msg.address.map(|a| a.ip());
    let quoted = msg.bytes;
    let error = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::Ipv4RecvErr(err, offender) => {
            let router = offender.map(|o| Ipv4Addr::from(u32::from_be(o.sin_addr.s_addr)));
            Some((peer?, Kind::of(&err)?, router))
        }
        _ => None,
    });
    Ok(match error {
        Some((peer, kind, router)) => Queued::Router(TunnelError {
            peer,
            kind,
            router,
            quote: Quote::new(&buf[..quoted.min(buf.len())]),
        }),
        None => Queued::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
    const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 1);

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

    #[test]
    fn routers_errors_are_told_apart() {
        let icmp = libc::SO_EE_ORIGIN_ICMP;
        let kind = |t, c, info| Kind::of(&error(icmp, t, c, info));
        assert_eq!(kind(3, 4, 1400), Some(Kind::TooBig { mtu: 1400 }));
        assert_eq!(kind(3, 1, 0), Some(Kind::Unreachable { code: 1 }));
        assert_eq!(kind(3, 2, 0), Some(Kind::Unreachable { code: 2 }));
        assert_eq!(kind(11, 0, 0), Some(Kind::TimeExceeded));
        assert_eq!(kind(12, 0, 0), Some(Kind::ParameterProblem));
        // Another type (the kernel queues none), a local error.
        assert_eq!(kind(5, 0, 0), None);
        let local = libc::SO_EE_ORIGIN_LOCAL;
        assert_eq!(Kind::of(&error(local, 3, 4, 1400)), None);
        // One metric label each.
        let indices = [
            Kind::TooBig { mtu: 0 },
            Kind::Unreachable { code: 0 },
            Kind::TimeExceeded,
            Kind::ParameterProblem,
        ]
        .map(Kind::index);
        assert_eq!(indices, [0, 1, 2, 3]);
    }

    #[test]
    fn each_kind_of_error_about_a_peer_is_logged_once_a_minute() {
        let other = Ipv4Addr::new(10, 0, 2, 10);
        let error = |peer, kind| TunnelError {
            peer,
            kind,
            router: Some(ROUTER),
            quote: Quote::new(&[]),
        };
        let mut told = Told::default();
        let start = Instant::now();
        assert!(told.due(&error(PEER, Kind::TooBig { mtu: 1400 }), start));
        // Forged errors with every MTU and code: none logged, none kept.
        for n in 0..=u16::MAX {
            let at = start + Duration::from_micros(u64::from(n));
            assert!(!told.due(&error(PEER, Kind::TooBig { mtu: n.into() }), at));
        }
        assert!(told.due(&error(PEER, Kind::Unreachable { code: 1 }), start));
        assert!(!told.due(&error(PEER, Kind::Unreachable { code: 3 }), start));
        assert!(told.due(&error(other, Kind::Unreachable { code: 1 }), start));
        assert_eq!(told.0.len(), 3);
        // A minute on, each is logged again.
        let later = start + RETELL;
        assert!(told.due(&error(PEER, Kind::TooBig { mtu: 1300 }), later));
        assert!(told.due(&error(PEER, Kind::Unreachable { code: 1 }), later));
    }
}
