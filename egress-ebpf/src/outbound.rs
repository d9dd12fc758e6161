//! Outbound: IP-in-IP from a peer → decapsulate → SNAT → forward. ICMP
//! errors a client sends about a flow's return traffic take the same way
//! (see `relay`).

use egress_common::{
    config::Config,
    ecn,
    flow::{DIR_OUT, FlowKey, IPPROTO_ICMP, IPPROTO_IPIP, IPPROTO_TCP},
    fragment::{FragKey, Fragment},
    headers::{ICMP_ADMIN_PROHIBITED, ICMP_DEST_UNREACH, is_icmp_error, no_errors_about},
    reason::Reason,
    rewrite, tcp,
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
    nat::{self, ETH_LEN, IP_LEN, IP_MF_OFFSET, Outcome, has_df, send},
    packet::{Hook, Packet},
    relay, state,
};

const INNER: usize = ETH_LEN + IP_LEN;
const L4: usize = INNER + IP_LEN;

/// The validated facts about an outbound packet the rewrite needs.
struct Inner {
    /// The 5-tuple; ports 0 in a later fragment.
    key: FlowKey,
    peer: [u8; 4],
    len: u16,
    ttl: u8,
    df: bool,
    fragment: Fragment,
    /// IP identification: which datagram a fragment belongs to.
    id: [u8; 2],
    /// An ICMP error (a whole datagram): it names its flow by its quote,
    /// and `key` has no ports.
    icmp_error: bool,
}

impl Inner {
    fn datagram(&self) -> FragKey {
        FragKey {
            src: self.key.src,
            dst: self.key.dst,
            id: self.id,
            proto: self.key.proto,
            dir: DIR_OUT,
        }
    }
}

pub fn handle<H: Hook>(hook: &mut H, cfg: &Config) -> Result<Outcome, Outcome> {
    let pkt = hook.packet();
    let inner = validate(pkt)?;
    if inner.icmp_error {
        allowed(&inner, cfg)?;
        decapsulate_ecn(pkt)?;
        return relay::from_client(hook, inner.peer, inner.len);
    }
    let key = inner.key;
    let later = inner.fragment == Fragment::Later;
    let flags = if key.proto == IPPROTO_TCP && !later {
        l4::tcp_flags(pkt, L4)
    } else {
        0
    };

    // A later fragment takes its first fragment's translation, and its
    // flow from the same peer; without one, its address alone (below).
    let (existing, first_nat) = if later {
        let flow = frag::find(&inner.datagram());
        let nat = flow.as_ref().map(|f| f.nat_addr);
        let own = flow.filter(|f| f.peer_addr == inner.peer);
        (own.map(|f| Found::Table(f, None)), nat)
    } else {
        (flow_cache::find(&key, flags), None)
    };
    // Policy was checked when the flow was created; a packet of a known flow
    // from the flow's own peer skips the peer and client map lookups.
    let nat_addr = match &existing {
        Some(f) if f.flow().peer_addr == inner.peer => f.flow().nat_addr,
        _ => {
            allowed(&inner, cfg)?;
            // Every mapping of a client has its address, but for a pool
            // changed under it (until the sweep retires it).
            first_nat.unwrap_or_else(|| cfg.snat_for(key.src))
        }
    };
    decapsulate_ecn(pkt)?;
    // Only now that the sender is known to be ours: we are a router hop, so
    // traceroute from the client shows the gateway.
    if inner.ttl <= 1 {
        if no_errors_about(key.dst) {
            return Err(Reason::TtlExceeded.into());
        }
        return icmp::to_client(hook, Error::TIME_EXCEEDED, Reason::TtlExceeded);
    }
    // Route before creating state: an unroutable destination leaves none.
    let wire_len = hook.largest_segment(inner.len, L4, key.proto);
    let hop = fib::lookup(hook, nat_addr, key.dst, key.proto, wire_len)?;
    if let (NextHop::TooBig { mtu }, true) = (&hop, inner.df) {
        return icmp::to_client(hook, Error::frag_needed(*mtu), Reason::TooBig);
    }
    let (mut found, mut reason) = match existing {
        Some(f) => (f, Reason::Translated),
        // Its first fragment is still on the way (reordered), came through
        // another peer, or its flow is gone: a later fragment has no ports,
        // and its client has one translation address (RFC 4787 REQ-14:
        // fragments out of order are translated, without creating state).
        None if later => return forward(hook, &hop, nat_addr, None, Reason::FragmentAhead),
        None => match state::create(&key, inner.peer, cfg, clock::now()) {
            Ok(()) => (
                Found::created(&key).ok_or(Reason::Internal)?,
                Reason::NewFlow,
            ),
            // Refused: tell the client at once (RFC 5508 REQ-8) rather than
            // let it time out.
            Err(r @ (Reason::PortsExhausted | Reason::TableFull | Reason::ClientLimit)) => {
                let error = Error::new(ICMP_DEST_UNREACH, ICMP_ADMIN_PROHIBITED);
                return icmp::to_client(hook, error, r);
            }
            Err(r) => return Err(r.into()),
        },
    };
    if found.flow().peer_addr != inner.peer {
        // The client now tunnels through another peer (a failover): its
        // flow follows, so replies go back the way its packets come.
        // (Another CPU's cache may still hold the old peer for a tick.)
        found = found.into_table(&key).ok_or(Reason::Internal)?;
        if let Found::Table(flow, _) = &mut found
            && flow.peer_addr != inner.peer
        {
            state::move_to_peer(flow, inner.peer);
            // Replies on this CPU follow at once.
            flow_cache::forget(&flow.in_key());
            reason = Reason::PeerMoved;
        }
    }
    let (nat_addr, nat_port) = (found.flow().nat_addr, found.flow().nat_port);
    flow_cache::record(found, &key, inner.len, flags);
    if inner.fragment == Fragment::First {
        frag::remember(&inner.datagram(), &key, clock::now());
    }
    if flags & tcp::SYN != 0 {
        mss::clamp(hook, L4, usize::from(inner.len) - IP_LEN, cfg.mss)?;
    }

    let port = if later { None } else { Some(nat_port) };
    forward(hook, &hop, nat_addr, port, reason)
}

/// Translates the inner packet's source to `nat_addr` (and `port`, unless
/// it is a later fragment), decapsulates it and sends it toward `hop`.
#[inline(always)]
fn forward<H: Hook>(
    hook: &mut H,
    hop: &NextHop,
    nat_addr: [u8; 4],
    port: Option<[u8; 2]>,
    reason: Reason,
) -> Result<Outcome, Outcome> {
    // SAFETY: a copy, taken while the packet view is valid.
    let orig: EthHdr = unsafe { *hook.packet().get::<EthHdr>(0)? };
    // The kernel's forwarding path decrements the TTL itself.
    let dec_ttl = matches!(hop, NextHop::Resolved { .. });
    l4::translate(hook, INNER, Side::Src, nat_addr, port, dec_ttl)?;
    hook.adjust_head(IP_LEN as i32)?;
    send(hook.packet(), hop, &orig, reason)
}

/// Carries a congestion mark on the outer header over to the inner one
/// (RFC 6040), as the tunnel exit: once the sender is known to be ours (a
/// stranger's packet is counted as such), before anything quotes the inner
/// header, as the kernel decapsulates before it forwards.
#[inline(always)]
fn decapsulate_ecn(pkt: Packet) -> Result<(), Reason> {
    // SAFETY: a copy of one byte, then the only live reference into the
    // packet.
    let outer_tos = unsafe { pkt.get::<Ipv4Hdr>(ETH_LEN)?.tos };
    let ip: &mut [u8; IP_LEN] = unsafe { pkt.get(INNER)? };
    match ecn::decapsulate(outer_tos, ip[1]) {
        None => Err(Reason::BadOuter),
        Some(tos) if tos != ip[1] => {
            rewrite::set_tos(ip, tos);
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

/// Whether the peer may tunnel to us and the inner source may be translated
/// (no open proxy) for that peer (no peer speaks for another's clients).
#[inline(always)]
fn allowed(inner: &Inner, cfg: &Config) -> Result<(), Reason> {
    let Some(peer) = maps::peer_index(inner.peer) else {
        return Err(Reason::PeerNotAllowed);
    };
    if inner.key.src == cfg.tunnel_local || cfg.is_snat(inner.key.src) {
        return Err(Reason::Loop);
    }
    if !maps::may_send_for(peer, inner.key.src) {
        return Err(Reason::ClientNotAllowed);
    }
    Ok(())
}

/// Checks the outer header (RFC 2003) and the inner header (IPv4,
/// forwardable, consistent lengths) and reads the inner 5-tuple.
#[inline(always)]
fn validate(pkt: Packet) -> Result<Inner, Reason> {
    // SAFETY: read-only views of non-overlapping headers.
    let (outer, inner) = unsafe { (pkt.get::<Ipv4Hdr>(ETH_LEN)?, pkt.get::<Ipv4Hdr>(INNER)?) };
    if outer.vihl != 0x45 || u16::from_be_bytes(outer.frags) & IP_MF_OFFSET != 0 {
        return Err(nat::refusal(outer, Reason::BadOuter));
    }
    if !nat::checksum_valid(pkt, ETH_LEN)? {
        return Err(Reason::BadChecksum);
    }
    let outer_len = usize::from(outer.tot_len());
    if outer_len < 2 * IP_LEN || ETH_LEN + outer_len > pkt.len() {
        return Err(Reason::BadLength);
    }
    if inner.version() != 4 {
        return Err(Reason::InnerNotIpv4);
    }
    if inner.vihl != 0x45 {
        return Err(nat::refusal(inner, Reason::InnerOptions));
    }
    if !nat::checksum_valid(pkt, INNER)? {
        return Err(Reason::BadChecksum);
    }
    let len = inner.tot_len();
    let fragment = Fragment::of(inner.frags);
    if usize::from(len) != outer_len - IP_LEN {
        return Err(Reason::BadLength);
    }
    // Only a datagram's first fragment (or the whole) has a transport
    // header; one too short for it is dropped (RFC 1858 tiny fragments).
    let l4_min = match fragment {
        Fragment::Later => 0,
        _ => l4::min_len(inner.proto),
    };
    if usize::from(len) < IP_LEN + l4_min {
        return Err(Reason::Truncated);
    }
    if inner.proto == IPPROTO_IPIP {
        return Err(Reason::NestedTunnel);
    }
    // A fragmented error is no error we relay: its first fragment is
    // refused as an unsupported ICMP type below.
    let icmp_error = inner.proto == IPPROTO_ICMP
        && fragment == Fragment::Whole
        // SAFETY: a read-only view of one byte.
        && is_icmp_error(*unsafe { pkt.get::<u8>(L4)? });
    let (sport, dport) = if icmp_error || fragment == Fragment::Later {
        ([0; 2], [0; 2])
    } else {
        l4::ports(pkt, L4, inner.proto, Side::Src)?
    };
    // A first fragment's UDP length is the whole datagram's.
    if fragment == Fragment::Whole {
        l4::check_len(pkt, L4, inner.proto, len - IP_LEN as u16)?;
    }
    Ok(Inner {
        key: FlowKey {
            src: inner.src_addr,
            dst: inner.dst_addr,
            sport,
            dport,
            proto: inner.proto,
            dir: DIR_OUT,
            _pad: [0; 2],
        },
        peer: outer.src_addr,
        len,
        ttl: inner.ttl,
        df: has_df(inner),
        fragment,
        id: inner.id,
        icmp_error,
    })
}
