//! ICMP errors the gateway itself sends: to a client, through the tunnel,
//! about a packet it sent; or to an Internet host about a packet it sent to
//! a translation address.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::map, maps::PerCpuArray};
use egress_common::{
    config::OUTER_TTL,
    flow::{IPPROTO_ICMP, IPPROTO_IPIP},
    fragment::Fragment,
    headers::{
        ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_LEN, ICMP_TIME_EXCEEDED, IPV4_LEN, Ipv4,
        QUOTE_LEN, icmp_error,
    },
    reason::Reason,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    clock,
    fib::{self, NextHop},
    maps,
    nat::{ETH_LEN, Outcome, send},
    packet::{Hook, Packet},
};

/// Errors per second each CPU may send, and the burst it may save up
/// (Linux's `icmp_msgs_per_sec` and `icmp_msgs_burst` defaults).
const PER_SECOND: u64 = 1000;
const BURST: u64 = 50;
const COST_NS: u64 = 1_000_000_000 / PER_SECOND;

/// Token bucket per CPU: `[credit in ns, time of the last refill]`.
#[map]
static ICMP_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// IP precedence "internetwork control", as Linux marks the errors it sends.
const TOS_CONTROL: u8 = 0xc0;

/// An ICMP error to send.
#[derive(Clone, Copy)]
pub struct Error {
    kind: u8,
    code: u8,
    /// Next-hop MTU, for "fragmentation needed"; 0 otherwise.
    mtu: u16,
}

impl Error {
    pub const TIME_EXCEEDED: Self = Self::new(ICMP_TIME_EXCEEDED, 0);

    pub const fn new(kind: u8, code: u8) -> Self {
        Self { kind, code, mtu: 0 }
    }

    /// "Fragmentation needed and DF set" with the MTU the packet must fit.
    pub const fn frag_needed(mtu: u16) -> Self {
        Self {
            kind: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            mtu,
        }
    }
}

/// Answers the outbound IP-in-IP packet in the hook with `error` to its
/// inner source, quoting the inner header and 8 bytes, encapsulated back to
/// the peer it came from. The packet is counted under `reason` whether or
/// not the error is sent (rate limit, no route back).
#[inline(always)]
pub fn to_client<H: Hook>(hook: &mut H, error: Error, reason: Reason) -> Result<Outcome, Outcome> {
    let cfg = maps::config();
    if is_later_fragment(hook.packet(), ETH_LEN + IPV4_LEN) || !allowed(clock::now()) {
        return Err(reason.into());
    }
    let pkt = hook.packet();
    // SAFETY: copies out of the packet.
    let (orig, peer) = unsafe { (*pkt.get::<EthHdr>(0)?, *pkt.get::<[u8; 4]>(PEER)?) };
    let hop = fib::lookup(hook, cfg.tunnel_local, peer, IPPROTO_IPIP, OUTER_LEN as u16)?;
    if !matches!(hop, NextHop::Resolved { .. }) {
        return Err(reason.into());
    }
    rewrite::<H, true>(hook, error.kind, error.code, error.mtu)?;
    send(hook.packet(), &hop, &orig, reason)
}

/// Answers the packet in the hook, from the Internet to a translation
/// address, with `error` to its source, from the address it was sent to.
/// Counted under `reason` whether or not the error is sent.
#[inline(always)]
pub fn to_sender<H: Hook>(hook: &mut H, error: Error, reason: Reason) -> Result<Outcome, Outcome> {
    if is_later_fragment(hook.packet(), ETH_LEN) || !allowed(clock::now()) {
        return Err(reason.into());
    }
    let pkt = hook.packet();
    // SAFETY: copies out of the packet.
    let (orig, ip) = unsafe { (*pkt.get::<EthHdr>(0)?, *pkt.get::<Ipv4Hdr>(ETH_LEN)?) };
    let hop = fib::lookup(
        hook,
        ip.dst_addr,
        ip.src_addr,
        IPPROTO_ICMP,
        ERROR_LEN as u16,
    )?;
    if !matches!(hop, NextHop::Resolved { .. }) {
        return Err(reason.into());
    }
    rewrite::<H, false>(hook, error.kind, error.code, error.mtu)?;
    send(hook.packet(), &hop, &orig, reason)
}

/// Where the outer source (the peer) sits in a frame from a peer.
const PEER: usize = ETH_LEN + 12;
/// The error's IP packet: its IP header, the ICMP header and the quote.
const ERROR_LEN: usize = IPV4_LEN + ICMP_LEN + QUOTE_LEN;
/// The error encapsulated to the peer.
const OUTER_LEN: usize = IPV4_LEN + ERROR_LEN;

/// Turns the frame in the hook into `kind`/`code` about the packet in it
/// (`TUNNEL`: the inner packet of a frame from a peer, encapsulated back to
/// that peer), Ethernet header still to be written.
///
/// A function of its own, and off the fast path: inlined, its buffers would
/// push the program past the 512-byte BPF stack. (It returns no more than
/// fits the one BPF return register.)
#[inline(never)]
fn rewrite<H: Hook, const TUNNEL: bool>(
    hook: &mut H,
    kind: u8,
    code: u8,
    mtu: u16,
) -> Result<(), Reason> {
    let cfg = maps::config();
    // The quoted packet's IP header, before and after the rewrite.
    let quoted = if TUNNEL { ETH_LEN + IPV4_LEN } else { ETH_LEN };
    // SAFETY: a copy out of the packet.
    let peer = unsafe { *hook.packet().get::<[u8; 4]>(PEER)? };
    // The quote stays where it is and the headers grow in front of it: the
    // error's IP and ICMP headers (and the outer header) take the place of
    // the old Ethernet (and outer) header plus this many bytes.
    hook.adjust_head(-((IPV4_LEN + ICMP_LEN) as i32))?;
    hook.truncate(quoted + ERROR_LEN)?;
    let pkt = hook.packet();
    let header = |tot_len: usize, proto, src, dst| Ipv4 {
        tos: TOS_CONTROL,
        tot_len: tot_len as u16,
        // SAFETY: no preconditions.
        id: unsafe { bpf_get_prandom_u32() } as u16,
        df: false,
        ttl: OUTER_TTL,
        proto,
        src,
        dst,
    };
    // SAFETY: disjoint headers, the only live references into the packet.
    unsafe {
        let quote: &[u8; QUOTE_LEN] = pkt.get(quoted + IPV4_LEN + ICMP_LEN)?;
        let sender = [quote[12], quote[13], quote[14], quote[15]];
        let error_src = if TUNNEL {
            header(OUTER_LEN, IPPROTO_IPIP, cfg.tunnel_local, peer).write(pkt.get(ETH_LEN)?);
            cfg.tunnel_local
        } else {
            // The address the packet was sent to: our translation address.
            [quote[16], quote[17], quote[18], quote[19]]
        };
        header(ERROR_LEN, IPPROTO_ICMP, error_src, sender).write(pkt.get(quoted)?);
        icmp_error(kind, code, mtu, quote, pkt.get(quoted + IPV4_LEN)?);
    }
    Ok(())
}

/// Whether the IP header at `at` is of a fragment other than the first,
/// which gets no ICMP error (RFC 1122 3.2.2): its quote would hold no
/// transport header for the sender to match.
#[inline(always)]
fn is_later_fragment(pkt: Packet, at: usize) -> bool {
    // SAFETY: a read-only view.
    unsafe { pkt.get::<Ipv4Hdr>(at) }.is_ok_and(|ip| Fragment::of(ip.frags) == Fragment::Later)
}

/// Takes one error's worth from this CPU's bucket, if there is one.
#[inline(always)]
fn allowed(now: u64) -> bool {
    let Some(bucket) = ICMP_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    let [credit, last] = unsafe { &mut *bucket };
    let available = (*credit + now.saturating_sub(*last)).min(BURST * COST_NS);
    *last = now;
    if available < COST_NS {
        *credit = available;
        return false;
    }
    *credit = available - COST_NS;
    true
}
