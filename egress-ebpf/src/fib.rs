//! Next hop from the kernel's FIB (`bpf_fib_lookup`), remembered per
//! route in [`ROUTES`](crate::maps::ROUTES), a direct-mapped cache per CPU.
//!
//! The FIB lookup is the most expensive step of an established packet
//! (about half its cost), yet its answer only changes when the host's
//! routes, neighbours, links or addresses do. The daemon bumps
//! [`ROUTES_GENERATION`](crate::maps::ROUTES_GENERATION) on every such
//! netlink notification, which retires every remembered answer at once;
//! a daemon that exits and leaves the data path running sets it to
//! [`UNWATCHED`](egress_common::route::UNWATCHED), which no answer is
//! remembered under: until the next daemon, every packet asks the FIB.

use aya_ebpf::bindings::{
    BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
    BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
    bpf_fib_lookup,
};
use aya_ebpf::helpers::bpf_fib_lookup as bpf_fib_lookup_helper;
use core::{ffi::c_void, mem::size_of};
use egress_common::{
    reason::Reason,
    route::{ROUTE_SLOTS, Route, RouteKey},
};

use crate::{
    maps::{self, ROUTES},
    packet::Hook,
};

const AF_INET: u8 = 2;

/// Where a packet goes next.
pub enum NextHop {
    /// Resolved: send out of `ifindex` with these MAC addresses.
    /// `ifindex` is the interface the packet arrived on when `back_out`
    /// (known here, where the arrival interface is at hand: reading it
    /// again after a head adjustment costs three dependent loads).
    Resolved {
        ifindex: u32,
        back_out: bool,
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
///
/// A resolved answer of the current generation is remembered with the
/// route's MTU; only packets that fit it are answered from memory, so
/// "too big" always comes from the kernel itself. Unresolved neighbours
/// and failures are never remembered: the next packet asks again.
#[inline(always)]
pub fn lookup<H: Hook>(
    hook: &H,
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    tot_len: u16,
) -> Result<NextHop, Reason> {
    let key = RouteKey::new(src, dst, hook.ingress_ifindex(), proto);
    let slot = maps::this_cpus(key.slot(), ROUTE_SLOTS);
    let generation = maps::routes_generation();
    let answer = |slot| {
        ROUTES
            .get(slot)
            .filter(|r| r.answers(&key, generation, tot_len))
    };
    let route = match answer(slot) {
        Some(r) => r,
        None => {
            let code = ask_kernel(hook.ctx(), &key, slot, tot_len, generation);
            if code < 0 {
                return Err(Reason::Internal);
            }
            match code as u32 {
                // Just written there (unless unwatched, the generation
                // lets the next packets take it too).
                BPF_FIB_LKUP_RET_SUCCESS => ROUTES.get(slot).ok_or(Reason::Internal)?,
                BPF_FIB_LKUP_RET_NO_NEIGH => return Ok(NextHop::Unresolved),
                BPF_FIB_LKUP_RET_BLACKHOLE
                | BPF_FIB_LKUP_RET_UNREACHABLE
                | BPF_FIB_LKUP_RET_PROHIBIT => return Err(Reason::NoRoute),
                BPF_FIB_LKUP_RET_FRAG_NEEDED => {
                    return Ok(NextHop::TooBig {
                        mtu: (code >> 32) as u16,
                    });
                }
                // Local destination, forwarding disabled on the interface,
                // unsupported encapsulation route, no source address.
                _ => return Err(Reason::NotForwarded),
            }
        }
    };
    Ok(NextHop::Resolved {
        ifindex: route.ifindex,
        back_out: route.ifindex == key.ifindex,
        src_mac: route.src_mac,
        dst_mac: route.dst_mac,
    })
}

/// `bpf_fib_lookup` for `key` and a packet of `tot_len` bytes; a resolved
/// answer goes into this CPU's [`ROUTES`] `slot` with the largest packet
/// known to fit. Returns the helper's code, negative if it failed, with a
/// "fragmentation needed" MTU in bits 32..48.
///
/// Not inlined: the lookup's 64-byte argument would otherwise sit on the
/// stack of every path that routes, past the BPF stack limit.
#[inline(never)]
fn ask_kernel(ctx: *mut c_void, key: &RouteKey, slot: u32, tot_len: u16, generation: u64) -> i64 {
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is its documented
    // "unset" state.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = key.proto as u8;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = key.ifindex;
    p.__bindgen_anon_3.ipv4_src = key.src;
    p.__bindgen_anon_4.ipv4_dst = key.dst;
    // SAFETY: `p` is a valid, exclusively borrowed lookup struct and the
    // context is the running program's.
    let rc = unsafe { bpf_fib_lookup_helper(ctx, &mut p, size_of::<bpf_fib_lookup>() as i32, 0) };
    // SAFETY (union reads): on success the kernel filled in the MAC
    // addresses and (since 5.12) the route's MTU where `tot_len` was (an
    // older kernel leaves `tot_len`, which fits too); on FRAG_NEEDED, the
    // MTU.
    let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
    // A negative `rc` (the helper failed) is no code below.
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let macs = unsafe { p.__bindgen_anon_6.__bindgen_anon_2 };
            let route = Route {
                key: *key,
                src_mac: macs.smac,
                dst_mac: macs.dmac,
                ifindex: p.ifindex,
                mtu: mtu.max(tot_len),
                _pad: [0; 2],
                generation,
            };
            // This CPU's own slot: no other reader or writer (and no
            // torn read).
            if let Some(entry) = ROUTES.get_ptr_mut(slot) {
                // SAFETY: a valid, aligned map value of this CPU.
                unsafe { *entry = route };
            }
            rc
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => rc | i64::from(mtu) << 32,
        _ => rc,
    }
}
