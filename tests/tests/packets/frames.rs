//! Frames built, and checked, with etherparse: an implementation of the
//! wire formats independent of the gateway's own.

use egress_common::tcp;
use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpHeaders, IpNumber, Ipv4Header, PacketBuilder,
    SlicedPacket, TransportSlice,
};
/// The RFC 1071 checksum, written out (the tests make and check headers
/// etherparse refuses).
pub use tests::ipip::checksum;

/// TCP PSH, which the gateway does not track.
pub const PSH: u8 = 0x08;

/// A transport header and payload for [`ip_packet`].
#[derive(Clone, Copy)]
pub enum L4<'a> {
    Tcp {
        sport: u16,
        dport: u16,
        /// TCP flags, as in the header (`egress_common::tcp`).
        flags: u8,
        /// Raw option bytes, a multiple of 4 long.
        options: &'a [u8],
        payload: &'a [u8],
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: &'a [u8],
    },
    EchoRequest {
        id: u16,
        seq: u16,
    },
    EchoReply {
        id: u16,
        seq: u16,
    },
}

impl<'a> L4<'a> {
    /// A TCP SYN without payload.
    pub fn syn(sport: u16, dport: u16) -> Self {
        Self::segment(sport, dport, tcp::SYN, b"")
    }

    /// A TCP segment of an established connection.
    pub fn tcp(sport: u16, dport: u16, payload: &'a [u8]) -> Self {
        Self::segment(sport, dport, tcp::ACK | PSH, payload)
    }

    /// A TCP segment with `flags`.
    pub fn segment(sport: u16, dport: u16, flags: u8, payload: &'a [u8]) -> Self {
        L4::Tcp {
            sport,
            dport,
            flags,
            options: b"",
            payload,
        }
    }

    /// A TCP segment with `flags` and raw `options`, without payload.
    pub fn with_options(sport: u16, dport: u16, flags: u8, options: &'a [u8]) -> Self {
        L4::Tcp {
            sport,
            dport,
            flags,
            options,
            payload: b"",
        }
    }

    /// The same with the source port (or echo request identifier) `port`,
    /// as the gateway translates it outbound.
    pub fn with_sport(self, port: u16) -> Self {
        match self {
            L4::Tcp {
                dport,
                flags,
                options,
                payload,
                ..
            } => L4::Tcp {
                sport: port,
                dport,
                flags,
                options,
                payload,
            },
            L4::Udp { dport, payload, .. } => L4::Udp {
                sport: port,
                dport,
                payload,
            },
            L4::EchoRequest { seq, .. } => L4::EchoRequest { id: port, seq },
            L4::EchoReply { .. } => unreachable!("replies are not translated outbound"),
        }
    }

    /// The reply to this packet (from a client) to `port` (or echo
    /// identifier), as its flow's return traffic carries it.
    pub fn reply_to(self, port: u16) -> Self {
        match self {
            L4::Tcp { dport, payload, .. } => L4::tcp(dport, port, payload),
            L4::Udp { dport, payload, .. } => L4::Udp {
                sport: dport,
                dport: port,
                payload,
            },
            L4::EchoRequest { seq, .. } => L4::EchoReply { id: port, seq },
            L4::EchoReply { .. } => unreachable!("flows start with a request"),
        }
    }

    /// The source port, or echo identifier.
    pub fn sport(self) -> u16 {
        match self {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => sport,
            L4::EchoRequest { id, .. } | L4::EchoReply { id, .. } => id,
        }
    }
}

/// IPv4 header fields the tests vary.
#[derive(Clone, Copy)]
pub struct Ip {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub id: u16,
    pub df: bool,
    pub tos: u8,
}

impl Ip {
    pub fn new(src: [u8; 4], dst: [u8; 4]) -> Self {
        Self {
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            df: true,
            tos: 0,
        }
    }

    fn header(&self) -> Ipv4Header {
        let mut h = Ipv4Header::new(0, self.ttl, IpNumber::TCP, self.src, self.dst).unwrap();
        h.identification = self.id;
        h.dont_fragment = self.df;
        h.dscp = etherparse::IpDscp::try_new(self.tos >> 2).unwrap();
        h.ecn = etherparse::IpEcn::try_new(self.tos & 3).unwrap();
        h
    }
}

/// A complete IPv4 packet with correct checksums.
pub fn ip_packet(ip: Ip, l4: L4) -> Vec<u8> {
    let b = PacketBuilder::ip(IpHeaders::Ipv4(ip.header(), Default::default()));
    let mut out = Vec::new();
    match l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            options,
            payload,
        } => {
            let mut b = b.tcp(sport, dport, 1000, 64240);
            if !options.is_empty() {
                b = b.options_raw(options).unwrap();
            }
            let has = |bit| flags & bit != 0;
            if has(tcp::SYN) {
                b = b.syn();
            }
            if has(tcp::FIN) {
                b = b.fin();
            }
            if has(tcp::RST) {
                b = b.rst();
            }
            if has(PSH) {
                b = b.psh();
            }
            if has(tcp::ACK) {
                b = b.ack(1);
            }
            b.write(&mut out, payload).unwrap();
        }
        L4::Udp {
            sport,
            dport,
            payload,
        } => b.udp(sport, dport).write(&mut out, payload).unwrap(),
        L4::EchoRequest { id, seq } => b
            .icmpv4_echo_request(id, seq)
            .write(&mut out, b"ping")
            .unwrap(),
        L4::EchoReply { id, seq } => b
            .icmpv4_echo_reply(id, seq)
            .write(&mut out, b"ping")
            .unwrap(),
    }
    out
}

/// The whole IPv4 `packet` cut into fragments at byte offsets `cuts` of its
/// payload (multiples of 8), as a router fragments it (RFC 791): the same
/// header but for the length, more-fragments flag, offset and checksum.
pub fn fragment(packet: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let (header, payload) = Ipv4Header::from_slice(packet).unwrap();
    let bounds: Vec<usize> = [0]
        .into_iter()
        .chain(cuts.iter().copied())
        .chain([payload.len()])
        .collect();
    bounds
        .windows(2)
        .map(|w| {
            let (start, end) = (w[0], w[1]);
            assert_eq!(start % 8, 0, "fragment offsets are in units of 8 bytes");
            let mut h = header.clone();
            h.more_fragments = end < payload.len();
            h.fragment_offset = IpFragOffset::try_new((start / 8) as u16).unwrap();
            h.set_payload_len(end - start).unwrap();
            h.header_checksum = h.calc_header_checksum();
            let mut out = h.to_bytes().to_vec();
            out.extend_from_slice(&payload[start..end]);
            out
        })
        .collect()
}

/// An ICMP error of type `kind` from `ip`, quoting `quote`.
pub fn icmp_error(ip: Ip, kind: etherparse::Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ip(IpHeaders::Ipv4(ip.header(), Default::default()))
        .icmpv4(kind)
        .write(&mut out, quote)
        .unwrap();
    out
}

/// `inner` wrapped in an RFC 2003 outer header.
pub fn encapsulate(outer: Ip, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ip(IpHeaders::Ipv4(outer.header(), Default::default()))
        .write(&mut out, IpNumber::IPV4, inner)
        .unwrap();
    out
}

/// `packet` in an Ethernet II frame.
pub fn ethernet(src: [u8; 6], dst: [u8; 6], packet: &[u8]) -> Vec<u8> {
    let mut out = Ethernet2Header {
        source: src,
        destination: dst,
        ether_type: EtherType::IPV4,
    }
    .to_bytes()
    .to_vec();
    out.extend_from_slice(packet);
    out
}

/// What an independent parser makes of a frame.
pub struct Parsed {
    /// The IPv4 headers, outermost first (two for IP-in-IP).
    pub ips: Vec<Ipv4Header>,
    /// The innermost transport protocol.
    pub proto: IpNumber,
    /// ICMP type, for an ICMP packet.
    pub icmp_type: Option<u8>,
    /// The transport checksum is right (a UDP checksum of 0, "none", counts
    /// as right; so does a fragment's, which covers the whole datagram).
    pub l4_valid: bool,
    /// UDP without a checksum.
    pub udp_none: bool,
}

/// Parses `frame` as every frame the gateway sends must parse: Ethernet II
/// carrying IPv4, possibly IP-in-IP, with total lengths that fit the frame
/// and each other and valid IPv4 header checksums, then a TCP, UDP or ICMP
/// header (whose checksum is reported, not required). `Err` says what is
/// wrong.
pub fn parse(frame: &[u8]) -> Result<Parsed, String> {
    let eth = Ethernet2Header::from_slice(frame)
        .map_err(|e| format!("Ethernet: {e}"))?
        .0;
    if eth.ether_type != EtherType::IPV4 {
        return Err(format!("EtherType {:?}", eth.ether_type));
    }
    let mut ip = &frame[Ethernet2Header::LEN..];
    let mut ips: Vec<Ipv4Header> = Vec::new();
    loop {
        let sliced = SlicedPacket::from_ip(ip).map_err(|e| format!("IPv4: {e}"))?;
        let Some(etherparse::NetSlice::Ipv4(v4)) = &sliced.net else {
            return Err("not IPv4".into());
        };
        let h = v4.header().to_header();
        // Summed over the raw bytes: the parsed header drops the reserved
        // flag bit, which the checksum covers.
        if checksum(v4.header().slice()) != 0 {
            return Err(format!("IPv4 header checksum of {:?}", h.source));
        }
        if let Some(outer) = ips.last()
            && outer.total_len != h.total_len + outer.header_len() as u16
        {
            return Err("inner length disagrees with the outer".into());
        }
        ips.push(h.clone());
        let payload = v4.payload().payload;
        if v4.is_payload_fragmented() {
            // A fragment's transport checksum covers the whole datagram:
            // nothing to check here.
            return Ok(Parsed {
                ips,
                proto: h.protocol,
                icmp_type: None,
                l4_valid: true,
                udp_none: false,
            });
        }
        if v4.payload().ip_number == IpNumber::IPV4 && ips.len() < 2 {
            ip = payload;
            continue;
        }
        let (l4_valid, udp_none, icmp_type) = match sliced.transport {
            Some(TransportSlice::Tcp(t)) => {
                let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
                (t.checksum() == want, false, None)
            }
            Some(TransportSlice::Udp(u)) => {
                let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
                (
                    u.checksum() == want || u.checksum() == 0,
                    u.checksum() == 0,
                    None,
                )
            }
            Some(TransportSlice::Icmpv4(i)) => {
                let want = i.header().icmp_type.calc_checksum(i.payload());
                (i.checksum() == want, false, Some(i.type_u8()))
            }
            other => return Err(format!("transport {other:?}")),
        };
        return Ok(Parsed {
            ips,
            proto: h.protocol,
            icmp_type,
            l4_valid,
            udp_none,
        });
    }
}

/// Parses a frame (IPv4 over Ethernet, possibly IP-in-IP) and verifies every
/// checksum in it: IPv4 headers, TCP, UDP (unless 0) and ICMP, and the IPv4
/// header an ICMP error quotes. A fragment's transport checksum covers the
/// whole datagram: only its IP header's is checked.
pub fn assert_checksums_valid(frame: &[u8]) {
    let parsed = parse(frame).expect("the frame parses");
    assert!(parsed.l4_valid, "transport checksum");
    if matches!(parsed.icmp_type, Some(3 | 11 | 12)) {
        let icmp = Ethernet2Header::LEN + parsed.ips.iter().map(|h| h.header_len()).sum::<usize>();
        let quote = &frame[icmp + 8..];
        let len = usize::from(quote[0] & 0x0f) * 4;
        assert!(len >= 20 && quote.len() >= len, "quoted IPv4 header");
        assert_eq!(checksum(&quote[..len]), 0, "quoted IPv4 header checksum");
    }
}

/// Recomputes the checksum of the IPv4 header at `at` in `frame`, over the
/// length its IHL gives (20 bytes if less).
pub fn fix_ipv4_checksum(frame: &mut [u8], at: usize) {
    let len = usize::from(frame[at] & 0x0f).max(5) * 4;
    frame[at + 10..at + 12].fill(0);
    let check = checksum(&frame[at..at + len]);
    frame[at + 10..at + 12].copy_from_slice(&check.to_be_bytes());
}

/// Adds `n` (ones'-complement) to the 16-bit checksum field at `at`: a
/// checksum that was right becomes wrong by exactly `n`.
pub fn add_to_checksum(frame: &mut [u8], at: usize, n: u16) {
    let field = u16::from_be_bytes([frame[at], frame[at + 1]]);
    let sum = !checksum(&[field.to_be_bytes(), n.to_be_bytes()].concat());
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}
