//! Where the outer IP IDs come from: a counter per peer, as Linux keeps
//! one per destination (`ip_idents`) for the packets its ipip tunnels send.
//!
//! A return packet without DF may be fragmented on its way to the peer (a
//! 1,500-byte reply is 1,520 bytes encapsulated), and the peer reassembles
//! by (source, destination, protocol, ID), the first three the same for
//! everything the tunnel carries to it: an ID must not come round again
//! while a datagram with it may still be in flight (RFC 6864 section 4.1).
//! Random IDs do by the birthday bound (even odds within about 300
//! packets); a counter only after 65,536.
//!
//! The counters sit in buckets hashed from the peer's address. Peers that
//! share one each still get distinct IDs, only the IDs come round sooner;
//! with [`IP_ID_BUCKETS`] of them, any 512 consecutive addresses (more
//! than there may be peers) have counters of their own. The hash needs no
//! secret key, unlike Linux's: only the peers see these IDs, never the
//! Internet hosts that could learn from them how much others send.

/// Counters (a power of two); 8 bytes each.
pub const IP_ID_BUCKETS: u32 = 1 << IP_ID_BUCKET_BITS;
const IP_ID_BUCKET_BITS: u32 = 10;

/// The bucket of the counter for the peer at `peer`: a Fibonacci hash of
/// its address as a number, which spreads consecutive addresses furthest
/// apart.
#[inline(always)]
pub const fn ip_id_bucket(peer: [u8; 4]) -> u32 {
    u32::from_be_bytes(peer).wrapping_mul(0x9e37_79b9) >> (32 - IP_ID_BUCKET_BITS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    proptest::proptest! {
        /// Peers in one /23, or any other 512 addresses in a row, never
        /// share a counter.
        #[test]
        fn consecutive_addresses_have_counters_of_their_own(first: u32) {
            let buckets: HashSet<u32> = (0..512u32)
                .map(|i| ip_id_bucket(first.wrapping_add(i).to_be_bytes()))
                .collect();
            proptest::prop_assert_eq!(buckets.len(), 512);
            proptest::prop_assert!(buckets.iter().all(|&b| b < IP_ID_BUCKETS));
        }
    }
}
