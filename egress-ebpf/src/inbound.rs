//! Return: a reply to a translation → reverse-translate → encapsulate to the
//! peer that owns the flow.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use egress_common::{
    config::{Config, OUTER_TTL},
    flow::{DIR_IN, FlowKey, IPPROTO_IPIP, IPPROTO_TCP},
    headers::{IP_DF, Ipv4},
    reason::Reason,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    fib,
    l4::{self, Side},
    nat::{ETH_LEN, IP_LEN, IP_MF_OFFSET, Outcome, send},
    packet::Hook,
    state,
};

pub fn handle<H: Hook>(hook: &mut H, cfg: &Config) -> Result<Outcome, Outcome> {
    let pkt = hook.packet();
    // SAFETY: read-only view; `translate` below takes its own.
    let ip: &Ipv4Hdr = unsafe { pkt.get(ETH_LEN)? };
    // Options and fragments are not translated here; whatever they are,
    // they are the kernel's business.
    if ip.vihl != 0x45 || u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0 {
        return Err(Reason::NotOurs.into());
    }
    let (sport, dport) = match l4::ports(pkt, ETH_LEN + IP_LEN, ip.proto, Side::Dst) {
        Ok(p) => p,
        Err(Reason::Truncated) => return Err(Reason::Truncated.into()),
        Err(_) => return Err(Reason::NotOurs.into()),
    };
    let key = FlowKey {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport,
        dport,
        proto: ip.proto,
        dir: DIR_IN,
        _pad: [0; 2],
    };
    let flow = state::find(&key).ok_or(Reason::NotOurs)?;

    let len = ip.tot_len();
    if usize::from(len) < IP_LEN + l4::min_len(ip.proto) || ETH_LEN + usize::from(len) > pkt.len() {
        return Err(Reason::BadLength.into());
    }
    if ip.ttl <= 1 {
        return Err(Reason::TtlExceeded.into());
    }
    let outer_len = len.checked_add(IP_LEN as u16).ok_or(Reason::TooBig)?;
    let wire_len = hook.largest_segment(len, ETH_LEN + IP_LEN, ip.proto) + IP_LEN as u16;
    let hop = fib::lookup(
        hook,
        cfg.tunnel_local,
        flow.peer_addr,
        IPPROTO_IPIP,
        wire_len,
    )?;
    let now = state::now();
    state::touch(flow, len, now);
    if key.proto == IPPROTO_TCP {
        state::track_in(flow, l4::tcp_flags(pkt, ETH_LEN + IP_LEN));
    }

    let outer = outer_header(ip, outer_len, cfg.tunnel_local, flow.peer_addr);
    // SAFETY: a copy, taken while the packet view is valid.
    let orig: EthHdr = unsafe { *pkt.get::<EthHdr>(0)? };
    // Always our hop on the inner TTL: should the kernel forward this packet
    // (unresolved neighbour), it decrements the outer TTL only.
    l4::translate(
        hook,
        ETH_LEN,
        Side::Dst,
        flow.client_addr,
        flow.client_port,
        true,
    )?;
    hook.adjust_head(-(IP_LEN as i32))?;
    let pkt = hook.packet();
    // SAFETY: the only live reference into the packet.
    outer.write(unsafe { pkt.get(ETH_LEN)? });
    send(hook, pkt, &hop, &orig, Reason::ReverseHit)
}

/// The RFC 2003 outer header for `inner`: TOS and DF copied from the inner
/// header, a fresh ID, our TTL, protocol 4 and a valid checksum.
#[inline(always)]
fn outer_header(inner: &Ipv4Hdr, tot_len: u16, src: [u8; 4], dst: [u8; 4]) -> Ipv4 {
    Ipv4 {
        tos: inner.tos,
        tot_len,
        // SAFETY: no preconditions.
        id: unsafe { bpf_get_prandom_u32() } as u16,
        df: u16::from_be_bytes(inner.frags) & IP_DF != 0,
        ttl: OUTER_TTL,
        proto: IPPROTO_IPIP,
        src,
        dst,
    }
}
