//! IPv4 fragments of translated flows.
//!
//! Only a datagram's first fragment carries the transport header, so only
//! it can be matched to a flow by its ports. It is translated like a whole
//! packet, and leaves behind a short-lived entry under [`FragKey`] (what
//! RFC 791 reassembly matches fragments by, plus the direction) naming its
//! flow half; the later fragments find their flow through it and get their
//! address translated (they have no ports, and no checksum but the IP
//! header's).

use crate::flow::FlowKey;

/// More fragments follow.
pub const IP_MF: u16 = 0x2000;
/// Fragment offset, in units of 8 bytes.
pub const IP_OFFSET: u16 = 0x1fff;

/// How long a first fragment's entry serves the rest of its datagram:
/// Linux's `ipfrag_time`, what a receiver waits for the missing pieces.
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

/// Where a packet stands in its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0, more fragments follow: carries the transport header.
    First,
    /// Any other fragment: no transport header.
    Later,
}

impl Fragment {
    /// From the IPv4 flags and fragment offset field as on the wire.
    #[inline(always)]
    pub fn of(frags: [u8; 2]) -> Self {
        let frags = u16::from_be_bytes(frags);
        if frags & IP_OFFSET != 0 {
            Self::Later
        } else if frags & IP_MF != 0 {
            Self::First
        } else {
            Self::Whole
        }
    }
}

/// Key of a fragment entry: the datagram, as its fragments name it, and
/// which way it travels (`flow::DIR_OUT` from a client, `DIR_IN` to one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub id: [u8; 2],
    pub proto: u8,
    pub dir: u8,
}

/// What a first fragment leaves for the rest of its datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragEntry {
    /// The flow half the first fragment went through: its translation (and
    /// for the return direction its peer) applies to the later fragments,
    /// which the data path counts in it too (the daemon's held copies it
    /// does not).
    pub flow: FlowKey,
    /// When the first fragment passed (`bpf_ktime_get_coarse_ns`).
    pub first_ns: u64,
}

impl FragEntry {
    /// Whether the entry still serves fragments at `now`.
    #[inline(always)]
    pub fn is_fresh(&self, now: u64) -> bool {
        now.saturating_sub(self.first_ns) < FRAGMENT_TIMEOUT_NS
    }
}

/// The largest returning later fragment the data path copies for the
/// daemon (IP bytes): what a 1500-byte path delivers, as the Internet does.
pub const HELD_MAX: usize = 1500;

/// A copy of a returning later fragment that came before its datagram's
/// first fragment, for the daemon, which sends it on to its client once
/// the first fragment has passed (RFC 4787 REQ-14: out of order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HeldFragment {
    /// The outer source the fragment is to be encapsulated from.
    pub tunnel_local: [u8; 4],
    /// The fragment's IP length; `packet` holds that many bytes.
    pub len: u16,
    pub _pad: [u8; 2],
    pub packet: [u8; HELD_MAX],
}

impl HeldFragment {
    /// The tunnel address and the IP packet of a ring record laid out as
    /// this struct, if it is one.
    pub fn read(record: &[u8]) -> Option<([u8; 4], &[u8])> {
        use core::mem::offset_of;
        let field = |at: usize, len: usize| record.get(at..at.checked_add(len)?);
        let tunnel_local = field(offset_of!(Self, tunnel_local), 4)?.try_into().ok()?;
        let len = u16::from_ne_bytes(field(offset_of!(Self, len), 2)?.try_into().ok()?);
        let packet = field(offset_of!(Self, packet), usize::from(len).min(HELD_MAX))?;
        Some((tunnel_local, packet))
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)` structs of integers and byte arrays without
    // implicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HeldFragment {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_offset_then_more_fragments() {
        let of = |v: u16| Fragment::of(v.to_be_bytes());
        assert_eq!(of(0), Fragment::Whole);
        assert_eq!(of(0x4000), Fragment::Whole, "DF alone");
        assert_eq!(of(IP_MF), Fragment::First);
        assert_eq!(of(IP_MF | 185), Fragment::Later);
        assert_eq!(of(370), Fragment::Later, "the last fragment");
        assert_eq!(of(0x4000 | IP_MF | 1), Fragment::Later);
    }

    #[test]
    fn entries_serve_for_the_reassembly_time_only() {
        let e = FragEntry {
            first_ns: 1_000,
            ..FragEntry::default()
        };
        assert!(e.is_fresh(1_000));
        assert!(e.is_fresh(1_000 + FRAGMENT_TIMEOUT_NS - 1));
        assert!(!e.is_fresh(1_000 + FRAGMENT_TIMEOUT_NS));
        assert!(e.is_fresh(0), "a clock read before the entry is no age");
    }

    #[test]
    fn a_held_fragment_reads_back_from_its_bytes() {
        let mut held = HeldFragment {
            tunnel_local: [10, 1, 1, 10],
            len: 3,
            _pad: [0; 2],
            packet: [0; HELD_MAX],
        };
        held.packet[..4].copy_from_slice(&[1, 2, 3, 4]);
        // SAFETY: a `repr(C)` struct of bytes and a u16, without padding.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                (&raw const held).cast::<u8>(),
                core::mem::size_of::<HeldFragment>(),
            )
        };
        assert_eq!(
            HeldFragment::read(bytes),
            Some(([10, 1, 1, 10], &[1, 2, 3][..]))
        );
        assert_eq!(HeldFragment::read(&bytes[..8 + 2]), None, "cut short");
    }

    #[test]
    fn layout_has_no_padding() {
        assert_eq!(core::mem::size_of::<FragKey>(), 12);
        assert_eq!(core::mem::size_of::<FragEntry>(), 24);
        assert_eq!(core::mem::size_of::<HeldFragment>(), 8 + HELD_MAX);
    }
}
