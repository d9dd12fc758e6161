//! ICMP errors the gateway itself sends: to a client, through the tunnel,
//! about a packet it sent; or to an Internet host about a packet it sent to
//! a translation address.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::map, maps::PerCpuArray};
use egress_common::{
    checksum::{pending_fixed_point, sum_words},
    config::OUTER_TTL,
    flow::{IPPROTO_ICMP, IPPROTO_IPIP, IPPROTO_TCP},
    fragment::Fragment,
    headers::{
        ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_LEN, ICMP_TIME_EXCEEDED, IPV4_LEN, Ipv4,
        TOS_CONTROL, icmp_error,
    },
    reason::Reason,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    clock,
    fib::{self, NextHop},
    l4, maps,
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
/// inner source, quoting the inner header and its transport header,
/// encapsulated back to the peer it came from. The packet is counted under
/// `reason` whether or not the error is sent (rate limit, no route back).
#[inline(always)]
pub fn to_client<H: Hook>(hook: &mut H, error: Error, reason: Reason) -> Result<Outcome, Outcome> {
    let cfg = maps::config();
    if is_later_fragment(hook.packet(), ETH_LEN + IPV4_LEN) || !allowed(clock::now()) {
        return Err(reason.into());
    }
    let pkt = hook.packet();
    // SAFETY: copies out of the packet.
    let (orig, peer, proto) = unsafe {
        (
            *pkt.get::<EthHdr>(0)?,
            *pkt.get::<[u8; 4]>(PEER)?,
            pkt.get::<Ipv4Hdr>(ETH_LEN + IPV4_LEN)?.proto,
        )
    };
    let len = IPV4_LEN + error_len(proto);
    let hop = fib::lookup(hook, cfg.tunnel_local, peer, IPPROTO_IPIP, len as u16)?;
    if !matches!(hop, NextHop::Resolved { .. }) {
        return Err(reason.into());
    }
    rewrite::<H, true>(hook, error, proto)?;
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
    let len = error_len(ip.proto) as u16;
    let hop = fib::lookup(hook, ip.dst_addr, ip.src_addr, IPPROTO_ICMP, len)?;
    if !matches!(hop, NextHop::Resolved { .. }) {
        return Err(reason.into());
    }
    rewrite::<H, false>(hook, error, ip.proto)?;
    send(hook.packet(), &hop, &orig, reason)
}

/// Where the outer source (the peer) sits in a frame from a peer.
const PEER: usize = ETH_LEN + 12;

/// How much of a packet of `proto` an error quotes: its IP header and the
/// transport header the translation reads, 8 bytes (RFC 792) or TCP's 20,
/// which hold its checksum.
#[inline(always)]
fn quote_len(proto: u8) -> usize {
    IPV4_LEN + l4::min_len(proto)
}

/// The error's IP packet: its IP header, the ICMP header and the quote.
#[inline(always)]
fn error_len(proto: u8) -> usize {
    IPV4_LEN + ICMP_LEN + quote_len(proto)
}

/// Turns the frame in the hook into `error` about the packet of `proto` in
/// it (`TUNNEL`: the inner packet of a frame from a peer, encapsulated back
/// to that peer), Ethernet header still to be written.
///
/// A function of its own, and off the fast path: inlined, its buffers would
/// push the program past the 512-byte BPF stack. (It returns no more than
/// fits the one BPF return register.)
#[inline(never)]
fn rewrite<H: Hook, const TUNNEL: bool>(
    hook: &mut H,
    error: Error,
    proto: u8,
) -> Result<(), Reason> {
    let cfg = maps::config();
    // The quoted packet's IP header before the rewrite, the error's after.
    let quoted = if TUNNEL { ETH_LEN + IPV4_LEN } else { ETH_LEN };
    let error_len = error_len(proto);
    // SAFETY: a copy out of the packet.
    let peer = unsafe { *hook.packet().get::<[u8; 4]>(PEER)? };
    // Cut first: a GSO aggregate is then one packet, whose headers grow
    // with no encapsulation to note (the kernel cuts no packet so marked).
    hook.truncate(quoted + quote_len(proto))?;
    // The quote stays where it is and the headers grow in front of it: the
    // error's IP and ICMP headers (and the outer header) take the place of
    // the old Ethernet (and outer) header plus this many bytes.
    hook.adjust_head(-((IPV4_LEN + ICMP_LEN) as i32))?;
    let quote = quoted + IPV4_LEN + ICMP_LEN;
    settle_quoted_checksum(hook, quote + IPV4_LEN, proto)?;
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
        let ip: &[u8; IPV4_LEN] = pkt.get(quote)?;
        let sender = [ip[12], ip[13], ip[14], ip[15]];
        // The address the packet was sent to: our translation address.
        let sent_to = [ip[16], ip[17], ip[18], ip[19]];
        // The ICMP header first: the quote's sum is then dead before the
        // random IDs' helper calls (kept across them it overflows the stack).
        let quote_sum = sum_words(ip) + transport_sum(pkt, quote + IPV4_LEN, proto)?;
        let Error { kind, code, mtu } = error;
        icmp_error(kind, code, mtu, quote_sum, pkt.get(quoted + IPV4_LEN)?);
        let error_src = if TUNNEL {
            let outer = header(IPV4_LEN + error_len, IPPROTO_IPIP, cfg.tunnel_local, peer);
            outer.write(pkt.get(ETH_LEN)?);
            cfg.tunnel_local
        } else {
            sent_to
        };
        header(error_len, IPPROTO_ICMP, error_src, sender).write(pkt.get(quoted)?);
    }
    Ok(())
}

/// The sum of the words of the quoted transport header at `at`.
///
/// # Safety
/// No reference into the packet may be written through meanwhile.
#[inline(always)]
unsafe fn transport_sum(pkt: Packet, at: usize, proto: u8) -> Result<u32, Reason> {
    // SAFETY: read-only views, as the caller guarantees.
    unsafe {
        let mut sum = sum_words(pkt.get::<[u8; 8]>(at)?);
        if proto == IPPROTO_TCP {
            sum += sum_words(pkt.get::<[u8; 12]>(at + 8)?);
        }
        Ok(sum)
    }
}

/// Makes the checksum of the quoted transport header at `at` one that the
/// way out leaves alone. A packet whose checksum was still to be filled in
/// (a GRO aggregate, a local sender's packet) keeps that state through the
/// rewrite, and the field is now inside the quote: the kernel or the NIC
/// would write the quote's checksum into it after the error's own checksum
/// was summed, and the sender would drop the error.
#[inline(always)]
fn settle_quoted_checksum<H: Hook>(hook: &mut H, at: usize, proto: u8) -> Result<(), Reason> {
    let Some(check) = l4::checksum_offset(proto).filter(|_| H::PENDING_CHECKSUMS) else {
        return Ok(());
    };
    let pkt = hook.packet();
    // SAFETY: read-only views of the packet.
    let (now, sum) = unsafe {
        (
            *pkt.get::<[u8; 2]>(at + check)?,
            transport_sum(pkt, at, proto)?,
        )
    };
    // A pending field holds a nonzero sum; zero is UDP's "no checksum".
    if now == [0, 0] {
        return Ok(());
    }
    let others = sum + u32::from(!u16::from_be_bytes(now));
    hook.settle_pending_checksum(at + check, now, pending_fixed_point(others))
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
