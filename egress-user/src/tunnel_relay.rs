//! Routers' errors about our tunnel packets, passed on to the Internet host
//! whose packet was lost (RFC 2003 section 4.1).
//!
//! For returning traffic the gateway is the tunnel's encapsulator: a reply
//! from a server is translated back and encapsulated to the flow's peer.
//! When a router on the way to the peer cannot deliver it, its error comes
//! to the gateway ([`crate::tunnel_errors`]), quoting our outer header and
//! the start of the translated reply. The server would otherwise wait on a
//! peer that is gone (TCP retransmits until it gives up). So, as RFC 2003
//! asks, the gateway answers the server with "host unreachable" (3/1), from
//! the translation address the server sent to, quoting the server's packet
//! as it was sent: the quoted reply, translated back to the translation
//! address and port. Host, not network, unreachable: the server's packet
//! reached the network of its destination, the gateway's own address.
//!
//! Relayed: "destination unreachable" (its code for the peer does not
//! matter to the server) and "time exceeded" (a loop in the tunnel, which
//! section 4.4 reports as host unreachable). Not relayed: "fragmentation
//! needed" (the data path answers the next packet too big with the path
//! MTU, section 5.1), port unreachable and source route failed (section
//! 4.1: they are about our outer header), and parameter problems (section
//! 4.5: our header is the one at fault). Nor an error without a flow of the
//! peer it was sent to, or about a packet no flow's reply can be (an ICMP
//! error, a later fragment), nor more than [`PER_SECOND`]: a flood of
//! forged errors must not make the gateway a source of one.

use std::{io, net::SocketAddrV4, sync::Arc, time::Instant};

use aya::maps::{HashMap, MapData};
use egress_common::{
    checksum::sum_words,
    config::OUTER_TTL,
    flow::{DIR_OUT, Flow, FlowKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    fragment::IP_OFFSET,
    headers::{
        ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, ICMP_LEN, IPV4_LEN, Ipv4, QUOTE_LEN, TOS_CONTROL,
        icmp_error,
    },
    rewrite::{self, Side},
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    metrics::Collector,
    tunnel_errors::{Kind, TunnelError},
};

/// Relayed errors per second, and the burst that may be saved up: a tenth
/// of Linux's limit on all the errors a host sends (`icmp_msgs_per_sec`,
/// `icmp_msgs_burst`). A lost peer costs each of its flows an error or two.
const PER_SECOND: u32 = 100;
const BURST: u32 = 20;

/// Destination unreachable codes about our outer header, never relayed
/// (RFC 2003 section 4.1): port unreachable (the peer takes no tunnel from
/// us) and source route failed. ("Fragmentation needed" is a kind of its
/// own.)
const OUTER_ONLY: [u8; 2] = [3, 5];
const ICMP_ECHO_REPLY: u8 = 0;
/// The whole error: IP header, ICMP header, quote.
const ERROR_LEN: usize = IPV4_LEN + ICMP_LEN + QUOTE_LEN;

/// What became of a router's error that is relayed by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sent to the server.
    Relayed,
    /// Over [`PER_SECOND`].
    RateLimited,
    /// About a packet of no flow of the peer it was sent to (expired since,
    /// not ours, or forged).
    NoFlow,
    /// The router quoted less than the inner IP header and 8 bytes.
    ShortQuote,
    /// About a packet no flow's reply can be: not TCP, UDP or an echo
    /// reply (an ICMP error, say), with IP options, or a later fragment.
    Unsupported,
    /// The kernel refused to send it (no route to the server, say).
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Relayed,
        Outcome::RateLimited,
        Outcome::NoFlow,
        Outcome::ShortQuote,
        Outcome::Unsupported,
        Outcome::Failed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::RateLimited => "rate_limited",
            Outcome::NoFlow => "no_flow",
            Outcome::ShortQuote => "short_quote",
            Outcome::Unsupported => "unsupported",
            Outcome::Failed => "failed",
        }
    }
}

/// Whether an error of `kind` is passed on to the server.
pub fn relayed(kind: Kind) -> bool {
    match kind {
        Kind::Unreachable { code } => !OUTER_ONLY.contains(&code),
        Kind::TimeExceeded => true,
        Kind::TooBig { .. } | Kind::ParameterProblem => false,
    }
}

/// Relays routers' errors about tunnel packets to the servers.
pub struct Relay {
    flows: HashMap<MapData, FlowKey, Flow>,
    socket: Socket,
    bucket: Bucket,
    metrics: Option<Arc<Collector>>,
}

impl Relay {
    /// Opens the socket the errors leave by (needs `CAP_NET_RAW`).
    pub fn new(
        flows: HashMap<MapData, FlowKey, Flow>,
        metrics: Option<Arc<Collector>>,
    ) -> io::Result<Self> {
        // IPPROTO_RAW: we write the IP header (IP_HDRINCL), so the error
        // leaves from the translation address, and the socket receives
        // nothing. The kernel routes it and fills in the ID.
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            flows,
            socket,
            bucket: Bucket::new(Instant::now()),
            metrics,
        })
    }

    /// Passes `e` on to the server whose packet it is about, if its kind
    /// is relayed; counts and logs what became of it.
    pub fn relay(&mut self, e: &TunnelError) {
        if !relayed(e.kind) {
            return;
        }
        let outcome = match self.send(e) {
            Ok(server) => {
                tracing::debug!(
                    peer = %e.peer,
                    %server,
                    "relayed a router's error about the tunnel as host unreachable"
                );
                Outcome::Relayed
            }
            Err(outcome) => {
                tracing::debug!(
                    peer = %e.peer,
                    outcome = outcome.as_str(),
                    "a router's error about the tunnel not relayed"
                );
                outcome
            }
        };
        if let Some(m) = &self.metrics {
            m.record_relay(outcome);
        }
    }

    fn send(&mut self, e: &TunnelError) -> Result<SocketAddrV4, Outcome> {
        let (key, quote) = quoted_flow(e.quote.bytes())?;
        let flow = self
            .flows
            .get(&key, 0)
            .ok()
            .filter(|f| f.peer_addr == e.peer.octets())
            .ok_or(Outcome::NoFlow)?;
        if !self.bucket.take(Instant::now()) {
            return Err(Outcome::RateLimited);
        }
        let error = host_unreachable(quote, &flow);
        let server = SocketAddrV4::new(flow.remote_addr.into(), 0);
        match self.socket.send_to(&error, &server.into()) {
            Ok(_) => Ok(server),
            Err(err) => {
                tracing::debug!(%server, "cannot send host unreachable: {err}");
                Err(Outcome::Failed)
            }
        }
    }
}

/// The outbound key of the flow whose reply `inner`, the start of a
/// packet we tunnelled, is, and its IP header and 8 bytes: the reply goes
/// from the server to the client, so the key is its addresses and ports
/// swapped. An echo reply's identifier stands in the client's port.
pub fn quoted_flow(inner: &[u8]) -> Result<(FlowKey, &[u8; QUOTE_LEN]), Outcome> {
    let ip: &[u8; IPV4_LEN] = inner
        .get(..IPV4_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(Outcome::ShortQuote)?;
    // The data path translates no packet with options, and a later
    // fragment's "ports" are payload.
    let offset = u16::from_be_bytes([ip[6], ip[7]]) & IP_OFFSET;
    if ip[0] != 0x45 || offset != 0 {
        return Err(Outcome::Unsupported);
    }
    let quote: &[u8; QUOTE_LEN] = inner
        .get(..QUOTE_LEN)
        .and_then(|q| q.try_into().ok())
        .ok_or(Outcome::ShortQuote)?;
    let l4 = &quote[IPV4_LEN..];
    let proto = ip[9];
    let (sport, dport) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => ([l4[0], l4[1]], [l4[2], l4[3]]),
        // Never an error about an ICMP error (RFC 1122 3.2.2).
        IPPROTO_ICMP if (l4[0], l4[1]) == (ICMP_ECHO_REPLY, 0) => ([0; 2], [l4[4], l4[5]]),
        _ => return Err(Outcome::Unsupported),
    };
    let key = FlowKey {
        src: [ip[16], ip[17], ip[18], ip[19]],
        dst: [ip[12], ip[13], ip[14], ip[15]],
        sport: dport,
        dport: sport,
        proto,
        dir: DIR_OUT,
        _pad: [0; 2],
    };
    Ok((key, quote))
}

/// "Host unreachable" from `flow`'s translation address to its server,
/// about the reply `quoted` (from [`quoted_flow`]) as the server sent it:
/// quoting its IP header and 8 bytes with the destination translated back
/// to the translation address and port (echo identifier), and their
/// checksums patched to match.
pub fn host_unreachable(quoted: &[u8; QUOTE_LEN], flow: &Flow) -> [u8; ERROR_LEN] {
    let mut quote = *quoted;
    let (ip, l4) = quote.split_at_mut(IPV4_LEN);
    let ip: &mut [u8; IPV4_LEN] = ip.try_into().expect("an IP header's length");
    let client = rewrite::ipv4(ip, Side::Dst, flow.nat_addr, false);
    let port = flow.nat_port;
    match ip[9] {
        IPPROTO_ICMP => {
            let old = [l4[4], l4[5]];
            let check = rewrite::echo_checksum([l4[2], l4[3]], old, port);
            l4[2..4].copy_from_slice(&check);
            l4[4..6].copy_from_slice(&port);
        }
        proto => {
            let old = [l4[2], l4[3]];
            l4[2..4].copy_from_slice(&port);
            // A TCP checksum lies beyond the 8 bytes quoted.
            if proto == IPPROTO_UDP {
                let pseudo = Some((client, flow.nat_addr));
                let check = rewrite::l4_checksum([l4[6], l4[7]], pseudo, (old, port), true);
                l4[6..8].copy_from_slice(&check);
            }
        }
    }
    let mut error = [0; ERROR_LEN];
    let mut header = [0u16; IPV4_LEN / 2];
    Ipv4 {
        tos: TOS_CONTROL,
        tot_len: ERROR_LEN as u16,
        id: 0,
        df: false,
        ttl: OUTER_TTL,
        proto: IPPROTO_ICMP,
        src: flow.nat_addr,
        dst: flow.remote_addr,
    }
    .write(&mut header);
    for (bytes, word) in error.as_chunks_mut::<2>().0.iter_mut().zip(header) {
        *bytes = word.to_ne_bytes();
    }
    let (icmp, rest) = error[IPV4_LEN..].split_at_mut(ICMP_LEN);
    let icmp: &mut [u8; ICMP_LEN] = icmp.try_into().expect("an ICMP header's length");
    icmp_error(
        ICMP_DEST_UNREACH,
        ICMP_HOST_UNREACH,
        0,
        sum_words(&quote),
        icmp,
    );
    rest.copy_from_slice(&quote);
    error
}

/// A token bucket: [`PER_SECOND`] tokens a second, at most [`BURST`] saved.
struct Bucket {
    /// Tokens, in millionths.
    micros: u64,
    last: Instant,
}

impl Bucket {
    const TOKEN: u64 = 1_000_000;

    fn new(now: Instant) -> Self {
        Self {
            micros: u64::from(BURST) * Self::TOKEN,
            last: now,
        }
    }

    /// Takes a token at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.last).as_micros() as u64;
        self.last = self.last.max(now);
        self.micros = self
            .micros
            .saturating_add(earned.saturating_mul(u64::from(PER_SECOND)))
            .min(u64::from(BURST) * Self::TOKEN);
        if self.micros < Self::TOKEN {
            return false;
        }
        self.micros -= Self::TOKEN;
        true
    }
}

#[cfg(test)]
mod tests {
    //! Replies built by etherparse as the server sent them and as the data
    //! path tunnelled them; the error read back by etherparse.

    use std::time::Duration;

    use etherparse::{
        Icmpv4Slice, Icmpv4Type, IpNumber, Ipv4HeaderSlice, PacketBuilder,
        icmpv4::DestUnreachableHeader,
    };

    use super::*;

    const SERVER: [u8; 4] = [203, 0, 113, 10];
    const NAT: [u8; 4] = [172, 31, 0, 5];
    const CLIENT: [u8; 4] = [192, 168, 250, 2];
    const PEER: [u8; 4] = [10, 0, 1, 10];
    const SERVER_PORT: u16 = 443;
    const NAT_PORT: u16 = 20000;
    const CLIENT_PORT: u16 = 40000;

    #[derive(Clone, Copy)]
    enum L4 {
        Udp,
        Tcp,
        Echo,
    }

    fn flow(proto: u8, remote_port: u16) -> Flow {
        Flow {
            client_addr: CLIENT,
            nat_addr: NAT,
            remote_addr: SERVER,
            peer_addr: PEER,
            client_port: CLIENT_PORT.to_be_bytes(),
            nat_port: NAT_PORT.to_be_bytes(),
            remote_port: remote_port.to_be_bytes(),
            proto,
            ..Flow::default()
        }
    }

    /// The server's reply to `to`:`port`, with every checksum etherparse's.
    fn reply(l4: L4, to: [u8; 4], port: u16) -> Vec<u8> {
        let ip = PacketBuilder::ipv4(SERVER, to, 57);
        let payload = b"the reply the peer never got";
        let mut out = Vec::new();
        match l4 {
            L4::Udp => ip.udp(SERVER_PORT, port).write(&mut out, payload).unwrap(),
            L4::Tcp => ip
                .tcp(SERVER_PORT, port, 0x0102_0304, 64000)
                .ack(0x0a0b_0c0d)
                .write(&mut out, payload)
                .unwrap(),
            L4::Echo => ip
                .icmpv4_echo_reply(port, 7)
                .write(&mut out, payload)
                .unwrap(),
        }
        out
    }

    /// The error about `l4`'s reply, as a router quoting `quoted` bytes of
    /// the tunnelled reply would have it relayed.
    fn error_about(l4: L4, quoted: usize) -> Result<([u8; ERROR_LEN], Vec<u8>), Outcome> {
        let tunnelled = reply(l4, CLIENT, CLIENT_PORT);
        let (key, quote) = quoted_flow(&tunnelled[..quoted])?;
        let f = match l4 {
            L4::Udp => flow(IPPROTO_UDP, SERVER_PORT),
            L4::Tcp => flow(IPPROTO_TCP, SERVER_PORT),
            L4::Echo => flow(IPPROTO_ICMP, 0),
        };
        assert_eq!(key, f.out_key(), "the flow's outbound half");
        Ok((host_unreachable(quote, &f), reply(l4, NAT, NAT_PORT)))
    }

    #[test]
    fn the_server_is_told_host_unreachable_quoting_its_own_packet() {
        for l4 in [L4::Udp, L4::Tcp, L4::Echo] {
            // Linux routers quote up to 576 bytes; RFC 792 asks 8 of L4.
            for quoted in [QUOTE_LEN, 60, 200] {
                let tunnelled_len = reply(l4, CLIENT, CLIENT_PORT).len();
                let (error, sent) = error_about(l4, quoted.min(tunnelled_len)).unwrap();
                let ip = Ipv4HeaderSlice::from_slice(&error).unwrap().to_header();
                assert_eq!((ip.source, ip.destination), (NAT, SERVER));
                assert_eq!(ip.protocol, IpNumber::ICMP);
                assert_eq!(usize::from(ip.total_len), ERROR_LEN);
                assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                assert_eq!((ip.time_to_live, ip.dscp.value() << 2), (64, TOS_CONTROL));
                let icmp = Icmpv4Slice::from_slice(&error[IPV4_LEN..]).unwrap();
                assert_eq!(
                    icmp.icmp_type(),
                    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host)
                );
                assert_eq!(
                    icmp.checksum(),
                    icmp.icmp_type().calc_checksum(icmp.payload())
                );
                // Byte for byte what the server sent, checksums included.
                assert_eq!(icmp.payload(), &sent[..QUOTE_LEN]);
            }
        }
    }

    #[test]
    fn a_udp_reply_without_checksum_is_quoted_without_one() {
        let mut tunnelled = reply(L4::Udp, CLIENT, CLIENT_PORT);
        tunnelled[26..28].fill(0);
        let (_, quote) = quoted_flow(&tunnelled).unwrap();
        let error = host_unreachable(quote, &flow(IPPROTO_UDP, SERVER_PORT));
        let icmp = Icmpv4Slice::from_slice(&error[IPV4_LEN..]).unwrap();
        assert_eq!(icmp.payload()[26..28], [0, 0]);
        assert_eq!(icmp.payload()[22..24], NAT_PORT.to_be_bytes());
        assert_eq!(
            icmp.checksum(),
            icmp.icmp_type().calc_checksum(icmp.payload())
        );
    }

    #[test]
    fn too_short_a_quote_is_not_relayed() {
        for quoted in [0, 8, IPV4_LEN, QUOTE_LEN - 1] {
            assert_eq!(
                error_about(L4::Udp, quoted).err(),
                Some(Outcome::ShortQuote)
            );
        }
    }

    #[test]
    fn no_flow_reply_is_not_relayed() {
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut inner = reply(L4::Udp, CLIENT, CLIENT_PORT);
            edit(&mut inner);
            quoted_flow(&inner).err()
        };
        // IP options (the header's length says 24 bytes).
        assert_eq!(with(&|p| p[0] = 0x46), Some(Outcome::Unsupported));
        // A later fragment.
        assert_eq!(with(&|p| p[7] = 1), Some(Outcome::Unsupported));
        // A first fragment names its flow.
        assert_eq!(with(&|p| p[6] = 0x20), None);
        // Another protocol.
        assert_eq!(with(&|p| p[9] = 47), Some(Outcome::Unsupported));
        // An ICMP error, or an echo request (never a reply).
        for kind in [3, 11, 12, 8] {
            let mut inner = reply(L4::Echo, CLIENT, CLIENT_PORT);
            inner[IPV4_LEN] = kind;
            assert_eq!(quoted_flow(&inner).err(), Some(Outcome::Unsupported));
        }
    }

    #[test]
    fn unreachable_and_time_exceeded_are_relayed_the_rest_not() {
        for code in 0..=15 {
            let kind = Kind::Unreachable { code };
            assert_eq!(relayed(kind), ![3, 5].contains(&code), "code {code}");
        }
        assert!(relayed(Kind::TimeExceeded));
        assert!(!relayed(Kind::TooBig { mtu: 1400 }));
        assert!(!relayed(Kind::ParameterProblem));
    }

    #[test]
    fn the_bucket_allows_a_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(start);
        let allowed = (0..1000).filter(|_| bucket.take(start)).count();
        assert_eq!(allowed, BURST as usize);
        // A second on: that second's worth, and no more.
        let later = start + Duration::from_secs(1);
        let allowed = (0..1000).filter(|_| bucket.take(later)).count();
        assert_eq!(allowed, PER_SECOND.min(BURST) as usize);
        // Paced at the rate, every one.
        let step = Duration::from_secs(1) / PER_SECOND;
        assert!((1..=1000).all(|i| bucket.take(later + step * i)));
        // Time that runs backwards earns nothing.
        assert!(!bucket.take(start));
    }
}
