//! Headers the data path writes from scratch: the outer IP-in-IP header and
//! the ICMP errors it returns to clients.

use crate::checksum::{fold, ipv4_header};

pub const IPV4_LEN: usize = 20;
pub const ICMP_LEN: usize = 8;
/// What an ICMP error quotes of the packet it answers: its IP header and the
/// first 8 bytes of its payload, which hold the ports (RFC 792).
pub const QUOTE_LEN: usize = IPV4_LEN + 8;

pub const IP_DF: u16 = 0x4000;

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Destination unreachable: fragmentation needed and DF set (RFC 1191).
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// Destination unreachable: communication administratively prohibited
/// (RFC 1812), what RFC 5508 REQ-8 asks of a NAT that refuses a flow.
pub const ICMP_ADMIN_PROHIBITED: u8 = 13;

/// Whether an ICMP message of type `kind` is an error about a packet that
/// a NAT translates back to the packet's sender (RFC 5508 section 7).
#[inline(always)]
pub const fn is_icmp_error(kind: u8) -> bool {
    matches!(
        kind,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    )
}

/// The fields of an IPv4 header without options that vary.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    /// Don't fragment.
    pub df: bool,
    pub ttl: u8,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4 {
    /// Writes the 20 header bytes, checksum included, to `h` (in place,
    /// so the eBPF side needs no copy on its small stack).
    #[inline(always)]
    pub fn write(&self, h: &mut [u8; IPV4_LEN]) {
        h[0] = 0x45;
        h[1] = self.tos;
        h[2..4].copy_from_slice(&self.tot_len.to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        h[6..8].copy_from_slice(&if self.df { IP_DF } else { 0 }.to_be_bytes());
        h[8] = self.ttl;
        h[9] = self.proto;
        h[10..12].copy_from_slice(&[0, 0]);
        h[12..16].copy_from_slice(&self.src);
        h[16..20].copy_from_slice(&self.dst);
        let check = ipv4_header(h);
        h[10..12].copy_from_slice(&check);
    }
}

/// Writes the 8-byte header of an ICMP error of `kind`/`code` quoting
/// `quote` to `h`, checksum included (it covers the header and the quote).
/// `mtu` fills the next-hop MTU field of "fragmentation needed" (RFC 1191)
/// and is 0 for every other error.
#[inline(always)]
pub fn icmp_error(kind: u8, code: u8, mtu: u16, quote: &[u8; QUOTE_LEN], h: &mut [u8; ICMP_LEN]) {
    let mut sum = u32::from(u16::from_be_bytes([kind, code])) + u32::from(mtu);
    let mut i = 0;
    while i < QUOTE_LEN {
        sum += u32::from(u16::from_be_bytes([quote[i], quote[i + 1]]));
        i += 2;
    }
    let [c0, c1] = (!fold(sum)).to_be_bytes();
    let [m0, m1] = mtu.to_be_bytes();
    *h = [kind, code, c0, c1, 0, 0, m0, m1];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_parses_and_verifies() {
        let mut h = [0xaa; IPV4_LEN];
        Ipv4 {
            tos: 0x10,
            tot_len: 76,
            id: 0xbeef,
            df: true,
            ttl: 64,
            proto: 4,
            src: [10, 1, 1, 10],
            dst: [10, 0, 1, 10],
        }
        .write(&mut h);
        // Summing a header with its checksum gives all ones.
        assert_eq!(ipv4_header(&h), [0, 0]);
        assert_eq!(
            &h[..12],
            &[0x45, 0x10, 0, 76, 0xbe, 0xef, 0x40, 0, 64, 4, h[10], h[11]]
        );
    }

    proptest::proptest! {
        /// Every header the data path writes parses back, field for field,
        /// with a valid checksum (etherparse as the independent reader).
        #[test]
        fn ipv4_header_parses_back(
            (tos, tot_len, id, df, ttl, proto) in (0u8.., 20u16.., 0u16.., proptest::bool::ANY, 0u8.., 0u8..),
            src in proptest::array::uniform4(0u8..),
            dst in proptest::array::uniform4(0u8..),
        ) {
            let mut h = [0; IPV4_LEN];
            Ipv4 { tos, tot_len, id, df, ttl, proto, src, dst }.write(&mut h);
            let (p, _) = etherparse::Ipv4Header::from_slice(&h).unwrap();
            proptest::prop_assert_eq!(p.header_checksum, p.calc_header_checksum());
            proptest::prop_assert_eq!(
                (p.total_len, p.identification, p.dont_fragment, p.more_fragments),
                (tot_len, id, df, false)
            );
            proptest::prop_assert_eq!((p.time_to_live, p.protocol.0, p.source, p.destination), (ttl, proto, src, dst));
            proptest::prop_assert_eq!((p.dscp.value() << 2) | p.ecn.value(), tos);
        }

        /// An error etherparse reads as the type and code it was made with,
        /// with its next-hop MTU, carrying the quote, with a valid checksum.
        #[test]
        fn icmp_error_parses_back(quote in proptest::array::uniform28(0u8..), kind in 0u8.., code in 0u8.., mtu in 0u16..) {
            let mut msg = [0; ICMP_LEN + QUOTE_LEN];
            let (h, q) = msg.split_at_mut(ICMP_LEN);
            icmp_error(kind, code, mtu, &quote, h.try_into().unwrap());
            q.copy_from_slice(&quote);
            let icmp = etherparse::Icmpv4Slice::from_slice(&msg).unwrap();
            proptest::prop_assert_eq!((icmp.type_u8(), icmp.code_u8()), (kind, code));
            let [_, _, m0, m1] = icmp.bytes5to8();
            proptest::prop_assert_eq!(u16::from_be_bytes([m0, m1]), mtu);
            proptest::prop_assert_eq!(icmp.checksum(), icmp.header().icmp_type.calc_checksum(icmp.payload()));
        }
    }
}
