//! ICMP errors from the Internet about a translated flow (RFC 5508): the
//! packet an error quotes is one we translated, so its source address and
//! port are translated back like the error's destination, and the error is
//! encapsulated to the flow's peer. Type and code are kept. An error never
//! refreshes its flow, and one that matches no flow is the kernel's (it may
//! be about the host's own traffic).

use egress_common::{
    checksum::Incremental,
    config::Config,
    flow::{DIR_IN, Flow, FlowKey, IPPROTO_ICMP, IPPROTO_UDP},
    fragment::Fragment,
    headers::{ICMP_LEN, QUOTE_LEN},
    reason::Reason,
    rewrite,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    fib::NextHop,
    inbound,
    l4::{self, IcmpEcho, PortPair, Side, TCP_CHECK, UDP_CHECK},
    nat::{ETH_LEN, IP_LEN, Outcome, has_df},
    packet::Hook,
    state,
};

/// The ICMP header, and the IP and transport headers of the packet it quotes.
const ICMP_AT: usize = ETH_LEN + IP_LEN;
const QUOTED_IP: usize = ICMP_AT + ICMP_LEN;
const QUOTED_L4: usize = QUOTED_IP + IP_LEN;

/// Relays the ICMP error in the hook (a 20-byte IP header, not a fragment,
/// no longer than the frame) to the client whose flow it is about.
pub fn handle<H: Hook>(hook: &mut H, cfg: &Config) -> Result<Outcome, Outcome> {
    let pkt = hook.packet();
    // SAFETY: read-only views of non-overlapping headers.
    let (ip, quoted) = unsafe { (pkt.get::<Ipv4Hdr>(ETH_LEN)?, pkt.get::<Ipv4Hdr>(QUOTED_IP)?) };
    // Only a quote of the IP header and the 8 bytes after it (RFC 792)
    // within the error's own length names a flow: bytes after the error are
    // not the quote's. A shorter one is the kernel's to judge.
    let len = ip.tot_len();
    if usize::from(len) < IP_LEN + ICMP_LEN + QUOTE_LEN {
        return Err(Reason::NotOurs.into());
    }
    // We send neither IP options nor packets from another address, and a
    // later fragment's "ports" would be payload.
    if quoted.vihl != 0x45
        || quoted.src_addr != ip.dst_addr
        || Fragment::of(quoted.frags) == Fragment::Later
    {
        return Err(Reason::NotOurs.into());
    }
    let (sport, dport) =
        l4::quoted_ports(pkt, QUOTED_L4, quoted.proto, Side::Src).map_err(|_| Reason::NotOurs)?;
    // The quoted packet went out on the flow: its reply would come back on
    // the return half's key.
    let key = FlowKey {
        src: quoted.dst_addr,
        dst: quoted.src_addr,
        sport: dport,
        dport: sport,
        proto: quoted.proto,
        dir: DIR_IN,
        _pad: [0; 2],
    };
    let flow = state::find(&key).ok_or(Reason::NotOurs)?;
    // Never an ICMP error about an ICMP error (RFC 1122 3.2.2): these two
    // are dropped unanswered.
    if ip.ttl <= 1 {
        return Err(Reason::TtlExceeded.into());
    }
    let hop = inbound::route_to_peer(hook, cfg, flow.peer_addr, len, IPPROTO_ICMP)?;
    if matches!(hop, NextHop::TooBig { .. }) && has_df(ip) {
        return Err(Reason::TooBig.into());
    }
    translate(hook, flow, ETH_LEN + usize::from(len))?;
    inbound::encapsulate(hook, cfg, flow.peer_addr, &hop, Reason::IcmpErrorRelayed)
}

/// Rewrites the error's destination and the quoted packet's source from the
/// translation to the client, with every checksum involved: the error's IP
/// header, the quoted IP header, the quoted transport checksum when it is
/// quoted, and the ICMP checksum, which covers all the quoted bytes. The
/// error's IP packet ends at `end`: bytes after it (Ethernet padding) are
/// not the quote's.
#[inline(always)]
fn translate<H: Hook>(hook: &mut H, flow: &Flow, end: usize) -> Result<(), Reason> {
    let (nat, client) = (flow.nat_addr, flow.client_addr);
    let (nat_port, client_port) = (flow.nat_port, flow.client_port);
    let pkt = hook.packet();
    // SAFETY: disjoint headers, each the only live reference to its bytes.
    unsafe {
        rewrite::ipv4(pkt.get(ETH_LEN)?, Side::Dst, client, true);

        let quoted: &mut Ipv4Hdr = pkt.get(QUOTED_IP)?;
        let old_check = quoted.check;
        quoted.src_addr = client;
        quoted.check = Incremental::new(old_check).replace4(nat, client).finish();
        let icmp: &mut [u8; 4] = pkt.get(ICMP_AT)?;
        let mut sum = Incremental::new([icmp[2], icmp[3]])
            .replace4(nat, client)
            .replace2(old_check, quoted.check)
            .replace2(nat_port, client_port);

        if quoted.proto == IPPROTO_ICMP {
            // An echo request: the identifier and the echo checksum.
            let echo: &mut IcmpEcho = pkt.get(QUOTED_L4)?;
            let old = echo.check;
            echo.id = client_port;
            echo.check = rewrite::echo_checksum(old, nat_port, client_port);
            sum = sum.replace2(old, echo.check);
        } else {
            let ports: &mut PortPair = pkt.get(QUOTED_L4)?;
            ports.src = client_port;
            let udp = quoted.proto == IPPROTO_UDP;
            let at = QUOTED_L4 + if udp { UDP_CHECK } else { TCP_CHECK };
            // A short quote may end before a TCP checksum; a zero UDP
            // checksum means none.
            if at + 2 <= end
                && let Ok(check) = pkt.get::<[u8; 2]>(at)
                && (!udp || *check != [0, 0])
            {
                let old = *check;
                *check =
                    rewrite::l4_checksum(old, Some((nat, client)), (nat_port, client_port), udp);
                sum = sum.replace2(old, *check);
            }
        }
        let [c0, c1] = sum.finish();
        icmp[2] = c0;
        icmp[3] = c1;
    }
    Ok(())
}
