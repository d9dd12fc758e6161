//! Which tunnel peers may send for a client range: the value the data path
//! finds for a client address, one bit per peer, by the peer's index (the
//! value it finds for the peer's address).

use crate::config::MAX_PEERS;

const WORDS: usize = MAX_PEERS as usize / 64;
// Every `u8` index has its bit, and no bit is past the last peer.
const _: () = assert!(WORDS * 64 == u8::MAX as usize + 1);

/// A set of peer indices.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerSet([u64; WORDS]);

impl PeerSet {
    pub fn insert(&mut self, peer: u8) {
        self.0[usize::from(peer >> 6)] |= 1 << (peer & 63);
    }

    #[inline(always)]
    pub fn contains(&self, peer: u8) -> bool {
        self.0[usize::from(peer >> 6)] >> (peer & 63) & 1 != 0
    }
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)` of integers, no padding.
unsafe impl aya::Pod for PeerSet {}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A set holds exactly the indices put in it.
        #[test]
        fn holds_exactly_what_was_inserted(put in proptest::collection::btree_set(0u8.., 0..40), probe: u8) {
            let mut set = PeerSet::default();
            for &p in &put {
                set.insert(p);
            }
            proptest::prop_assert_eq!(set.contains(probe), put.contains(&probe));
        }
    }
}
