//! The data path's memory of recent flows: a direct-mapped cache per CPU in
//! front of the flow table.
//!
//! A flow table lookup is a hash map lookup: three kernel function calls,
//! about 35 ns of an established packet (measured on AMD hosts, where every
//! return pays for the SRSO mitigation). A cached flow costs an inlined
//! array access and a key compare.
//!
//! A slot holds a copy of one flow half, good for the tick (jiffy) it was
//! taken in: the first packet of a later tick takes the table path, which
//! sets the entry's `last_seen_ns` and refreshes the copy, so the table
//! stays exact for the daemon's timeouts and a flow the daemon removes
//! stops being translated within a tick. A packet that changes the
//! flow's record (a SYN, a TCP flag the half has not seen) always takes
//! the table path.
//!
//! A packet served from the cache is counted in its slot, never in the
//! table entry, so a hit writes nothing shared. The slot's counts move to
//! the entry when another flow takes the slot; until then, readers of the
//! table add them ([`CachedFlow::credit`]). Per CPU, so a slot is only ever
//! written by the CPU that reads it (programs do not nest on a CPU).

use crate::{
    flow::{Flow, FlowKey},
    tcp,
};

/// Slots per CPU (a power of two): 112 KiB per CPU.
pub const CACHE_SLOTS: u32 = 1 << CACHE_SLOT_BITS;
const CACHE_SLOT_BITS: u32 = 10;

/// One slot: a flow half as of a tick, and the packets counted here.
/// An empty slot is all zeros: tick 0 has passed long before any packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    /// The table entry as of `tick` (its own counters are not read).
    /// First: the data path picks either this or a table entry, and the
    /// verifier rejects the offset LLVM may add to a slot pointer before
    /// its null check.
    pub flow: Flow,
    pub key: FlowKey,
    /// The tick (`jiffies`) the copy was taken in.
    pub tick: u64,
    /// Packets and bytes (IP length) of the half counted in this slot and
    /// not (yet) in its table entry.
    pub packets: u64,
    pub bytes: u64,
}

/// The cache slot of `key`: a Fibonacci hash of its words, whose top bits
/// depend on every input bit.
#[inline(always)]
pub fn slot(key: &FlowKey) -> u32 {
    let word = |b: [u8; 4]| u32::from_ne_bytes(b);
    let [s0, s1] = key.sport;
    let [d0, d1] = key.dport;
    let mixed = word(key.src)
        ^ word(key.dst).rotate_left(8)
        ^ word([s0, s1, d0, d1]).rotate_left(16)
        ^ word([key.proto, key.dir, 0, 0]).rotate_left(24);
    mixed.wrapping_mul(0x9e37_79b9) >> (32 - CACHE_SLOT_BITS)
}

impl CachedFlow {
    /// Whether this slot serves a packet of `key` with TCP `flags` (0 for
    /// other protocols) in tick `tick`.
    #[inline(always)]
    pub fn serves(&self, key: &FlowKey, tick: u64, flags: u8) -> bool {
        self.tick == tick && self.key == *key && !tcp::changes_record(self.flow.tcp_flags, flags)
    }

    /// Whether this slot holds the flow half `flow` stored under `key` (not
    /// an earlier flow on the same tuple).
    #[inline(always)]
    pub fn holds(&self, key: &FlowKey, flow: &Flow) -> bool {
        self.key == *key && self.flow.created_ns == flow.created_ns
    }

    /// Adds the packets counted in this slot to `flow`, the table entry
    /// under `key`, if they are its.
    pub fn credit(&self, key: &FlowKey, flow: &mut Flow) {
        if self.holds(key, flow) {
            flow.packets += self.packets;
            flow.bytes += self.bytes;
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: a plain `repr(C)` struct of integers and `Pod` structs without
// implicit padding, so every bit pattern is valid.
unsafe impl aya::Pod for CachedFlow {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{DIR_IN, DIR_OUT, IPPROTO_TCP, IPPROTO_UDP};
    use proptest::prelude::*;

    fn key(sport: u16, dir: u8) -> FlowKey {
        FlowKey {
            src: [192, 168, 250, 2],
            dst: [203, 0, 113, 10],
            sport: sport.to_be_bytes(),
            dport: 443u16.to_be_bytes(),
            proto: IPPROTO_UDP,
            dir,
            _pad: [0; 2],
        }
    }

    fn cached(key: FlowKey, tick: u64, tcp_flags: u8) -> CachedFlow {
        CachedFlow {
            key,
            tick,
            packets: 3,
            bytes: 300,
            flow: Flow {
                created_ns: 7,
                tcp_flags,
                ..Flow::default()
            },
        }
    }

    proptest! {
        #[test]
        fn every_key_has_a_slot(src: [u8; 4], dst: [u8; 4], sport: [u8; 2], dport: [u8; 2], proto: u8, dir: u8) {
            let key = FlowKey { src, dst, sport, dport, proto, dir, _pad: [0; 2] };
            prop_assert!(slot(&key) < CACHE_SLOTS);
        }
    }

    #[test]
    fn one_clients_ports_spread_over_the_slots() {
        // 16 flows per slot if spread perfectly; a poor hash leaves slots
        // empty.
        let mut used = vec![0u32; CACHE_SLOTS as usize];
        for port in 0..16 * CACHE_SLOTS {
            used[slot(&key(port as u16, DIR_OUT)) as usize] += 1;
        }
        let empty = used.iter().filter(|&&n| n == 0).count();
        assert!(empty < CACHE_SLOTS as usize / 50, "{empty} slots unused");
    }

    #[test]
    fn a_slot_serves_its_key_in_its_tick_only() {
        let c = cached(key(1000, DIR_OUT), 42, 0);
        assert!(c.serves(&key(1000, DIR_OUT), 42, 0));
        assert!(!c.serves(&key(1000, DIR_OUT), 43, 0));
        assert!(!c.serves(&key(1001, DIR_OUT), 42, 0));
        assert!(!c.serves(&key(1000, DIR_IN), 42, 0));
        assert!(!CachedFlow::default().serves(&FlowKey::default(), 42, 0));
    }

    #[test]
    fn a_segment_that_changes_the_record_is_not_served() {
        let mut k = key(1000, DIR_OUT);
        k.proto = IPPROTO_TCP;
        let c = cached(k, 42, tcp::SYN | tcp::ACK);
        assert!(c.serves(&k, 42, tcp::ACK));
        assert!(c.serves(&k, 42, tcp::ACK | 0x08));
        assert!(!c.serves(&k, 42, tcp::SYN));
        assert!(!c.serves(&k, 42, tcp::ACK | tcp::FIN));
        assert!(!c.serves(&k, 42, tcp::RST));
    }

    #[test]
    fn counts_are_credited_to_the_same_flow_only() {
        let k = key(1000, DIR_OUT);
        let c = cached(k, 42, 0);
        let mut flow = Flow {
            created_ns: 7,
            packets: 1,
            bytes: 100,
            ..Flow::default()
        };
        c.credit(&k, &mut flow);
        assert_eq!((flow.packets, flow.bytes), (4, 400));
        // An earlier flow on the same tuple, or another tuple: not its.
        let mut later = Flow {
            created_ns: 8,
            ..flow
        };
        c.credit(&k, &mut later);
        assert_eq!((later.packets, later.bytes), (4, 400));
        c.credit(&key(1001, DIR_OUT), &mut flow);
        assert_eq!((flow.packets, flow.bytes), (4, 400));
    }
}
