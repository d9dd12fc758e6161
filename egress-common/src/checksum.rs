//! Internet checksum (RFC 1071) and its incremental update (RFC 1624).

/// Incremental update of a ones'-complement checksum, RFC 1624 eqn. 3:
/// `HC' = ~(~HC + ~m + m')`. Feed every replaced 16-bit word of the covered
/// data as `old`/`new` pairs, then [`Incremental::finish`].
#[derive(Clone, Copy, Debug)]
pub struct Incremental(u32);

impl Incremental {
    /// Starts from the checksum field as it is in the packet.
    #[inline(always)]
    pub fn new(check: [u8; 2]) -> Self {
        Self(u32::from(!u16::from_be_bytes(check)))
    }

    #[inline(always)]
    fn word(self, old: u16, new: u16) -> Self {
        Self(self.0 + u32::from(!old) + u32::from(new))
    }

    /// Replaces one 16-bit word (a port, an ICMP identifier).
    #[inline(always)]
    pub fn replace2(self, old: [u8; 2], new: [u8; 2]) -> Self {
        self.word(u16::from_be_bytes(old), u16::from_be_bytes(new))
    }

    /// Replaces a 32-bit value (an IPv4 address).
    #[inline(always)]
    pub fn replace4(self, old: [u8; 4], new: [u8; 4]) -> Self {
        self.replace2([old[0], old[1]], [new[0], new[1]])
            .replace2([old[2], old[3]], [new[2], new[3]])
    }

    /// The checksum field value to write back.
    #[inline(always)]
    pub fn finish(self) -> [u8; 2] {
        (!fold(self.0)).to_be_bytes()
    }

    /// As [`Incremental::finish`] for a UDP checksum, where 0 on the wire
    /// means "no checksum" and a computed 0 is sent as 0xffff (RFC 768).
    #[inline(always)]
    pub fn finish_udp(self) -> [u8; 2] {
        match self.finish() {
            [0, 0] => [0xff, 0xff],
            c => c,
        }
    }
}

/// `bytes` as the 16-bit word they add to a checksum when they start
/// `offset` bytes into the data it covers. At an odd offset each byte is the
/// low half of one word and the high half of the next, which sums like the
/// two bytes swapped (RFC 1071, byte order independence): feed this to
/// [`Incremental::replace2`] for a field at any offset.
#[inline(always)]
pub fn word_at(offset: usize, bytes: [u8; 2]) -> [u8; 2] {
    if offset & 1 == 0 {
        bytes
    } else {
        [bytes[1], bytes[0]]
    }
}

/// The ones'-complement sum of `bytes` as big-endian 16-bit words (`N` even).
#[inline(always)]
pub fn sum_words<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// The one value of a pending transport checksum field (an skb's
/// `CHECKSUM_PARTIAL`) that survives being filled in: the kernel or the NIC
/// writes the complement of the sum of everything from the transport header
/// to the packet's end, the field's own contents included. With `others` the
/// sum of the other words, F = ~(others + F) means 2F = -others modulo
/// 0xffff, where halving is a rotation right by one bit. A zero is written
/// as all ones, as the kernel writes it.
#[inline(always)]
pub fn pending_fixed_point(others: u32) -> [u8; 2] {
    match (!fold(others)).rotate_right(1) {
        0 => [0xff, 0xff],
        f => f.to_be_bytes(),
    }
}

/// Bytes of a message the data path sums at a time when it verifies a
/// checksum over more than a header (an ICMP error): the size of the stack
/// buffer it copies them to, as [`CHUNK_WORDS`] 32-bit words.
pub const CHUNK: usize = 64;
pub const CHUNK_WORDS: usize = CHUNK / 4;

/// The sum of one [`CHUNK`] of a message as it lies in memory, a chunk
/// that ends the message padded with zeros (an odd last byte is then the
/// high half of a word, as RFC 1071 pads it). 32-bit words of either byte
/// order add up to the same 16-bit sum once folded (2^16 is 1 modulo
/// 0xffff, and RFC 1071's byte order independence), so the data path loads
/// them as they lie, 4 bytes at a time; chunks must start at even offsets.
#[inline(always)]
pub fn sum_chunk(words: &[u32; CHUNK_WORDS]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < CHUNK_WORDS {
        sum += u64::from(words[i]);
        i += 1;
    }
    sum
}

/// Whether a message whose chunks sum to `sum` ([`sum_chunk`]), its
/// checksum field included, is intact: its 16-bit words then sum to all
/// ones, as the kernel checks it (`csum_fold(..) == 0`).
#[inline(always)]
pub fn sum_verifies(sum: u64) -> bool {
    // 2^32 is 1 modulo 0xffff: twice brings any sum of fewer than 2^32
    // chunks under 2^32.
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    fold(sum as u32) == 0xffff
}

/// Folds a 32-bit ones'-complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Whether a received 20-byte IPv4 header's checksum is right, given as
/// the ten 16-bit words it occupies in memory: in either byte order, the
/// words of a correct header, checksum included, sum to all ones (RFC 1071
/// 2(B)), so the data path loads them as they lie, without byte swaps.
#[inline(always)]
pub fn ipv4_header_valid(words: &[u16; 10]) -> bool {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += u32::from(words[i]);
        i += 1;
    }
    fold(sum) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward RFC 1071 sum over a byte slice, used as the oracle.
    fn full(data: &[u8]) -> [u8; 2] {
        let mut sum = 0u32;
        for chunk in data.chunks(2) {
            let hi = u32::from(chunk[0]) << 8;
            let lo = chunk.get(1).copied().map_or(0, u32::from);
            sum += hi | lo;
        }
        (!fold(sum)).to_be_bytes()
    }

    /// The header as the data path loads it: 16-bit words in memory order.
    fn words(h: &[u8; 20]) -> [u16; 10] {
        core::array::from_fn(|i| u16::from_ne_bytes([h[2 * i], h[2 * i + 1]]))
    }

    /// A transport header `span` whose checksum field at `at` holds the
    /// fixed point, filled in as `skb_checksum_help` (or a NIC) does: the
    /// checksum of all of it, field included, a zero sent as all ones.
    fn filled_in<const N: usize>(mut span: [u8; N], at: usize) -> ([u8; N], [u8; N]) {
        span[at..at + 2].fill(0);
        let fixed = pending_fixed_point(sum_words(&span));
        span[at..at + 2].copy_from_slice(&fixed);
        let before = span;
        let filled = match full(&span) {
            [0, 0] => [0xff, 0xff],
            c => c,
        };
        span[at..at + 2].copy_from_slice(&filled);
        (before, span)
    }

    /// `message` summed as the data path sums it: chunk by chunk, each
    /// copied to a zeroed buffer and read as 32-bit words in memory order.
    fn chunked_sum(message: &[u8]) -> u64 {
        message
            .chunks(CHUNK)
            .map(|chunk| {
                let mut buf = [0u8; CHUNK];
                buf[..chunk.len()].copy_from_slice(chunk);
                let words = core::array::from_fn(|i| {
                    u32::from_ne_bytes(buf[4 * i..4 * i + 4].try_into().unwrap())
                });
                sum_chunk(&words)
            })
            .sum()
    }

    #[test]
    fn sums_of_all_zeros_or_all_ones_verify_as_the_kernel_checks() {
        // An all-zero message has no valid checksum (it would be 0xffff).
        assert!(!sum_verifies(chunked_sum(&[0; 36])));
        assert!(sum_verifies(chunked_sum(&[0xff; 36])));
        // A long message of all ones: the carries of many chunks fold in.
        assert!(sum_verifies(chunked_sum(&[0xff; 65534])));
    }

    proptest::proptest! {
        /// A quoted UDP or TCP header whose field holds the fixed point comes
        /// out of the kernel's filling in unchanged, whatever else it holds.
        #[test]
        fn a_pending_fixed_point_is_left_as_it_is(
            udp in proptest::array::uniform8(proptest::num::u8::ANY),
            tcp in proptest::array::uniform20(proptest::num::u8::ANY),
        ) {
            let (before, after) = filled_in(udp, 6);
            proptest::prop_assert_eq!(before, after);
            let (before, after) = filled_in(tcp, 16);
            proptest::prop_assert_eq!(before, after);
        }

        /// A header etherparse writes verifies; any one bit flipped in it
        /// (a single-bit error always changes a ones'-complement sum) and
        /// it does not.
        #[test]
        fn header_verification_catches_every_single_bit_error(
            ttl in proptest::num::u8::ANY,
            src in proptest::array::uniform4(proptest::num::u8::ANY),
            dst in proptest::array::uniform4(proptest::num::u8::ANY),
            (id, len, proto) in (0u16.., 20u16.., 0u8..),
            bit in 0usize..160,
        ) {
            let mut h = etherparse::Ipv4Header::new(len - 20, ttl, etherparse::IpNumber(proto), src, dst).unwrap();
            h.identification = id;
            h.header_checksum = h.calc_header_checksum();
            let mut bytes: [u8; 20] = h.to_bytes()[..].try_into().unwrap();
            proptest::prop_assert!(ipv4_header_valid(&words(&bytes)));
            bytes[bit / 8] ^= 1 << (bit % 8);
            proptest::prop_assert!(!ipv4_header_valid(&words(&bytes)));
        }

        /// On any 20 bytes, verification agrees with the RFC 1071 sum.
        #[test]
        fn header_verification_is_the_rfc1071_sum(h in proptest::array::uniform20(proptest::num::u8::ANY)) {
            proptest::prop_assert_eq!(ipv4_header_valid(&words(&h)), full(&h) == [0, 0]);
        }

        /// An ICMP error of any length, odd or even, as etherparse writes
        /// it verifies chunk by chunk; any one bit flipped in it anywhere
        /// (a single-bit error always changes the sum) and it does not.
        #[test]
        fn chunked_verification_of_icmp_errors_catches_every_single_bit_error(
            quote in proptest::collection::vec(proptest::num::u8::ANY, 28..1600),
            mtu in proptest::num::u16::ANY,
            flip in proptest::num::usize::ANY,
        ) {
            use etherparse::{Icmpv4Header, Icmpv4Type, icmpv4::DestUnreachableHeader};
            let kind = Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
            );
            let header = Icmpv4Header::with_checksum(kind, &quote);
            let mut message = [header.to_bytes().to_vec(), quote].concat();
            proptest::prop_assert!(sum_verifies(chunked_sum(&message)));
            let bit = flip % (8 * message.len());
            message[bit / 8] ^= 1 << (bit % 8);
            proptest::prop_assert!(!sum_verifies(chunked_sum(&message)));
        }

        /// On any bytes, chunked verification agrees with the RFC 1071 sum.
        #[test]
        fn chunked_verification_is_the_rfc1071_sum(
            message in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            proptest::prop_assert_eq!(sum_verifies(chunked_sum(&message)), full(&message) == [0, 0]);
        }

        /// Any rewrite of an address and a port keeps the checksum equal to a
        /// full recomputation.
        #[test]
        fn incremental_equals_full(
            mut data in proptest::collection::vec(proptest::num::u8::ANY, 12..64),
            addr in proptest::array::uniform4(proptest::num::u8::ANY),
            port in proptest::array::uniform2(proptest::num::u8::ANY),
        ) {
            if data.len() % 2 == 1 { data.pop(); }
            data[0] = 0; data[1] = 0;
            let check = full(&data);
            data[0..2].copy_from_slice(&check);
            let old_addr = [data[4], data[5], data[6], data[7]];
            let old_port = [data[10], data[11]];
            let new = Incremental::new(check).replace4(old_addr, addr).replace2(old_port, port).finish();
            data[4..8].copy_from_slice(&addr);
            data[10..12].copy_from_slice(&port);
            data[0] = 0; data[1] = 0;
            let want = full(&data);
            // 0x0000 and 0xffff are the same value in ones' complement.
            let norm = |c: [u8; 2]| if c == [0xff, 0xff] { [0, 0] } else { c };
            proptest::prop_assert_eq!(norm(new), norm(want));
        }

        /// Two bytes rewritten at any offset, even or odd (an MSS option
        /// after a NOP): the update matches a full recomputation.
        #[test]
        fn incremental_at_any_offset_equals_full(
            mut data in proptest::collection::vec(proptest::num::u8::ANY, 4..64),
            at in 2usize..62,
            value in proptest::array::uniform2(proptest::num::u8::ANY),
        ) {
            proptest::prop_assume!(at + 2 <= data.len());
            data[0] = 0; data[1] = 0;
            let check = full(&data);
            let old = [data[at], data[at + 1]];
            let new = Incremental::new(check)
                .replace2(word_at(at, old), word_at(at, value))
                .finish();
            data[at..at + 2].copy_from_slice(&value);
            let want = full(&data);
            let norm = |c: [u8; 2]| if c == [0xff, 0xff] { [0, 0] } else { c };
            proptest::prop_assert_eq!(norm(new), norm(want));
        }
    }
}
