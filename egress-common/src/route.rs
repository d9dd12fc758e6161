//! The data path's memory of FIB answers: a direct-mapped cache per CPU.
//!
//! A cached answer costs an inlined array access and a 16-byte compare,
//! where a hash map lookup costs a helper's hashing and bucket walk (60-70
//! ns of an established packet's 250 ns, measured). Per CPU, so an entry is
//! only ever written by the CPU that reads it (programs do not nest on a
//! CPU) and a reader never sees half an update. Two routes that share a slot evict each other:
//! that costs FIB lookups, never a wrong answer, since the whole key is
//! compared.

/// Slots per CPU (a power of two): 640 KiB per CPU.
pub const ROUTE_SLOTS: u32 = 1 << ROUTE_SLOT_BITS;
const ROUTE_SLOT_BITS: u32 = 14;

/// What a FIB lookup is asked: the packet's addresses (in wire byte order,
/// read as one word each) and protocol and the interface it arrived on.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RouteKey {
    pub src: u32,
    pub dst: u32,
    pub ifindex: u32,
    pub proto: u32,
}

impl RouteKey {
    pub fn new(src: [u8; 4], dst: [u8; 4], ifindex: u32, proto: u8) -> Self {
        Self {
            src: u32::from_ne_bytes(src),
            dst: u32::from_ne_bytes(dst),
            ifindex,
            proto: u32::from(proto),
        }
    }

    /// The cache slot of this key: a Fibonacci hash of its words, whose top
    /// bits depend on every input bit. Destinations are what vary most.
    #[inline(always)]
    pub fn slot(&self) -> u32 {
        let mixed = self.dst
            ^ self.src.rotate_left(16)
            ^ self.ifindex.rotate_left(8)
            ^ self.proto.rotate_left(24);
        mixed.wrapping_mul(0x9e37_79b9) >> (32 - ROUTE_SLOT_BITS)
    }
}

/// The routing generation while no daemon watches the host's routes (set
/// by a daemon that exits and leaves the data path running): no answer is
/// remembered then, so every packet asks the FIB, which is always current.
pub const UNWATCHED: u64 = u64::MAX;

/// One slot: a resolved FIB answer for `key`, valid while `generation` is
/// the current one (and not [`UNWATCHED`]) and for packets of up to `mtu`
/// bytes. An empty slot has `mtu` 0, which no packet fits.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Route {
    pub key: RouteKey,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub ifindex: u32,
    pub mtu: u16,
    pub _pad: [u8; 2],
    pub generation: u64,
}

impl Route {
    /// Whether this slot answers `key` for a packet of `tot_len` bytes.
    #[inline(always)]
    pub fn answers(&self, key: &RouteKey, generation: u64, tot_len: u16) -> bool {
        self.key == *key
            && self.generation == generation
            && generation != UNWATCHED
            && tot_len <= self.mtu
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(dst: [u8; 4]) -> RouteKey {
        RouteKey::new([203, 0, 113, 1], dst, 2, 17)
    }

    proptest! {
        #[test]
        fn every_key_has_a_slot(src: [u8; 4], dst: [u8; 4], ifindex: u32, proto: u8) {
            prop_assert!(RouteKey::new(src, dst, ifindex, proto).slot() < ROUTE_SLOTS);
        }
    }

    #[test]
    fn neighbouring_destinations_spread_over_the_slots() {
        // A /16 of destinations: a perfect spread would use every slot 4
        // times; a poor hash would leave most of them empty.
        let mut used = vec![0u32; ROUTE_SLOTS as usize];
        for d in 0..=u16::MAX {
            let [a, b] = d.to_be_bytes();
            used[key([198, 51, a, b]).slot() as usize] += 1;
        }
        let empty = used.iter().filter(|&&n| n == 0).count();
        assert!(empty < ROUTE_SLOTS as usize / 50, "{empty} slots unused");
    }

    #[test]
    fn an_answer_is_for_its_key_generation_and_size_only() {
        let route = Route {
            key: key([198, 51, 100, 7]),
            mtu: 1500,
            generation: 3,
            ..Default::default()
        };
        assert!(route.answers(&key([198, 51, 100, 7]), 3, 1500));
        assert!(!route.answers(&key([198, 51, 100, 8]), 3, 1500));
        assert!(!route.answers(&key([198, 51, 100, 7]), 4, 1500));
        assert!(!route.answers(&key([198, 51, 100, 7]), 3, 1501));
        assert!(!Route::default().answers(&RouteKey::default(), 0, 20));
    }

    #[test]
    fn nothing_is_answered_from_memory_while_routes_are_unwatched() {
        let route = Route {
            key: key([198, 51, 100, 7]),
            mtu: 1500,
            generation: UNWATCHED,
            ..Default::default()
        };
        assert!(!route.answers(&key([198, 51, 100, 7]), UNWATCHED, 1500));
    }
}
