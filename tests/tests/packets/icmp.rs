//! ICMP and MTU: errors relayed back to the client whose flow they are
//! about (RFC 5508), errors from clients about a flow's return traffic
//! relayed to the remote host, time exceeded and fragmentation needed
//! answered by the gateway itself, and packets too big for the next hop.

use egress_common::{flow::DIR_IN, reason::Reason};
use etherparse::{
    Icmpv4Type,
    icmpv4::{DestUnreachableHeader, ParameterProblemHeader, TimeExceededCode},
};

use super::*;
use crate::frames::icmp_error;

for_each_hook!(
    ttl_1_from_a_client_is_answered_with_time_exceeded_through_the_tunnel,
    icmp_errors_about_a_flow_reach_its_client_translated_back,
    icmp_errors_about_no_flow_are_left_to_the_kernel,
    a_relayed_error_does_not_refresh_its_flow,
    icmp_errors_from_a_client_reach_the_remote_translated,
    icmp_errors_from_a_client_about_no_flow_are_dropped,
    icmp_errors_from_outside_the_policy_are_refused,
    short_or_expiring_icmp_errors_from_a_client_are_dropped,
    return_packets_too_big_for_the_tunnel,
    outbound_packets_too_big_for_the_route,
    ttl_1_on_the_return_path_is_answered_to_the_sender,
);

/// A DNS query from the client: the flow most tests here start with.
const QUERY: L4 = L4::Udp {
    sport: 5353,
    dport: 53,
    payload: b"query",
};

/// A router on the Internet side, source of errors about our flows.
const INTERNET_ROUTER: [u8; 4] = [198, 51, 100, 1];

/// Asserts that `inner`, sent by a client through the tunnel, was answered
/// with the ICMP error `kind` from the gateway, encapsulated back to the
/// peer, quoting the inner header and 8 bytes.
pub fn assert_answered_through_tunnel(
    gw: &mut Gateway,
    inner: &[u8],
    kind: Icmpv4Type,
    want: Reason,
) {
    let (verdict, out, reason) = gw.run(&from_peer(inner));
    assert_eq!((verdict, reason), (Verdict::Tx, want));
    assert_checksums_valid(&out);
    let id = |at: usize| u16::from_be_bytes([out[at], out[at + 1]]);
    let client = inner[12..16].try_into().unwrap();
    let error = Ip {
        id: id(14 + 20 + 4),
        df: false,
        tos: 0xc0,
        ..Ip::new(GW, client)
    };
    let error = icmp_error(error, kind, &inner[..28]);
    let outer = Ip {
        id: id(14 + 4),
        df: false,
        tos: 0xc0,
        ..Ip::new(GW, PEER)
    };
    assert_eq!(
        out,
        ethernet(GW_MAC, ROUTER_MAC, &encapsulate(outer, &error)),
        "ICMP error to the client"
    );
}

/// Asserts that `packet`, from the Internet to the translation address,
/// was answered with the ICMP error `kind` from that address to its sender.
fn assert_answered_to_sender(gw: &mut Gateway, packet: &[u8], kind: Icmpv4Type, want: Reason) {
    let (verdict, out, reason) = gw.run(&ethernet(ROUTER_MAC, GW_MAC, packet));
    assert_eq!((verdict, reason), (Verdict::Tx, want));
    assert_checksums_valid(&out);
    let sender = packet[12..16].try_into().unwrap();
    let error = Ip {
        id: u16::from_be_bytes([out[18], out[19]]),
        df: false,
        tos: 0xc0,
        ..Ip::new(GW, sender)
    };
    assert_eq!(
        out,
        ethernet(GW_MAC, ROUTER_MAC, &icmp_error(error, kind, &packet[..28])),
        "ICMP error to the sender"
    );
}

fn ttl_1_from_a_client_is_answered_with_time_exceeded_through_the_tunnel(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let udp = L4::Udp {
        sport: 33434,
        dport: 33435,
        payload: b"traceroute probe",
    };
    let probe = ip_packet(
        Ip {
            ttl: 1,
            ..Ip::new(CLIENT, SERVER)
        },
        udp,
    );
    let exceeded = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
    assert_answered_through_tunnel(gw, &probe, exceeded.clone(), Reason::TtlExceeded);
    assert_eq!(gw.flow_entries(), 0, "a probe that expired created state");
    // Also on a flow that exists (mtr over an open UDP flow).
    outbound(gw, CLIENT, udp, Reason::NewFlow);
    assert_answered_through_tunnel(gw, &probe, exceeded, Reason::TtlExceeded);
}

/// The packet `flow` sent to the Internet as the gateway translated it
/// (TTL decremented), from `addr`:`port`: quoted by errors about it.
fn as_sent(addr: [u8; 4], l4: L4) -> Vec<u8> {
    ip_packet(
        Ip {
            src: addr,
            ttl: 63,
            ..Ip::new(addr, SERVER)
        },
        l4,
    )
}

fn icmp_errors_about_a_flow_reach_its_client_translated_back(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let udp = QUERY;
    let udp_unchecked = L4::Udp {
        sport: 5354,
        dport: 53,
        payload: b"query",
    };
    let tcp = L4::tcp(40000, 443, b"hello");
    let echo = L4::EchoRequest { id: 77, seq: 3 };
    let unreachable = Icmpv4Type::DestinationUnreachable;
    // (what, flow, error source, error type, bytes of the packet quoted)
    let cases = [
        (
            "port unreachable, whole UDP datagram quoted",
            udp,
            SERVER,
            unreachable(DestUnreachableHeader::Port),
            usize::MAX,
        ),
        (
            "fragmentation needed, whole TCP segment quoted",
            tcp,
            INTERNET_ROUTER,
            unreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }),
            usize::MAX,
        ),
        (
            "time exceeded, 8 bytes of TCP quoted (no checksum)",
            L4::tcp(40001, 443, b"hello"),
            INTERNET_ROUTER,
            Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
            28,
        ),
        (
            "host unreachable about an echo request",
            echo,
            INTERNET_ROUTER,
            unreachable(DestUnreachableHeader::Host),
            usize::MAX,
        ),
        (
            "parameter problem about UDP without checksum",
            udp_unchecked,
            INTERNET_ROUTER,
            Icmpv4Type::ParameterProblem(ParameterProblemHeader::PointerIndicatesError(8)),
            usize::MAX,
        ),
    ];
    for (what, l4, from, kind, quoted) in cases {
        let nat_port = outbound(gw, CLIENT, l4, Reason::NewFlow);
        let mut sent = as_sent(GW, l4.with_sport(nat_port));
        let mut original = as_sent(CLIENT, l4);
        if what.contains("without checksum") {
            // The sender computed no UDP checksum: it stays 0 both ways.
            for p in [&mut sent, &mut original] {
                p[26..28].copy_from_slice(&[0, 0]);
            }
        }
        let n = quoted.min(sent.len());
        let error = Ip {
            df: false,
            tos: 0xc0,
            ..Ip::new(from, GW)
        };
        let frame = ethernet(
            ROUTER_MAC,
            GW_MAC,
            &icmp_error(error, kind.clone(), &sent[..n]),
        );
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!(
            (verdict, reason),
            (Verdict::Tx, Reason::IcmpErrorRelayed),
            "{what}"
        );
        assert_checksums_valid(&out);
        let relayed = icmp_error(
            Ip {
                dst: CLIENT,
                ttl: error.ttl - 1,
                ..error
            },
            kind,
            &original[..n],
        );
        let outer = Ip {
            id: u16::from_be_bytes([out[18], out[19]]),
            df: false,
            tos: 0xc0,
            ..Ip::new(GW, PEER)
        };
        assert_eq!(
            out,
            ethernet(GW_MAC, ROUTER_MAC, &encapsulate(outer, &relayed)),
            "{what}"
        );
    }
}

fn icmp_errors_about_no_flow_are_left_to_the_kernel(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let udp = QUERY;
    let nat_port = outbound(gw, CLIENT, udp, Reason::NewFlow);
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let error = Ip::new(SERVER, GW);
    let about = |quoted: &[u8]| {
        ethernet(
            ROUTER_MAC,
            GW_MAC,
            &icmp_error(error, unreachable.clone(), quoted),
        )
    };
    let other_port = as_sent(GW, udp.with_sport(nat_port + 1));
    let mut other_source = as_sent(GW, udp.with_sport(nat_port));
    other_source[12..16].copy_from_slice(&[10, 1, 1, 99]);
    let mut later_fragment = as_sent(GW, udp.with_sport(nat_port));
    later_fragment[6..8].copy_from_slice(&[0, 0x10]);
    for (what, frame) in [
        (
            "a port with no flow (the host's own traffic)",
            about(&other_port),
        ),
        ("a packet from another address", about(&other_source)),
        ("a later fragment (no ports)", about(&later_fragment)),
        ("a quote too short for the ports", about(&other_port[..24])),
    ] {
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!(
            (verdict, reason),
            (Verdict::Pass, Reason::NotOurs),
            "{what}"
        );
        assert_eq!(out, frame, "{what}: frame modified");
    }
}

fn a_relayed_error_does_not_refresh_its_flow(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let udp = QUERY;
    let nat_port = outbound(gw, CLIENT, udp, Reason::NewFlow);
    let before = gw.flows();
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let sent = as_sent(GW, udp.with_sport(nat_port));
    let frame = ethernet(
        ROUTER_MAC,
        GW_MAC,
        &icmp_error(Ip::new(SERVER, GW), unreachable, &sent),
    );
    let (_, _, reason) = gw.run(&frame);
    assert_eq!(reason, Reason::IcmpErrorRelayed);
    assert_eq!(gw.flows(), before, "an ICMP error changed its flow");
}

/// A reply of `len` bytes (IP) from the server to flow `nat_port`.
fn reply_of(len: usize, nat_port: u16, df: bool) -> (Ip, Vec<u8>) {
    let ip = Ip {
        df,
        ..Ip::new(SERVER, GW)
    };
    let payload = vec![0x5a; len - 28];
    let l4 = L4::Udp {
        sport: 53,
        dport: nat_port,
        payload: &payload,
    };
    (ip, ip_packet(ip, l4))
}

fn return_packets_too_big_for_the_tunnel(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let udp = QUERY;
    let nat_port = outbound(gw, CLIENT, udp, Reason::NewFlow);
    // eth0's MTU is 1500: 1480 bytes still fit once encapsulated...
    let (_, fits) = reply_of(1480, nat_port, true);
    let (verdict, out, reason) = gw.run(&ethernet(ROUTER_MAC, GW_MAC, &fits));
    assert_eq!((verdict, reason), (Verdict::Tx, Reason::ReverseHit));
    assert_eq!(out.len(), 14 + 20 + 1480);
    // ...1481 with DF set are answered with the MTU that fits the tunnel.
    let (_, too_big) = reply_of(1481, nat_port, true);
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1480,
        });
    assert_answered_to_sender(gw, &too_big, frag_needed, Reason::TooBig);
    // Without DF the kernel fragments the encapsulated packet.
    let (ip, too_big) = reply_of(1481, nat_port, false);
    let (verdict, out, reason) = gw.run(&ethernet(ROUTER_MAC, GW_MAC, &too_big));
    assert_eq!((verdict, reason), (Verdict::Pass, Reason::KernelFragments));
    assert_checksums_valid(&out);
    let payload = vec![0x5a; 1481 - 28];
    let client_l4 = L4::Udp {
        sport: 53,
        dport: 5353,
        payload: &payload,
    };
    let inner = ip_packet(
        Ip {
            dst: CLIENT,
            ttl: ip.ttl - 1,
            ..ip
        },
        client_l4,
    );
    let outer = Ip {
        id: u16::from_be_bytes([out[18], out[19]]),
        df: false,
        ..Ip::new(GW, PEER)
    };
    // Addressed to us as it arrived, for the kernel to forward.
    assert!(
        out == ethernet(ROUTER_MAC, GW_MAC, &encapsulate(outer, &inner)),
        "encapsulated for the kernel to fragment"
    );
}

fn outbound_packets_too_big_for_the_route(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let payload = vec![0x5a; SMALL_MTU as usize + 1 - 28];
    let udp = L4::Udp {
        sport: 5353,
        dport: 53,
        payload: &payload,
    };
    let inner = ip_packet(Ip::new(CLIENT, BEHIND_SMALL_MTU), udp);
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: SMALL_MTU,
        });
    assert_answered_through_tunnel(gw, &inner, frag_needed, Reason::TooBig);
    assert_eq!(gw.flow_entries(), 0, "a refused packet created state");
    // Without DF: translated, and the kernel fragments it.
    let ip = Ip {
        df: false,
        ..Ip::new(CLIENT, BEHIND_SMALL_MTU)
    };
    let (verdict, out, reason) = gw.run(&from_peer(&ip_packet(ip, udp)));
    assert_eq!((verdict, reason), (Verdict::Pass, Reason::KernelFragments));
    let nat_port = u16::from_be_bytes([out[34], out[35]]);
    // Addressed to us as it arrived; TTL left for the kernel to decrement.
    let translated = ip_packet(Ip { src: GW, ..ip }, udp.with_sport(nat_port));
    assert!(
        out == ethernet(ROUTER_MAC, GW_MAC, &translated),
        "translated for the kernel to fragment"
    );
}

fn ttl_1_on_the_return_path_is_answered_to_the_sender(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let udp = QUERY;
    let nat_port = outbound(gw, CLIENT, udp, Reason::NewFlow);
    let reply = ip_packet(
        Ip {
            ttl: 1,
            ..Ip::new(SERVER, GW)
        },
        L4::Udp {
            sport: 53,
            dport: nat_port,
            payload: b"answer",
        },
    );
    let exceeded = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
    assert_answered_to_sender(gw, &reply, exceeded, Reason::TtlExceeded);
    let inbound = gw
        .flows()
        .into_iter()
        .find(|(k, _)| k.dir == DIR_IN)
        .unwrap();
    assert_eq!(
        inbound.1.packets, 0,
        "an expired packet counted on its flow"
    );
}

/// A router on the client side of the tunnel, inside a client range.
const CLIENT_ROUTER: [u8; 4] = [10, 0, 0, 1];

/// The IP header of an ICMP error `from` a client-side host `to` a remote,
/// as Linux sends it.
fn client_error_ip(from: [u8; 4], to: [u8; 4]) -> Ip {
    Ip {
        df: false,
        tos: 0xc0,
        ..Ip::new(from, to)
    }
}

/// The server's `l4` to `dst` as the client received it: the header the
/// server sent (see [`reply_ip`]), two hops later.
fn as_received(dst: [u8; 4], l4: L4) -> Vec<u8> {
    let ip = Ip {
        dst,
        ttl: 62,
        ..reply_ip(SERVER)
    };
    ip_packet(ip, l4)
}

/// The return half's `l4` (from the remote to the client's port) of an
/// outbound `l4`, with the client's port (or echo identifier) `port`.
fn reply_to(l4: L4, port: u16) -> L4 {
    match l4 {
        L4::Tcp { dport, payload, .. } => L4::tcp(dport, port, payload),
        L4::Udp { dport, payload, .. } => L4::Udp {
            sport: dport,
            dport: port,
            payload,
        },
        L4::EchoRequest { seq, .. } => L4::EchoReply { id: port, seq },
        L4::EchoReply { .. } => unreachable!("flows start with a request"),
    }
}

fn icmp_errors_from_a_client_reach_the_remote_translated(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let unreachable = Icmpv4Type::DestinationUnreachable;
    // (what, flow, error source, error type, bytes of the packet quoted)
    let cases = [
        (
            "the client's port unreachable, whole UDP datagram quoted",
            QUERY,
            CLIENT,
            unreachable(DestUnreachableHeader::Port),
            usize::MAX,
        ),
        (
            "a client-side router's time exceeded, 8 bytes of TCP quoted (no checksum)",
            L4::tcp(40001, 443, b"hello"),
            CLIENT_ROUTER,
            Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
            28,
        ),
        (
            "a client-side router's fragmentation needed, whole TCP segment quoted",
            L4::tcp(40000, 443, b"hello"),
            CLIENT_ROUTER,
            unreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1280 }),
            usize::MAX,
        ),
        (
            "host unreachable about an echo reply",
            L4::EchoRequest { id: 77, seq: 3 },
            CLIENT_ROUTER,
            unreachable(DestUnreachableHeader::Host),
            usize::MAX,
        ),
        (
            "parameter problem about UDP without checksum",
            L4::Udp {
                sport: 5354,
                dport: 53,
                payload: b"query",
            },
            CLIENT,
            Icmpv4Type::ParameterProblem(ParameterProblemHeader::PointerIndicatesError(8)),
            usize::MAX,
        ),
    ];
    for (what, l4, from, kind, quoted) in cases {
        let nat_port = outbound(gw, CLIENT, l4, Reason::NewFlow);
        let client_port = match l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => sport,
            L4::EchoRequest { id, .. } | L4::EchoReply { id, .. } => id,
        };
        let mut received = as_received(CLIENT, reply_to(l4, client_port));
        let mut sent = as_received(GW, reply_to(l4, nat_port));
        if what.contains("without checksum") {
            // The server computed no UDP checksum: it stays 0 both ways.
            for p in [&mut received, &mut sent] {
                p[26..28].copy_from_slice(&[0, 0]);
            }
        }
        let n = quoted.min(received.len());
        let error = client_error_ip(from, SERVER);
        let inner = icmp_error(error, kind.clone(), &received[..n]);
        let before = gw.flows();
        let out = outbound_packet(gw, &inner, Reason::IcmpErrorRelayed);
        let relayed = Ip {
            src: GW,
            ttl: error.ttl - 1,
            ..error
        };
        assert_eq!(
            out,
            ethernet(GW_MAC, ROUTER_MAC, &icmp_error(relayed, kind, &sent[..n])),
            "{what}"
        );
        assert_eq!(gw.flows(), before, "{what}: the error changed a flow");
    }
}

fn icmp_errors_from_a_client_about_no_flow_are_dropped(hook: Hook) {
    let gw = &mut Gateway::with(hook, |p| p.peers.push(PEER2.into()));
    outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let cport = 5353;
    let reply = reply_to(QUERY, cport);
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let error =
        |to, quoted: &[u8]| icmp_error(client_error_ip(CLIENT, to), unreachable.clone(), quoted);
    let about = |quoted: &[u8]| from_peer(&error(SERVER, quoted));
    let mut later_fragment = as_received(CLIENT, reply);
    later_fragment[6..8].copy_from_slice(&[0, 0x10]);
    let mut with_options = as_received(CLIENT, reply);
    with_options[0] = 0x46;
    let mut from_elsewhere = as_received(CLIENT, reply);
    from_elsewhere[12..16].copy_from_slice(&INTERNET_ROUTER);
    for (what, frame) in [
        (
            "a port with no flow",
            about(&as_received(CLIENT, reply_to(QUERY, cport + 1))),
        ),
        ("a packet from another remote", about(&from_elsewhere)),
        (
            "sent to another host than the quote's source",
            from_peer(&error(INTERNET_ROUTER, &as_received(CLIENT, reply))),
        ),
        ("a later fragment (no ports)", about(&later_fragment)),
        ("a quoted header with options", about(&with_options)),
        (
            "an echo request (replies are what the client receives)",
            about(&as_received(CLIENT, L4::EchoRequest { id: cport, seq: 1 })),
        ),
        (
            "the flow, but tunnelled by another peer than the flow's",
            ethernet(
                ROUTER_MAC,
                GW_MAC,
                &encapsulate(
                    Ip::new(PEER2, GW),
                    &error(SERVER, &as_received(CLIENT, reply)),
                ),
            ),
        ),
    ] {
        let before = gw.flows();
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!(
            (verdict, reason),
            (Verdict::Drop, Reason::IcmpErrorNoFlow),
            "{what}"
        );
        assert_eq!(out, frame, "{what}: frame modified");
        assert_eq!(gw.flows(), before, "{what}: the error changed a flow");
    }
}

fn icmp_errors_from_outside_the_policy_are_refused(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let quote = as_received(CLIENT, reply_to(QUERY, 5353));
    let error = |from| icmp_error(client_error_ip(from, SERVER), unreachable.clone(), &quote);
    let stranger = [10, 0, 9, 9];
    for (what, frame, want) in [
        (
            "tunnelled by an address not a peer",
            ethernet(
                ROUTER_MAC,
                GW_MAC,
                &encapsulate(Ip::new(stranger, GW), &error(CLIENT)),
            ),
            Reason::PeerNotAllowed,
        ),
        (
            "sent by an address not a client",
            from_peer(&error([172, 16, 0, 1])),
            Reason::ClientNotAllowed,
        ),
        (
            "sent by the gateway's own address",
            from_peer(&error(GW)),
            Reason::Loop,
        ),
    ] {
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!((verdict, reason), (Verdict::Drop, want), "{what}");
        assert_eq!(out, frame, "{what}: frame modified");
    }
}

fn short_or_expiring_icmp_errors_from_a_client_are_dropped(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let quote = as_received(CLIENT, reply_to(QUERY, 5353));
    let error = |ip, quoted: &[u8]| from_peer(&icmp_error(ip, unreachable.clone(), quoted));
    let ip = client_error_ip(CLIENT, SERVER);
    // The IP lengths end with the quoted IP header; the ports follow in the
    // frame, outside the error.
    let ports_outside = [error(ip, &quote[..20]), quote[20..28].to_vec()].concat();
    for (what, frame, want) in [
        (
            "a quote short of the 8 transport bytes",
            error(ip, &quote[..27]),
            Reason::Truncated,
        ),
        (
            "the quoted header cut short",
            error(ip, &quote[..12]),
            Reason::Truncated,
        ),
        (
            "the ports after the error's IP length",
            ports_outside,
            Reason::Truncated,
        ),
        (
            // Never an ICMP error about an ICMP error.
            "TTL 1 at the gateway",
            error(Ip { ttl: 1, ..ip }, &quote),
            Reason::TtlExceeded,
        ),
    ] {
        let before = gw.flows();
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!((verdict, reason), (Verdict::Drop, want), "{what}");
        assert_eq!(out, frame, "{what}: frame modified");
        assert_eq!(gw.flows(), before, "{what}: the error changed a flow");
    }
}
