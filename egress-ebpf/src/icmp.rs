//! ICMP errors the gateway itself sends to a client, through the tunnel.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::map, maps::PerCpuArray};
use egress_common::{
    config::OUTER_TTL,
    flow::{IPPROTO_ICMP, IPPROTO_IPIP},
    headers::{ICMP_LEN, IPV4_LEN, Ipv4, QUOTE_LEN, icmp_error},
    reason::Reason,
};
use network_types::eth::EthHdr;

use crate::{
    fib::{self, NextHop},
    maps,
    nat::{ETH_LEN, Outcome, send},
    packet::Hook,
    state,
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

/// Answers the outbound IP-in-IP packet in the hook with an ICMP error of
/// `kind`/`code` to its inner source, quoting the inner header and 8 bytes,
/// encapsulated back to the peer it came from. The packet is counted under
/// `reason` whether or not the error is sent (rate limit, no route back).
#[inline(always)]
pub fn to_client<H: Hook>(
    hook: &mut H,
    kind: u8,
    code: u8,
    reason: Reason,
) -> Result<Outcome, Outcome> {
    let cfg = maps::config();
    if !allowed(state::now()) {
        return Err(reason.into());
    }
    let pkt = hook.packet();
    // SAFETY: copies out of the packet.
    let (orig, peer) = unsafe { (*pkt.get::<EthHdr>(0)?, *pkt.get::<[u8; 4]>(PEER)?) };
    let hop = fib::lookup(hook, cfg.tunnel_local, peer, IPPROTO_IPIP, OUTER_LEN as u16)?;
    if matches!(hop, NextHop::Unresolved) {
        return Err(reason.into());
    }
    rewrite(hook, kind, code)?;
    send(hook, hook.packet(), &hop, &orig, reason)
}

/// Where the outer source (the peer) sits in a frame from a peer.
const PEER: usize = ETH_LEN + 12;
/// The error's IP packet: its IP header, the ICMP header and the quote.
const ERROR_LEN: usize = IPV4_LEN + ICMP_LEN + QUOTE_LEN;
/// The error encapsulated to the peer.
const OUTER_LEN: usize = IPV4_LEN + ERROR_LEN;

/// Turns the frame from a peer into the error for [`to_client`], Ethernet
/// header still to be written.
///
/// A function of its own, and off the fast path: inlined, its buffers would
/// push the program past the 512-byte BPF stack. (It returns no more than
/// fits the one BPF return register.)
#[inline(never)]
fn rewrite<H: Hook>(hook: &mut H, kind: u8, code: u8) -> Result<(), Reason> {
    let cfg = maps::config();
    // SAFETY: a copy out of the packet.
    let peer = unsafe { *hook.packet().get::<[u8; 4]>(PEER)? };
    // The quote stays where it is and the headers grow in front of it: the
    // outer header, the error's IP header and the ICMP header take the place
    // of the old Ethernet and outer headers plus this many bytes.
    hook.adjust_head(-((IPV4_LEN + ICMP_LEN) as i32))?;
    hook.truncate(ETH_LEN + OUTER_LEN)?;
    let pkt = hook.packet();
    let header = |tot_len: usize, proto, dst| Ipv4 {
        tos: TOS_CONTROL,
        tot_len: tot_len as u16,
        // SAFETY: no preconditions.
        id: unsafe { bpf_get_prandom_u32() } as u16,
        df: false,
        ttl: OUTER_TTL,
        proto,
        src: cfg.tunnel_local,
        dst,
    };
    // SAFETY: disjoint headers, the only live references into the packet.
    unsafe {
        let quote: &[u8; QUOTE_LEN] = pkt.get(ETH_LEN + OUTER_LEN - QUOTE_LEN)?;
        let client = [quote[12], quote[13], quote[14], quote[15]];
        header(OUTER_LEN, IPPROTO_IPIP, peer).write(pkt.get(ETH_LEN)?);
        header(ERROR_LEN, IPPROTO_ICMP, client).write(pkt.get(ETH_LEN + IPV4_LEN)?);
        icmp_error(kind, code, quote, pkt.get(ETH_LEN + 2 * IPV4_LEN)?);
    }
    Ok(())
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
