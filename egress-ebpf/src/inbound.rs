//! Return: a reply to a translation → reverse-translate → encapsulate to the
//! peer that owns the flow. ICMP errors about a flow take the same way
//! (see `relay`).

use egress_common::{
    config::Config,
    flow::{DIR_IN, FlowKey, IPPROTO_ICMP, IPPROTO_IPIP, IPPROTO_TCP},
    fragment::{FragKey, Fragment},
    headers::{Ipv4, is_icmp_error},
    reason::Reason,
    tcp,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    clock,
    fib::{self, NextHop},
    flow_cache::{self, Found},
    frag,
    icmp::{self, Error},
    l4::{self, Side},
    maps, mss,
    nat::{self, ETH_LEN, IP_LEN, Outcome, has_df, send},
    packet::Hook,
    relay,
};

const L4: usize = ETH_LEN + IP_LEN;

pub fn handle<H: Hook>(hook: &mut H, cfg: &Config) -> Result<Outcome, Outcome> {
    let pkt = hook.packet();
    // SAFETY: read-only view; `translate` below takes its own.
    let ip: &Ipv4Hdr = unsafe { pkt.get(ETH_LEN)? };
    // Options are not translated here; whatever such packets are, they
    // are the kernel's business (the host's own traffic may have them).
    // What the kernel would drop, we drop.
    if ip.vihl != 0x45 {
        return Err(nat::refusal(ip, Reason::NotOurs).into());
    }
    if !nat::checksum_valid(pkt, ETH_LEN)? {
        return Err(Reason::BadChecksum.into());
    }
    let len = ip.tot_len();
    if usize::from(len) < IP_LEN || ETH_LEN + usize::from(len) > pkt.len() {
        return Err(Reason::BadLength.into());
    }
    let fragment = Fragment::of(ip.frags);
    let datagram = FragKey {
        src: ip.src_addr,
        dst: ip.dst_addr,
        id: ip.id,
        proto: ip.proto,
        dir: DIR_IN,
    };
    let later = fragment == Fragment::Later;
    let flags = if ip.proto == IPPROTO_TCP && !later {
        l4::tcp_flags(pkt, L4)
    } else {
        0
    };
    let (found, key) = if later {
        let Some(flow) = frag::find(&datagram) else {
            // Its first fragment is still to come, or it is the host's own:
            // the kernel reassembles (or expires) it, and a copy waits in
            // the daemon for a first fragment to translate it after.
            frag::hold(hook, cfg, len);
            return Err(Reason::FragmentUnmatched.into());
        };
        let key = flow.in_key();
        (Found::Table(flow, None), key)
    } else {
        // A fragmented error is no error we relay: its first fragment
        // matches no flow below.
        if ip.proto == IPPROTO_ICMP && fragment == Fragment::Whole {
            // SAFETY: a read-only view of one byte.
            let kind: &u8 = unsafe { pkt.get(L4)? };
            if is_icmp_error(*kind) {
                return relay::from_internet(hook, cfg);
            }
        }
        let (sport, dport) = match l4::ports(pkt, L4, ip.proto, Side::Dst) {
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
        (flow_cache::find(&key, flags).ok_or(Reason::NotOurs)?, key)
    };

    let l4_min = if later { 0 } else { l4::min_len(ip.proto) };
    if usize::from(len) < IP_LEN + l4_min {
        return Err(Reason::Truncated.into());
    }
    // A first fragment's UDP length is the whole datagram's.
    if fragment == Fragment::Whole {
        l4::check_len(pkt, L4, ip.proto, len - IP_LEN as u16)?;
    }
    if ip.ttl <= 1 {
        return icmp::to_sender(hook, Error::TIME_EXCEEDED, Reason::TtlExceeded);
    }
    let flow = found.flow();
    let (peer, client) = (flow.peer_addr, (flow.client_addr, flow.client_port));
    let hop = route_to_peer(hook, cfg, peer, len, ip.proto)?;
    if let (NextHop::TooBig { mtu }, true) = (&hop, has_df(ip)) {
        // What fits once our outer header is added (RFC 2003 section 5.1).
        let fits = mtu.saturating_sub(IP_LEN as u16);
        return icmp::to_sender(hook, Error::frag_needed(fits), Reason::TooBig);
    }
    flow_cache::record(found, &key, len, flags);
    if fragment == Fragment::First {
        frag::remember(&datagram, &key, clock::now());
    }
    if flags & tcp::SYN != 0 {
        mss::clamp(hook, L4, usize::from(len) - IP_LEN, cfg.mss)?;
    }

    // Always our hop on the inner TTL: should the kernel forward this packet
    // (unresolved neighbour), it decrements the outer TTL only.
    let port = if later { None } else { Some(client.1) };
    l4::translate(hook, ETH_LEN, Side::Dst, client.0, port, true)?;
    encapsulate(hook, cfg, peer, &hop, Reason::ReverseHit)
}

/// The next hop toward `peer` of the `len`-byte IP packet in the hook,
/// once encapsulated.
#[inline(always)]
pub fn route_to_peer<H: Hook>(
    hook: &H,
    cfg: &Config,
    peer: [u8; 4],
    len: u16,
    proto: u8,
) -> Result<NextHop, Reason> {
    if usize::from(len) > usize::from(u16::MAX) - IP_LEN {
        return Err(Reason::TooBig);
    }
    let wire_len = hook.largest_segment(len, L4, proto) + IP_LEN as u16;
    fib::lookup(hook, cfg.tunnel_local, peer, IPPROTO_IPIP, wire_len)
}

/// Wraps the (translated) IP packet in the hook in an RFC 2003 outer header
/// to `peer` and sends it toward `hop` (from [`route_to_peer`]).
#[inline(always)]
pub fn encapsulate<H: Hook>(
    hook: &mut H,
    cfg: &Config,
    peer: [u8; 4],
    hop: &NextHop,
    reason: Reason,
) -> Result<Outcome, Outcome> {
    let pkt = hook.packet();
    // SAFETY: copies out of the packet.
    let (orig, inner) = unsafe { (*pkt.get::<EthHdr>(0)?, *pkt.get::<Ipv4Hdr>(ETH_LEN)?) };
    let df = has_df(&inner);
    // Only a datagram that may be fragmented needs an ID of its own, the
    // next of its peer's counter; one with DF gets 0, as Linux gives
    // packets no socket owns (RFC 6864: any value will do), which spares
    // the atomic update of a counter all CPUs share.
    let id = if df {
        0
    } else {
        maps::take_ip_ids(peer, hook.segments())
    };
    // No overflow of the length: checked by `route_to_peer`.
    let outer = Ipv4::tunnel(inner.tos, inner.tot_len(), df, id, cfg.tunnel_local, peer);
    hook.adjust_head(-(IP_LEN as i32))?;
    let pkt = hook.packet();
    // SAFETY: the only live reference into the packet.
    outer.write(unsafe { pkt.get(ETH_LEN)? });
    send(pkt, hop, &orig, reason)
}
