//! ICMP errors about a translated flow (RFC 5508), either way. The packet an
//! error quotes is one the gateway translated, going the other way, so the
//! quote is translated back like the error's own address on the same side:
//!
//! - from the Internet (to a translation address), quoting a packet the
//!   flow sent: the error's destination and the quote's source become the
//!   client's again, and the error is encapsulated to the flow's peer;
//! - from a client (through the tunnel), quoting a return packet the client
//!   received: the error's source and the quote's destination become the
//!   translation, and the error is decapsulated and routed to the remote.
//!
//! Type and code are kept, and an error never creates or refreshes its
//! flow. One from the Internet that matches no flow is the kernel's (it may
//! be about the host's own traffic); one from a client that matches none is
//! dropped. Neither is ever forwarded elsewhere. One that does match a flow
//! has its ICMP checksum verified first, over the whole message, and is
//! dropped if it is wrong (RFC 5508 REQ-3).

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::helpers::bpf_loop;
use egress_common::{
    checksum::{CHUNK, CHUNK_WORDS, Incremental, sum_chunk, sum_verifies},
    config::Config,
    flow::{DIR_IN, DIR_OUT, FlowKey, IPPROTO_ICMP, IPPROTO_UDP},
    fragment::Fragment,
    headers::{ICMP_LEN, QUOTE_LEN},
    reason::Reason,
    rewrite,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    fib::{self, NextHop},
    inbound,
    l4::{self, IcmpEcho, PortPair, Side, TCP_CHECK, UDP_CHECK},
    nat::{ETH_LEN, IP_LEN, Outcome, has_df, send},
    packet::{Hook, Packet},
    state,
};

/// Offsets from an error's IP header: its ICMP header, and the IP and
/// transport headers of the packet it quotes.
const ICMP_AT: usize = IP_LEN;
const QUOTED_IP: usize = ICMP_AT + ICMP_LEN;
const QUOTED_L4: usize = QUOTED_IP + IP_LEN;

/// Where the error's IP header is in a frame from a peer.
const FROM_PEER: usize = ETH_LEN + IP_LEN;

/// Relays the ICMP error in the hook (a 20-byte IP header, not a fragment,
/// no longer than the frame), from the Internet to a translation address,
/// to the client whose flow it is about.
pub fn from_internet<H: Hook>(hook: &mut H, cfg: &Config) -> Result<Outcome, Outcome> {
    let pkt = hook.packet();
    // SAFETY: a read-only view.
    let ip = unsafe { pkt.get::<Ipv4Hdr>(ETH_LEN)? };
    let len = ip.tot_len();
    // A quote too short to name a flow is the kernel's to judge.
    let key = quoted_flow(pkt, ETH_LEN, len, Side::Src).map_err(|_| Reason::NotOurs)?;
    let flow = state::find(&key).ok_or(Reason::NotOurs)?;
    intact(hook, ETH_LEN, len)?;
    // Never an ICMP error about an ICMP error (RFC 1122 3.2.2): these two
    // are dropped unanswered.
    if ip.ttl <= 1 {
        return Err(Reason::TtlExceeded.into());
    }
    let hop = inbound::route_to_peer(hook, cfg, flow.peer_addr, len, IPPROTO_ICMP)?;
    if matches!(hop, NextHop::TooBig { .. }) && has_df(ip) {
        return Err(Reason::TooBig.into());
    }
    let client = (flow.client_addr, flow.client_port);
    translate(hook, ETH_LEN, Side::Dst, client, true, len)?;
    inbound::encapsulate(hook, cfg, flow.peer_addr, &hop, Reason::IcmpErrorRelayed)
}

/// Relays the ICMP error of `len` bytes that `peer` tunnelled to us (headers
/// checked, not a fragment, its sender a client of the peer) to the remote
/// host whose packet to the client it quotes.
pub fn from_client<H: Hook>(hook: &mut H, peer: [u8; 4], len: u16) -> Result<Outcome, Outcome> {
    let pkt = hook.packet();
    let key = quoted_flow(pkt, FROM_PEER, len, Side::Dst).map_err(|r| match r {
        Reason::Truncated => r,
        _ => Reason::IcmpErrorNoFlow,
    })?;
    // Only the peer the flow's return traffic goes to has seen its packets.
    let flow = state::find(&key)
        .filter(|f| f.peer_addr == peer)
        .ok_or(Reason::IcmpErrorNoFlow)?;
    intact(hook, FROM_PEER, len)?;
    // SAFETY: a copy of the error's header and one of the Ethernet header.
    let (ip, orig) = unsafe { (*pkt.get::<Ipv4Hdr>(FROM_PEER)?, *pkt.get::<EthHdr>(0)?) };
    if ip.ttl <= 1 {
        return Err(Reason::TtlExceeded.into());
    }
    let hop = fib::lookup(hook, flow.nat_addr, flow.remote_addr, IPPROTO_ICMP, len)?;
    if matches!(hop, NextHop::TooBig { .. }) && has_df(&ip) {
        return Err(Reason::TooBig.into());
    }
    // The kernel's forwarding path decrements the TTL itself.
    let dec_ttl = matches!(hop, NextHop::Resolved { .. });
    let nat = (flow.nat_addr, flow.nat_port);
    translate(hook, FROM_PEER, Side::Src, nat, dec_ttl, len)?;
    hook.adjust_head(IP_LEN as i32)?;
    send(hook.packet(), &hop, &orig, Reason::IcmpErrorRelayed)
}

/// The key of the flow half the error of `len` bytes at `at` is about: the
/// quoted packet went the other way, translated on its `side`, so the flow
/// half of its reply is keyed by the quote's addresses and ports swapped.
///
/// Only a quote of the IP header and the 8 bytes after it (RFC 792) within
/// the error's own length names a flow (`Truncated` otherwise): bytes after
/// the error are not the quote's. No flow's packet carries IP options, an
/// error goes back to the source of the packet it quotes, and a later
/// fragment's "ports" would be payload: anything else is `Unsupported`.
#[inline(always)]
fn quoted_flow(pkt: Packet, at: usize, len: u16, side: Side) -> Result<FlowKey, Reason> {
    if usize::from(len) < IP_LEN + ICMP_LEN + QUOTE_LEN {
        return Err(Reason::Truncated);
    }
    // SAFETY: read-only views of non-overlapping headers.
    let (ip, quoted) = unsafe { (pkt.get::<Ipv4Hdr>(at)?, pkt.get::<Ipv4Hdr>(at + QUOTED_IP)?) };
    if quoted.vihl != 0x45
        || quoted.src_addr != ip.dst_addr
        || Fragment::of(quoted.frags) == Fragment::Later
    {
        return Err(Reason::Unsupported);
    }
    let (sport, dport) = l4::quoted_ports(pkt, at + QUOTED_L4, quoted.proto, side)?;
    Ok(FlowKey {
        src: quoted.dst_addr,
        dst: quoted.src_addr,
        sport: dport,
        dport: sport,
        proto: quoted.proto,
        dir: match side {
            Side::Src => DIR_IN,
            Side::Dst => DIR_OUT,
        },
        _pad: [0; 2],
    })
}

/// Sets `side`'s address of the error at `at` (its IP packet `len` bytes
/// long) to `to.0`, optionally decrementing its TTL, and the quote's other
/// side to `to.0`:`to.1` (port or echo identifier), with every checksum
/// involved: the error's IP header, the quoted IP header, the quoted
/// transport checksum when it is quoted, and the ICMP checksum, which
/// covers all the quoted bytes. Bytes after the error's IP packet (Ethernet
/// padding) are not the quote's.
#[inline(always)]
fn translate<H: Hook>(
    hook: &mut H,
    at: usize,
    side: Side,
    to: ([u8; 4], [u8; 2]),
    dec_ttl: bool,
    len: u16,
) -> Result<(), Reason> {
    let (addr, port) = to;
    let quote_side = side.other();
    let end = at + usize::from(len);
    let pkt = hook.packet();
    // SAFETY: disjoint headers, each the only live reference to its bytes.
    unsafe {
        rewrite::ipv4(pkt.get(at)?, side, addr, dec_ttl);

        let quoted: &mut [u8; IP_LEN] = pkt.get(at + QUOTED_IP)?;
        let old_check = [quoted[10], quoted[11]];
        let old_addr = rewrite::ipv4(quoted, quote_side, addr, false);
        let icmp: &mut [u8; 4] = pkt.get(at + ICMP_AT)?;
        let mut sum = Incremental::new([icmp[2], icmp[3]])
            .replace4(old_addr, addr)
            .replace2(old_check, [quoted[10], quoted[11]]);

        let proto = quoted[9];
        if proto == IPPROTO_ICMP {
            // An echo request or reply: the identifier and the echo
            // checksum.
            let echo: &mut IcmpEcho = pkt.get(at + QUOTED_L4)?;
            let (old_id, old) = (echo.id, echo.check);
            echo.id = port;
            echo.check = rewrite::echo_checksum(old, old_id, port);
            sum = sum.replace2(old_id, port).replace2(old, echo.check);
        } else {
            let ports: &mut PortPair = pkt.get(at + QUOTED_L4)?;
            let slot = match quote_side {
                Side::Src => &mut ports.src,
                Side::Dst => &mut ports.dst,
            };
            let old_port = core::mem::replace(slot, port);
            sum = sum.replace2(old_port, port);
            let udp = proto == IPPROTO_UDP;
            let check_at = at + QUOTED_L4 + if udp { UDP_CHECK } else { TCP_CHECK };
            // A short quote may end before a TCP checksum; a zero UDP
            // checksum means none.
            if check_at + 2 <= end
                && let Ok(check) = pkt.get::<[u8; 2]>(check_at)
                && (!udp || *check != [0, 0])
            {
                let old = *check;
                *check = rewrite::l4_checksum(old, Some((old_addr, addr)), (old_port, port), udp);
                sum = sum.replace2(old, *check);
            }
        }
        let [c0, c1] = sum.finish();
        icmp[2] = c0;
        icmp[3] = c1;
    }
    Ok(())
}

/// Fails with `BadChecksum` unless the ICMP checksum of the error at `at`
/// (its IP packet `len` bytes long, within the frame) is right: the
/// receiver would discard a corrupt error, and a NAT silently discards it
/// (RFC 5508 REQ-3), rather than translate a quote that may be garbage.
///
/// The message is summed [`CHUNK`] bytes at a time, copied to the stack
/// (wherever they lie: an skb's fragments too), by a `bpf_loop` callback
/// the verifier checks once for any number of chunks. A function of its
/// own, off the fast path, so its frame is not the caller's.
#[inline(never)]
fn intact<H: Hook>(hook: &H, at: usize, len: u16) -> Result<(), Reason> {
    let len = usize::from(len).saturating_sub(IP_LEN);
    let mut summing = Summing {
        hook,
        at: at + ICMP_AT,
        len,
        sum: 0,
        failed: false,
    };
    let chunks = len.div_ceil(CHUNK) as u32;
    // SAFETY: the callback takes `summing` for what it is, and only while
    // this call lasts.
    let ran = unsafe {
        bpf_loop(
            chunks,
            add_chunk::<H> as *mut c_void,
            (&raw mut summing).cast(),
            0,
        )
    };
    if ran != i64::from(chunks) || summing.failed {
        return Err(Reason::Internal);
    }
    if !sum_verifies(summing.sum) {
        return Err(Reason::BadChecksum);
    }
    Ok(())
}

/// The state of [`intact`]'s loop: the message at `at`, `len` bytes long,
/// and the sum of its chunks so far.
struct Summing<'a, H> {
    hook: &'a H,
    at: usize,
    len: usize,
    sum: u64,
    failed: bool,
}

/// Adds chunk `i` of the message to the sum (the `bpf_loop` callback of
/// [`intact`]): 0 to go on, 1 to stop.
extern "C" fn add_chunk<H: Hook>(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `intact`'s `Summing`, alive while the loop runs.
    let summing = unsafe { &mut *ctx.cast::<Summing<H>>() };
    let from = i as usize * CHUNK;
    // The loop runs once per chunk, so 1 ≤ left; not past the message's
    // end, and the size the verifier sees bounded by the buffer.
    let left = summing.len.wrapping_sub(from);
    let mut words = MaybeUninit::<[u32; CHUNK_WORDS]>::uninit();
    let n = if left >= CHUNK {
        CHUNK
    } else {
        // Zeros pad the last chunk, an odd last byte included.
        words.write([0; CHUNK_WORDS]);
        (left.wrapping_sub(1) & (CHUNK - 1)) + 1
    };
    // SAFETY: `words` takes CHUNK bytes, and 1 ≤ n ≤ CHUNK.
    let loaded = unsafe {
        summing
            .hook
            .load_bytes(summing.at + from, words.as_mut_ptr().cast(), n)
    };
    if loaded.is_err() {
        summing.failed = true;
        return 1;
    }
    // SAFETY: written whole, by the load or by zeros and the load.
    summing.sum += sum_chunk(unsafe { words.assume_init_ref() });
    0
}
