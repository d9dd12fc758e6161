//! Bounds-checked access to packet memory: the one place that turns packet
//! offsets into references, and the interface a hook (XDP or TC) offers the
//! translation logic.

use core::{ffi::c_void, mem::size_of};

use egress_common::reason::Reason;

use crate::l4::ChecksumUpdate;

/// The bytes of the packet currently in the hook's buffer.
#[derive(Clone, Copy)]
pub struct Packet {
    start: usize,
    end: usize,
    len: usize,
}

impl Packet {
    /// A packet that lies whole in `start..end`.
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self {
            start,
            end,
            len: end - start,
        }
    }

    /// A packet of `len` bytes of which only `start..end` is directly
    /// accessible (an skb's linear part; the rest is in fragments).
    #[inline(always)]
    pub fn nonlinear(start: usize, end: usize, len: usize) -> Self {
        Self { start, end, len }
    }

    /// The whole packet's length, accessible or not.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// A `T` (a wire header: `repr(C)`, alignment ≤ 2, any bit pattern
    /// valid) at byte `offset`, or `Truncated` if the packet is too short.
    ///
    /// # Safety
    /// The reference is valid until the hook's head is next adjusted; the
    /// caller must not keep references that alias (two headers at
    /// overlapping offsets) while writing through either.
    #[inline(always)]
    pub unsafe fn get<T>(&self, offset: usize) -> Result<&'static mut T, Reason> {
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            return Err(Reason::Truncated);
        }
        // SAFETY: [at, at + size_of::<T>()) lies inside the packet, checked
        // above in the form the verifier tracks; T has no invalid values.
        Ok(unsafe { &mut *(at as *mut T) })
    }
}

/// What the hook should do with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    /// Send back out of the interface it arrived on.
    Tx,
    /// Send out of another interface.
    Redirect(u32),
}

/// The hook-specific operations the translation logic needs.
pub trait Hook {
    /// The packet as it is now (re-read after every head adjustment).
    fn packet(&self) -> Packet;
    fn ingress_ifindex(&self) -> u32;
    /// The program's context, for helpers that take it (`bpf_fib_lookup`).
    fn ctx(&self) -> *mut c_void;
    /// Removes (`delta > 0`) or adds (`delta < 0`) bytes right after the
    /// Ethernet header; the caller then rewrites the Ethernet header.
    fn adjust_head(&mut self, delta: i32) -> Result<(), Reason>;
    /// Copies `len` bytes of the packet from `offset` to `to`, wherever
    /// they lie (an skb's fragments too).
    ///
    /// # Safety
    /// `to` must be valid for `len` bytes of writes.
    unsafe fn load_bytes(&self, offset: usize, to: *mut u8, len: usize) -> Result<(), Reason>;
    /// Cuts the packet to `len` bytes (never longer than it is).
    fn truncate(&mut self, len: usize) -> Result<(), Reason>;
    /// Updates a TCP or UDP checksum after a rewrite of 2 bytes of the
    /// segment, and perhaps of an address in the pseudo-header.
    /// Invalidates every packet reference: re-read [`Hook::packet`].
    fn update_l4_checksum(&mut self, update: &ChecksumUpdate) -> Result<(), Reason>;
    /// Whether a transport checksum may be pending here: left for the
    /// kernel or the NIC to fill in as the packet leaves (an skb's
    /// `CHECKSUM_PARTIAL`). Without, there is nothing to settle.
    const PENDING_CHECKSUMS: bool;
    /// Gives the transport checksum field at `at`, which holds `now`, the
    /// value `fixed` if it is pending; a finished field stays as it is.
    /// Only where [`Hook::PENDING_CHECKSUMS`] (the default does nothing).
    fn settle_pending_checksum(
        &mut self,
        _at: usize,
        _now: [u8; 2],
        _fixed: [u8; 2],
    ) -> Result<(), Reason> {
        Ok(())
    }
    /// The length of the largest IP packet this one of `ip_len` bytes will
    /// leave as, for the MTU check: itself, or one segment of an aggregate
    /// the kernel segments on output (TC's GRO/GSO packets).
    fn largest_segment(&self, ip_len: u16, l4_off: usize, proto: u8) -> u16;
    /// How many packets this one leaves as (at least 1): itself, or the
    /// segments of an aggregate the kernel segments on output, each with
    /// the next outer IP ID after the one the aggregate was given.
    fn segments(&self) -> u32;
}
