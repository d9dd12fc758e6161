//! Headers the data path writes from scratch: the outer IP-in-IP header and
//! the ICMP errors it returns to clients.

use crate::{checksum::fold, config::OUTER_TTL, flow::IPPROTO_IPIP};

pub const IPV4_LEN: usize = 20;
pub const ICMP_LEN: usize = 8;
/// What an ICMP error quotes of the packet it answers: its IP header and the
/// first 8 bytes of its payload, which hold the ports (RFC 792).
pub const QUOTE_LEN: usize = IPV4_LEN + 8;

pub const IP_DF: u16 = 0x4000;
/// IP precedence "internetwork control", as Linux marks the errors it sends.
pub const TOS_CONTROL: u8 = 0xc0;

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Destination unreachable: host unreachable.
pub const ICMP_HOST_UNREACH: u8 = 1;
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

/// Whether no ICMP error may be sent about a datagram to `dst`: a
/// multicast (224/4), reserved (240/4) or limited broadcast address (RFC
/// 1122 3.2.2, RFC 1812 4.3.2.7).
#[inline(always)]
pub const fn no_errors_about(dst: [u8; 4]) -> bool {
    dst[0] >= 224
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
    /// The RFC 2003 outer header from `src` to `dst` for an inner IPv4
    /// packet of `inner_len` bytes: TOS and DF copied from the inner header
    /// (`inner_tos`, `inner_df`), our TTL, and the caller's `id`.
    #[inline(always)]
    pub fn tunnel(
        inner_tos: u8,
        inner_len: u16,
        inner_df: bool,
        id: u16,
        src: [u8; 4],
        dst: [u8; 4],
    ) -> Self {
        Self {
            tos: inner_tos,
            tot_len: inner_len.wrapping_add(IPV4_LEN as u16),
            id,
            df: inner_df,
            ttl: OUTER_TTL,
            proto: IPPROTO_IPIP,
            src,
            dst,
        }
    }

    /// Writes the header, checksum included, to `h` (in place, so the eBPF
    /// side needs no copy on its small stack): its ten 16-bit words as they
    /// lie in memory, summed for the checksum as they are (RFC 1071 byte
    /// order independence), so nothing is read back or byte-swapped.
    #[inline(always)]
    pub fn write(&self, h: &mut [u16; IPV4_LEN / 2]) {
        let word = u16::from_ne_bytes;
        let [s0, s1, s2, s3] = self.src;
        let [d0, d1, d2, d3] = self.dst;
        let flags: u16 = if self.df { IP_DF } else { 0 };
        let mut words = [
            word([0x45, self.tos]),
            word(self.tot_len.to_be_bytes()),
            word(self.id.to_be_bytes()),
            word(flags.to_be_bytes()),
            word([self.ttl, self.proto]),
            0,
            word([s0, s1]),
            word([s2, s3]),
            word([d0, d1]),
            word([d2, d3]),
        ];
        let mut sum = 0u32;
        let mut i = 0;
        while i < words.len() {
            sum += u32::from(words[i]);
            i += 1;
        }
        words[5] = !fold(sum);
        *h = words;
    }
}

/// Writes the 8-byte header of an ICMP error of `kind`/`code` to `h`,
/// checksum included: it covers the header and the quote, whose words sum
/// to `quote_sum` ([`crate::checksum::sum_words`]). `mtu` fills the next-hop
/// MTU field of "fragmentation needed" (RFC 1191) and is 0 for every other
/// error.
#[inline(always)]
pub fn icmp_error(kind: u8, code: u8, mtu: u16, quote_sum: u32, h: &mut [u8; ICMP_LEN]) {
    let sum = u32::from(u16::from_be_bytes([kind, code])) + u32::from(mtu) + quote_sum;
    let [c0, c1] = (!fold(sum)).to_be_bytes();
    let [m0, m1] = mtu.to_be_bytes();
    *h = [kind, code, c0, c1, 0, 0, m0, m1];
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a header as [`Ipv4::write`] leaves it in memory.
    fn written(header: Ipv4) -> [u8; IPV4_LEN] {
        let mut words = [0xaaaa; IPV4_LEN / 2];
        header.write(&mut words);
        let mut bytes = [0; IPV4_LEN];
        for (b, w) in bytes.chunks_mut(2).zip(words) {
            b.copy_from_slice(&w.to_ne_bytes());
        }
        bytes
    }

    #[test]
    fn ipv4_header_matches_a_worked_example() {
        // The usual worked example of the header checksum: 0xb861.
        let h = written(Ipv4 {
            tos: 0,
            tot_len: 0x73,
            id: 0,
            df: true,
            ttl: 64,
            proto: 17,
            src: [192, 168, 0, 1],
            dst: [192, 168, 0, 199],
        });
        assert_eq!(
            h,
            [
                0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
                0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
            ]
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
            let h = written(Ipv4 { tos, tot_len, id, df, ttl, proto, src, dst });
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
        fn icmp_error_parses_back(quote in proptest::array::uniform28(0u8..), frag_needed: bool, kind in 0u8.., code in 0u8.., mtu in 0u16..) {
            // Only "fragmentation needed" has an MTU (etherparse, too, reads
            // the field as unused in every other type).
            let (kind, code, mtu) = if frag_needed { (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu) } else { (kind, code, 0) };
            let mut msg = [0; ICMP_LEN + QUOTE_LEN];
            let (h, q) = msg.split_at_mut(ICMP_LEN);
            icmp_error(kind, code, mtu, crate::checksum::sum_words(&quote), h.try_into().unwrap());
            q.copy_from_slice(&quote);
            let icmp = etherparse::Icmpv4Slice::from_slice(&msg).unwrap();
            proptest::prop_assert_eq!((icmp.type_u8(), icmp.code_u8()), (kind, code));
            let [_, _, m0, m1] = icmp.bytes5to8();
            proptest::prop_assert_eq!(u16::from_be_bytes([m0, m1]), mtu);
            proptest::prop_assert_eq!(icmp.checksum(), icmp.header().icmp_type.calc_checksum(icmp.payload()));
        }
    }
}
