//! RFC 2003 IP-in-IP framing: the outer header the emulated peer adds and the
//! checks it applies before handing an inner datagram to its host.

use std::net::Ipv4Addr;

pub const IPPROTO_IPIP: u8 = 4;
const HEADER_LEN: usize = 20;
const DF: u8 = 0x40;
const OUTER_TTL: u8 = 64;

/// Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Wraps `inner` in an outer header from `src` to `dst`. Returns `None` for
/// what must not be tunnelled: non-IPv4 (the TUN also carries IPv6), TTL 0
/// (RFC 2003 3.1), or a result over 65535 bytes.
pub fn encapsulate(inner: &[u8], src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Option<Vec<u8>> {
    if inner.len() < HEADER_LEN || inner[0] >> 4 != 4 || inner[8] == 0 {
        return None;
    }
    let total = u16::try_from(HEADER_LEN + inner.len()).ok()?;
    let mut pkt = Vec::with_capacity(usize::from(total));
    pkt.extend_from_slice(&[0x45, inner[1]]); // no options; TOS copied
    pkt.extend_from_slice(&total.to_be_bytes());
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&[inner[6] & DF, 0]); // inner DF => outer DF
    pkt.extend_from_slice(&[OUTER_TTL, IPPROTO_IPIP, 0, 0]);
    pkt.extend_from_slice(&src.octets());
    pkt.extend_from_slice(&dst.octets());
    let sum = checksum(&pkt);
    pkt[10..12].copy_from_slice(&sum.to_be_bytes());
    pkt.extend_from_slice(inner);
    Some(pkt)
}

/// Takes a received protocol-4 datagram (outer header included, as a raw
/// socket delivers it) and returns the inner datagram. `Ok(None)`: not from
/// `remote` to `local`, ignore. `Err`: our peer sent something malformed.
pub fn decapsulate(
    pkt: &[u8],
    local: Ipv4Addr,
    remote: Ipv4Addr,
) -> Result<Option<&[u8]>, &'static str> {
    if pkt.len() < HEADER_LEN || pkt[0] >> 4 != 4 {
        return Err("outer header is not IPv4");
    }
    if pkt[9] != IPPROTO_IPIP || pkt[12..16] != remote.octets() || pkt[16..20] != local.octets() {
        return Ok(None);
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if ihl < HEADER_LEN || total < ihl || total > pkt.len() {
        return Err("bad outer IHL or total length");
    }
    let inner = &pkt[ihl..total];
    if inner.len() < HEADER_LEN
        || inner[0] >> 4 != 4
        || usize::from(inner[0] & 0x0f) * 4 < HEADER_LEN
    {
        return Err("inner datagram is not IPv4");
    }
    if usize::from(u16::from_be_bytes([inner[2], inner[3]])) != inner.len() {
        return Err("inner total length disagrees with the outer one");
    }
    if inner[8] == 0 {
        return Err("inner TTL 0"); // RFC 2003 3.1: discard after decapsulation
    }
    Ok(Some(inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);

    /// UDP datagram with 4 payload bytes, TOS 0x28, DF as given.
    fn inner(df: bool) -> Vec<u8> {
        let mut p = vec![
            0x45,
            0x28,
            0,
            32,
            0x12,
            0x34,
            if df { DF } else { 0 },
            0,
            63,
            17,
            0,
            0, //
            192,
            168,
            250,
            2,
            203,
            0,
            113,
            10, //
            0x30,
            0x39,
            0x23,
            0x28,
            0,
            12,
            0,
            0,
            b'p',
            b'i',
            b'n',
            b'g',
        ];
        let sum = checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn checksum_matches_known_header() {
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0xb861);
    }

    #[test]
    fn outer_header_follows_rfc_2003() {
        for df in [true, false] {
            let inner = inner(df);
            let pkt = encapsulate(&inner, LOCAL, REMOTE, 0xbeef).unwrap();
            assert_eq!(pkt.len(), 20 + inner.len());
            assert_eq!(pkt[0], 0x45);
            assert_eq!(pkt[1], 0x28, "TOS copied");
            assert_eq!(u16::from_be_bytes([pkt[2], pkt[3]]) as usize, pkt.len());
            assert_eq!(&pkt[4..6], &[0xbe, 0xef]);
            assert_eq!(pkt[6] & DF != 0, df, "DF copied");
            assert_eq!((pkt[6] & 0x3f, pkt[7]), (0, 0), "not a fragment");
            assert_eq!((pkt[8], pkt[9]), (64, IPPROTO_IPIP));
            assert_eq!(checksum(&pkt[..20]), 0, "header checksum verifies");
            assert_eq!(&pkt[12..16], &LOCAL.octets());
            assert_eq!(&pkt[16..20], &REMOTE.octets());
            assert_eq!(&pkt[20..], &inner[..]);
        }
    }

    #[test]
    fn refuses_what_must_not_be_tunnelled() {
        let mut ttl0 = inner(true);
        ttl0[8] = 0;
        let ipv6 = [0x60; 40];
        for bad in [&ttl0[..], &ipv6[..], &inner(true)[..19]] {
            assert_eq!(encapsulate(bad, LOCAL, REMOTE, 1), None);
        }
    }

    #[test]
    fn decapsulates_what_the_peer_encapsulates() {
        let inner = inner(true);
        let pkt = encapsulate(&inner, REMOTE, LOCAL, 7).unwrap();
        assert_eq!(decapsulate(&pkt, LOCAL, REMOTE), Ok(Some(&inner[..])));
        // Ethernet-style padding after the outer total length is ignored.
        let mut padded = pkt.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(decapsulate(&padded, LOCAL, REMOTE), Ok(Some(&inner[..])));
    }

    #[test]
    fn ignores_other_tunnels() {
        let inner = inner(true);
        let stranger = Ipv4Addr::new(198, 51, 100, 1);
        for (src, dst) in [(stranger, LOCAL), (REMOTE, stranger)] {
            let pkt = encapsulate(&inner, src, dst, 7).unwrap();
            assert_eq!(decapsulate(&pkt, LOCAL, REMOTE), Ok(None));
        }
    }

    #[test]
    fn rejects_malformed_datagrams_from_the_peer() {
        let good = encapsulate(&inner(true), REMOTE, LOCAL, 7).unwrap();
        let corrupt = |i: usize, v: u8| {
            let mut p = good.clone();
            p[i] = v;
            p
        };
        let cases = [
            (
                good[..good.len() - 1].to_vec(),
                "bad outer IHL or total length",
            ),
            (corrupt(0, 0x44), "bad outer IHL or total length"),
            (corrupt(20, 0x65), "inner datagram is not IPv4"),
            (
                corrupt(23, 33),
                "inner total length disagrees with the outer one",
            ),
            (corrupt(28, 0), "inner TTL 0"),
        ];
        for (pkt, why) in cases {
            assert_eq!(decapsulate(&pkt, LOCAL, REMOTE), Err(why));
        }
    }
}
