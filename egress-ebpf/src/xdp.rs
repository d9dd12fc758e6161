//! The XDP hook.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes},
    macros::xdp,
    programs::XdpContext,
};
use egress_common::reason::Reason;

use crate::{
    l4::ChecksumUpdate,
    nat,
    packet::{Action, Hook, Packet},
};

struct Xdp(XdpContext);

impl Hook for Xdp {
    #[inline(always)]
    fn packet(&self) -> Packet {
        Packet::new(self.0.data(), self.0.data_end())
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn ctx(&self) -> *mut c_void {
        self.0.as_ptr()
    }

    #[inline(always)]
    fn adjust_head(&mut self, delta: i32) -> Result<(), Reason> {
        // SAFETY: the caller re-reads the packet afterwards.
        match unsafe { bpf_xdp_adjust_head(self.0.ctx, delta) } {
            0 => Ok(()),
            _ => Err(Reason::Internal),
        }
    }

    #[inline(always)]
    unsafe fn load_bytes(&self, offset: usize, to: *mut u8, len: usize) -> Result<(), Reason> {
        // SAFETY: the caller's `to` takes `len` bytes.
        match unsafe { bpf_xdp_load_bytes(self.0.ctx, offset as u32, to.cast(), len as u32) } {
            0 => Ok(()),
            _ => Err(Reason::Internal),
        }
    }

    #[inline(always)]
    fn truncate(&mut self, len: usize) -> Result<(), Reason> {
        let delta = len as i32 - self.packet().len() as i32;
        // SAFETY: the caller re-reads the packet afterwards.
        match unsafe { bpf_xdp_adjust_tail(self.0.ctx, delta) } {
            0 => Ok(()),
            _ => Err(Reason::Internal),
        }
    }

    #[inline(always)]
    fn update_l4_checksum(&mut self, update: &ChecksumUpdate) -> Result<(), Reason> {
        // XDP frames carry no offload state: the field is the full checksum.
        update.apply_in_place(self.packet())
    }

    /// An XDP frame is bytes only.
    const PENDING_CHECKSUMS: bool = false;

    #[inline(always)]
    fn largest_segment(&self, ip_len: u16, _l4_off: usize, _proto: u8) -> u16 {
        // An XDP frame is one packet on the wire.
        ip_len
    }

    #[inline(always)]
    fn segments(&self) -> u32 {
        1
    }
}

#[xdp]
pub fn egress_xdp(ctx: XdpContext) -> u32 {
    match nat::conclude(nat::process(&mut Xdp(ctx))) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Tx => xdp_action::XDP_TX,
        // SAFETY: no preconditions; with flags 0 it returns XDP_REDIRECT.
        Action::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
    }
}
