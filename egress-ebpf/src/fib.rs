//! Next hop from the kernel's FIB (`bpf_fib_lookup`).

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
    BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
    bpf_fib_lookup,
};
use aya_ebpf::helpers::bpf_fib_lookup as bpf_fib_lookup_helper;
use core::mem::size_of;
use egress_common::reason::Reason;

use crate::packet::Hook;

const AF_INET: u8 = 2;

/// Where a packet goes next.
pub enum NextHop {
    /// Resolved: send out of `ifindex` with these MAC addresses.
    Resolved {
        ifindex: u32,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
    },
    /// Routed, but the neighbour is not resolved yet: the kernel's own
    /// forwarding path must take this packet (and will resolve it).
    Unresolved,
    /// Routed, but the packet is larger than `mtu`, the route's MTU: the
    /// caller answers "fragmentation needed" (DF set) or leaves it to the
    /// kernel's forwarding path, which fragments it.
    TooBig { mtu: u16 },
}

/// Looks up the route for an IPv4 packet of `tot_len` bytes from `src` to
/// `dst`, as if it arrived on the hook's interface; checks the egress MTU.
#[inline(always)]
pub fn lookup<H: Hook>(
    hook: &H,
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    tot_len: u16,
) -> Result<NextHop, Reason> {
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is its documented
    // "unset" state.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = hook.ingress_ifindex();
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `p` is a valid, exclusively borrowed lookup struct and the
    // context is the running program's.
    let rc =
        unsafe { bpf_fib_lookup_helper(hook.ctx(), &mut p, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc < 0 {
        return Err(Reason::Internal);
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // SAFETY: on success the kernel filled in the MAC addresses.
            let macs = unsafe { p.__bindgen_anon_6.__bindgen_anon_2 };
            Ok(NextHop::Resolved {
                ifindex: p.ifindex,
                src_mac: macs.smac,
                dst_mac: macs.dmac,
            })
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(NextHop::Unresolved),
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Err(Reason::NoRoute)
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Ok(NextHop::TooBig {
            // SAFETY: on FRAG_NEEDED the kernel stored the MTU there.
            mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        }),
        // Local destination, forwarding disabled on the interface,
        // unsupported encapsulation route, no source address.
        _ => Err(Reason::NotForwarded),
    }
}
