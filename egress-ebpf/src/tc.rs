//! The TC hook (TCX or clsact ingress): the same translation on socket buffers,
//! for interfaces without native XDP. Unlike an XDP frame, an skb may carry
//! checksum offload state, may be a GRO aggregate of many segments, and may
//! keep part of its data outside the directly accessible linear area.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_MARK_ENFORCE,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_redirect, bpf_skb_load_bytes},
    macros::classifier,
    programs::TcContext,
};
use egress_common::reason::Reason;

use crate::{
    l4::{self, ChecksumUpdate},
    nat::{self, ETH_LEN, IP_LEN, Outcome},
    packet::{Action, Hook, Packet},
};

/// Headers the translation reads and writes: Ethernet, outer and inner
/// IPv4, and a TCP header with the most options (MSS clamping reads them).
const HEADERS: u32 = (ETH_LEN + 2 * IP_LEN + 60) as u32;

/// Keep every segment of a GSO aggregate exactly as the sender cut it, only
/// 20 bytes shorter or longer: the default would change the segment size.
const KEEP_SEGMENTS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64;
/// Also mark an aggregate IPv4-in-IPv4, so segmentation repeats the outer
/// header on every segment.
const ENCAP_IPIP: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) as u64;

struct Tc(TcContext);

impl Tc {
    #[inline(always)]
    fn skb(&self) -> &__sk_buff {
        // SAFETY: the context of a classifier is its __sk_buff, valid for
        // the whole run.
        unsafe { &*(self.0.as_ptr() as *const __sk_buff) }
    }

    /// Makes the headers directly accessible (a GRO aggregate or a cloned
    /// skb may hold them outside the linear area).
    #[inline(always)]
    fn pull_headers(&self) -> Result<(), Reason> {
        let want = HEADERS.min(self.0.len());
        if (self.0.data_end() - self.0.data()) as u32 >= want {
            return Ok(());
        }
        self.0.pull_data(want).map_err(|_| Reason::Internal)
    }
}

impl Hook for Tc {
    #[inline(always)]
    fn packet(&self) -> Packet {
        Packet::nonlinear(self.0.data(), self.0.data_end(), self.0.len() as usize)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        self.skb().ingress_ifindex
    }

    #[inline(always)]
    fn ctx(&self) -> *mut c_void {
        self.0.as_ptr()
    }

    #[inline(always)]
    fn adjust_head(&mut self, delta: i32) -> Result<(), Reason> {
        // Only an aggregate needs telling what the new header is (and an
        // ICMP error built in a single packet is no encapsulation of it).
        let flags = if delta < 0 && self.skb().gso_size != 0 {
            ENCAP_IPIP
        } else {
            KEEP_SEGMENTS
        };
        self.0
            .adjust_room(-delta, BPF_ADJ_ROOM_MAC, flags)
            .map_err(|_| Reason::Internal)
    }

    #[inline(always)]
    unsafe fn load_bytes(&self, offset: usize, to: *mut u8, len: usize) -> Result<(), Reason> {
        // SAFETY: the caller's `to` takes `len` bytes.
        match unsafe { bpf_skb_load_bytes(self.0.as_ptr(), offset as u32, to.cast(), len as u32) } {
            0 => Ok(()),
            _ => Err(Reason::Internal),
        }
    }

    #[inline(always)]
    fn truncate(&mut self, len: usize) -> Result<(), Reason> {
        // Also drops a GSO aggregate's segmentation state: what is left is
        // one packet.
        self.0
            .change_tail(len as u32, 0)
            .map_err(|_| Reason::Internal)
    }

    #[inline(always)]
    fn update_l4_checksum(&mut self, update: &ChecksumUpdate) -> Result<(), Reason> {
        // The kernel's helpers know the skb's checksum state: with offload
        // (CHECKSUM_PARTIAL) the field holds only the pseudo-header sum, so
        // an address changes it and segment bytes must not; a received
        // CHECKSUM_COMPLETE sum is kept in step.
        let mangled = if update.udp {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        if let Some((old, new)) = update.addr {
            self.0
                .l4_csum_replace(
                    update.at,
                    u64::from(u32::from_ne_bytes(old)),
                    u64::from(u32::from_ne_bytes(new)),
                    BPF_F_PSEUDO_HDR as u64 | mangled | 4,
                )
                .map_err(|_| Reason::Internal)?;
        }
        let (old, new) = update.word;
        self.0
            .l4_csum_replace(
                update.at,
                u64::from(u16::from_ne_bytes(old)),
                u64::from(u16::from_ne_bytes(new)),
                mangled | 2,
            )
            .map_err(|_| Reason::Internal)
    }

    const PENDING_CHECKSUMS: bool = true;

    #[inline(always)]
    fn settle_pending_checksum(
        &mut self,
        at: usize,
        now: [u8; 2],
        fixed: [u8; 2],
    ) -> Result<(), Reason> {
        // No helper tells whether the skb is CHECKSUM_PARTIAL, but
        // bpf_l4_csum_replace treats the two states apart. By d = fixed -
        // now, a pseudo-header change moves a pending field (a plain sum)
        // up and a finished one (a complemented sum) down; a change of the
        // segment moves only a finished one, up. Both together set a
        // pending field to `fixed` and bring a finished one back, where
        // "mangled 0" restores a 0xffff that the sums would leave as 0.
        let [now, fixed] = [now, fixed].map(|v| u64::from(u16::from_ne_bytes(v)));
        let back = (BPF_F_MARK_MANGLED_0 | BPF_F_MARK_ENFORCE) as u64 | 2;
        self.0
            .l4_csum_replace(at, now, fixed, BPF_F_PSEUDO_HDR as u64 | 2)
            .and_then(|()| self.0.l4_csum_replace(at, fixed, now, back))
            .map_err(|_| Reason::Internal)
    }

    #[inline(always)]
    fn largest_segment(&self, ip_len: u16, l4_off: usize, proto: u8) -> u16 {
        let gso_size = self.skb().gso_size;
        if gso_size == 0 {
            return ip_len;
        }
        // Each segment repeats the IP and transport headers and carries at
        // most `gso_size` bytes of payload.
        let headers = match l4::header_len(self.packet(), l4_off, proto) {
            Ok(n) => (IP_LEN + n) as u32,
            Err(_) => return ip_len,
        };
        (headers + gso_size).min(u32::from(ip_len)) as u16
    }

    #[inline(always)]
    fn segments(&self) -> u32 {
        // 0 outside an aggregate; read before the head adjustment, which
        // clears it in one.
        self.skb().gso_segs.max(1)
    }
}

#[classifier]
pub fn egress_tc(ctx: TcContext) -> i32 {
    let mut hook = Tc(ctx);
    match nat::conclude(
        hook.pull_headers()
            .map_err(Outcome::from)
            .and_then(|()| nat::process(&mut hook)),
    ) {
        // "Next" (TCX_NEXT), not "OK": what we pass goes on to whatever
        // other program hangs on the hook after us, then to the stack, as
        // if we were not there.
        Action::Pass => TC_ACT_UNSPEC,
        Action::Drop => TC_ACT_SHOT,
        // SAFETY: no preconditions; with flags 0 (egress) it returns
        // TC_ACT_REDIRECT.
        Action::Tx => unsafe { bpf_redirect(hook.ingress_ifindex(), 0) as i32 },
        // SAFETY: as above.
        Action::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
    }
}
