//! The header rewrites of a translation, as functions of the header bytes:
//! the data path applies them to packet memory, the host tests (and the
//! property tests below) to packets built by an independent library.

use crate::checksum::Incremental;

/// Which end of the packet a translation rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Outbound SNAT: source address and port.
    Src,
    /// Return traffic: destination address and port.
    Dst,
}

impl Side {
    /// The other end. An ICMP error goes to the source of the packet it
    /// quotes, so translating one side of the error translates the other
    /// side of its quote.
    #[inline(always)]
    pub const fn other(self) -> Self {
        match self {
            Side::Src => Side::Dst,
            Side::Dst => Side::Src,
        }
    }
}

/// Offsets in the IPv4 header.
const TTL: usize = 8;
const CHECK: usize = 10;
const SRC: usize = 12;
const DST: usize = 16;

/// Sets `side`'s address of the 20-byte IPv4 header `h` to `addr`,
/// decrements the TTL if `dec_ttl` (never below 0), and patches the header
/// checksum. Returns the old address: the transport checksum's
/// pseudo-header covers it.
#[inline(always)]
pub fn ipv4(h: &mut [u8; 20], side: Side, addr: [u8; 4], dec_ttl: bool) -> [u8; 4] {
    let at = match side {
        Side::Src => SRC,
        Side::Dst => DST,
    };
    let old = [h[at], h[at + 1], h[at + 2], h[at + 3]];
    h[at..at + 4].copy_from_slice(&addr);
    let mut check = Incremental::new([h[CHECK], h[CHECK + 1]]).replace4(old, addr);
    if dec_ttl {
        // The TTL shares its 16-bit word with the protocol.
        let word = [h[TTL], h[TTL + 1]];
        h[TTL] = h[TTL].saturating_sub(1);
        check = check.replace2(word, [h[TTL], h[TTL + 1]]);
    }
    h[CHECK..CHECK + 2].copy_from_slice(&check.finish());
    old
}

/// Sets the TOS byte of the 20-byte IPv4 header `h` to `tos`, patching the
/// header checksum.
#[inline(always)]
pub fn set_tos(h: &mut [u8; 20], tos: u8) {
    // The TOS shares its 16-bit word with the version and IHL.
    let word = [h[0], h[1]];
    h[1] = tos;
    let check = Incremental::new([h[CHECK], h[CHECK + 1]]).replace2(word, [h[0], tos]);
    h[CHECK..CHECK + 2].copy_from_slice(&check.finish());
}

/// The TCP or UDP checksum field after a 16-bit word of the segment (a
/// port, the MSS; as it adds to the sum) changed from `word.0` to `word.1`,
/// and with it perhaps an address of the pseudo-header, for a field that
/// holds the complete checksum (RFC 1624). An incorrect checksum stays
/// incorrect by the same amount, so the receiver still discards the packet;
/// a UDP checksum of 0 ("none", RFC 768) stays 0.
#[inline(always)]
pub fn l4_checksum(
    check: [u8; 2],
    addr: Option<([u8; 4], [u8; 4])>,
    word: ([u8; 2], [u8; 2]),
    udp: bool,
) -> [u8; 2] {
    let mut sum = Incremental::new(check);
    if let Some((old, new)) = addr {
        sum = sum.replace4(old, new);
    }
    let sum = sum.replace2(word.0, word.1);
    match (udp, check) {
        (true, [0, 0]) => [0, 0],
        (true, _) => sum.finish_udp(),
        (false, _) => sum.finish(),
    }
}

/// The ICMP checksum field after an echo identifier changed from `old` to
/// `new` (ICMP has no pseudo-header).
#[inline(always)]
pub fn echo_checksum(check: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    Incremental::new(check).replace2(old, new).finish()
}

#[cfg(test)]
mod tests {
    //! Rewrites of random packets built by etherparse, checked against its
    //! full recomputation of every checksum.

    use etherparse::{
        Icmpv4Slice, IpNumber, Ipv4Header, Ipv4HeaderSlice, PacketBuilder, TcpSlice, UdpSlice,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::checksum::fold;

    #[derive(Clone, Copy, Debug)]
    enum L4 {
        Tcp,
        Udp,
        /// UDP sent without a checksum (0 on the wire).
        UdpNone,
        Echo,
    }

    /// A packet to translate and what to translate it to.
    #[derive(Clone, Debug)]
    struct Case {
        l4: L4,
        src: [u8; 4],
        dst: [u8; 4],
        ttl: u8,
        ports: (u16, u16),
        payload: Vec<u8>,
        /// Added to the transport checksum as sent: 0 keeps it right.
        corrupt: u16,
        side: Side,
        addr: [u8; 4],
        port: [u8; 2],
        dec_ttl: bool,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            prop_oneof![
                Just(L4::Tcp),
                Just(L4::Udp),
                Just(L4::UdpNone),
                Just(L4::Echo)
            ],
            (any::<[u8; 4]>(), any::<[u8; 4]>(), any::<u8>()),
            (
                any::<(u16, u16)>(),
                prop::collection::vec(any::<u8>(), 0..64),
            ),
            prop_oneof![3 => Just(0u16), 1 => any::<u16>()],
            (
                prop_oneof![Just(Side::Src), Just(Side::Dst)],
                any::<[u8; 4]>(),
                any::<[u8; 2]>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(l4, (src, dst, ttl), (ports, payload), corrupt, (side, addr, port, dec_ttl))| {
                    Case {
                        l4,
                        src,
                        dst,
                        ttl,
                        ports,
                        payload,
                        corrupt,
                        side,
                        addr,
                        port,
                        dec_ttl,
                    }
                },
            )
    }

    /// Where the translated "port" and the transport checksum lie in the
    /// transport header.
    fn offsets(l4: L4, side: Side) -> (usize, usize) {
        match (l4, side) {
            (L4::Echo, _) => (4, 2),
            (L4::Tcp, Side::Src) => (0, 16),
            (L4::Tcp, Side::Dst) => (2, 16),
            (_, Side::Src) => (0, 6),
            (_, Side::Dst) => (2, 6),
        }
    }

    fn build(c: &Case) -> Vec<u8> {
        let b = PacketBuilder::ipv4(c.src, c.dst, c.ttl);
        let mut out = Vec::new();
        let (sport, dport) = c.ports;
        match c.l4 {
            L4::Tcp => b.tcp(sport, dport, 1, 1000).write(&mut out, &c.payload),
            L4::Udp | L4::UdpNone => b.udp(sport, dport).write(&mut out, &c.payload),
            L4::Echo => b
                .icmpv4_echo_request(sport, dport)
                .write(&mut out, &c.payload),
        }
        .unwrap();
        let (_, check) = offsets(c.l4, c.side);
        let at = 20 + check;
        let field = u16::from_be_bytes([out[at], out[at + 1]]);
        let sent = match c.l4 {
            L4::UdpNone => 0,
            // Ones'-complement addition: the error is exactly `corrupt`.
            _ => fold(u32::from(field) + u32::from(c.corrupt)),
        };
        out[at..at + 2].copy_from_slice(&sent.to_be_bytes());
        out
    }

    /// What the data path does to a packet of `c.l4` (see egress-ebpf's
    /// `l4::translate`).
    fn translate(c: &Case, pkt: &mut [u8]) {
        let (h, l4) = pkt.split_at_mut(20);
        let old_addr = ipv4(h.try_into().unwrap(), c.side, c.addr, c.dec_ttl);
        let (port, check) = offsets(c.l4, c.side);
        let old_port = [l4[port], l4[port + 1]];
        l4[port..port + 2].copy_from_slice(&c.port);
        let field = [l4[check], l4[check + 1]];
        let new = match c.l4 {
            L4::Echo => echo_checksum(field, old_port, c.port),
            L4::Tcp => l4_checksum(field, Some((old_addr, c.addr)), (old_port, c.port), false),
            L4::Udp | L4::UdpNone => {
                l4_checksum(field, Some((old_addr, c.addr)), (old_port, c.port), true)
            }
        };
        l4[check..check + 2].copy_from_slice(&new);
    }

    /// The transport checksum's error: what must be added to the field to
    /// make it right (0 when it is right; ±0 are one value).
    fn error(ip: &Ipv4Header, l4: L4, seg: &[u8]) -> u16 {
        let (field, want) = match l4 {
            L4::Tcp => {
                let t = TcpSlice::from_slice(seg).unwrap();
                (
                    t.checksum(),
                    t.calc_checksum_ipv4(ip.source, ip.destination).unwrap(),
                )
            }
            L4::Udp | L4::UdpNone => {
                let u = UdpSlice::from_slice(seg).unwrap();
                let want = u.to_header().calc_checksum_ipv4(ip, u.payload()).unwrap();
                (u.checksum(), want)
            }
            L4::Echo => {
                let i = Icmpv4Slice::from_slice(seg).unwrap();
                (
                    i.checksum(),
                    i.header().icmp_type.calc_checksum(i.payload()),
                )
            }
        };
        let diff = fold(u32::from(want) + u32::from(!field));
        if diff == 0xffff { 0 } else { diff }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// After any translation the IPv4 header checksum is exactly what a
        /// full recomputation gives, and the transport checksum keeps the
        /// error it arrived with: none for a right one, and a UDP packet
        /// without a checksum still has none.
        #[test]
        fn translation_keeps_checksums_as_right_as_they_were(mut c in case(), aim_at_zero in any::<bool>()) {
            let mut pkt = build(&c);
            if aim_at_zero && matches!(c.l4, L4::Udp) {
                // The port that makes the UDP checksum compute to 0 (which
                // must go out as 0xffff) is the checksum the packet has
                // with port 0, less its error: random ports hit it once
                // in 65536 packets.
                let mut zero = Case { port: [0, 0], ..c.clone() };
                let mut copy = pkt.clone();
                translate(&zero, &mut copy);
                let field = u16::from_be_bytes([copy[26], copy[27]]);
                let right = fold(u32::from(field) + u32::from(!zero.corrupt));
                zero.port = right.to_be_bytes();
                c = zero;
            }
            let before = Ipv4HeaderSlice::from_slice(&pkt).unwrap().to_header();
            let none = matches!(c.l4, L4::UdpNone);
            let err = if none { 0 } else { error(&before, c.l4, &pkt[20..]) };
            prop_assert_eq!(err != 0, !none && c.corrupt % 0xffff != 0);
            translate(&c, &mut pkt);

            let ip = Ipv4HeaderSlice::from_slice(&pkt).unwrap().to_header();
            prop_assert_eq!(ip.header_checksum, ip.calc_header_checksum());
            let side_addr = match c.side { Side::Src => ip.source, Side::Dst => ip.destination };
            prop_assert_eq!(side_addr, c.addr);
            let ttl = if c.dec_ttl { c.ttl.saturating_sub(1) } else { c.ttl };
            prop_assert_eq!(ip.time_to_live, ttl);
            prop_assert_eq!(ip.protocol, before.protocol);
            let (port, check) = offsets(c.l4, c.side);
            prop_assert_eq!(&pkt[20 + port..22 + port], &c.port);
            if none {
                prop_assert_eq!(&pkt[20 + check..22 + check], &[0, 0]);
            } else {
                prop_assert_eq!(error(&ip, c.l4, &pkt[20..]), err);
            }
            if matches!(c.l4, L4::Udp) {
                // A UDP checksum computed as 0 goes out as 0xffff.
                prop_assert_ne!([pkt[26], pkt[27]], [0, 0]);
            }
        }
    }

    /// The ones'-complement sum of a header, checksum included, with the
    /// two zeros made one: `0xffff` for a right checksum.
    fn total(h: &[u8; 20]) -> u16 {
        let sum = h
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        match fold(sum) {
            0 => 0xffff,
            s => s,
        }
    }

    proptest! {
        /// On any 20 bytes, not only headers etherparse would write: the
        /// rewrite touches only the address, the TTL and the checksum,
        /// returns the old address, and leaves the checksum as right or as
        /// wrong as it was.
        #[test]
        fn any_header_keeps_its_checksum_error(
            h in any::<[u8; 20]>(),
            dst in any::<bool>(),
            addr in any::<[u8; 4]>(),
            dec_ttl in any::<bool>(),
        ) {
            let (side, at) = if dst { (Side::Dst, DST) } else { (Side::Src, SRC) };
            let mut out = h;
            let old = ipv4(&mut out, side, addr, dec_ttl);
            prop_assert_eq!(&old[..], &h[at..at + 4]);
            prop_assert_eq!(&out[at..at + 4], &addr[..]);
            prop_assert_eq!(out[TTL], if dec_ttl { h[TTL].saturating_sub(1) } else { h[TTL] });
            for i in (0..20).filter(|i| !(at..at + 4).contains(i) && ![TTL, CHECK, CHECK + 1].contains(i)) {
                prop_assert_eq!(out[i], h[i], "byte {}", i);
            }
            prop_assert_eq!(total(&out), total(&h));
        }
    }

    proptest! {
        /// A new TOS byte leaves the rest of the header as it was and the
        /// checksum as right or as wrong as it was.
        #[test]
        fn a_new_tos_keeps_the_checksum_error(h in any::<[u8; 20]>(), tos in any::<u8>()) {
            let mut out = h;
            set_tos(&mut out, tos);
            prop_assert_eq!(out[1], tos);
            for i in (0..20).filter(|&i| ![1, CHECK, CHECK + 1].contains(&i)) {
                prop_assert_eq!(out[i], h[i], "byte {}", i);
            }
            prop_assert_eq!(total(&out), total(&h));
        }
    }

    #[test]
    fn protocol_numbers_agree_with_etherparse() {
        assert_eq!(IpNumber::TCP.0, crate::flow::IPPROTO_TCP);
        assert_eq!(IpNumber::UDP.0, crate::flow::IPPROTO_UDP);
        assert_eq!(IpNumber::ICMP.0, crate::flow::IPPROTO_ICMP);
        assert_eq!(IpNumber::IPV4.0, crate::flow::IPPROTO_IPIP);
    }
}
