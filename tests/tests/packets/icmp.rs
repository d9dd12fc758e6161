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
use crate::frames::{add_to_checksum, fix_ipv4_checksum, icmp_error};

for_each_hook!(
    ttl_1_from_a_client_is_answered_with_time_exceeded_through_the_tunnel,
    ttl_1_to_a_multicast_or_broadcast_address_is_dropped_unanswered,
    icmp_errors_about_a_flow_reach_its_client_translated_back,
    icmp_errors_about_no_flow_are_left_to_the_kernel,
    icmp_errors_quoting_a_first_fragment_are_relayed_both_ways,
    long_icmp_errors_are_relayed_whole_both_ways,
    icmp_errors_with_a_wrong_checksum_are_dropped,
    icmp_errors_that_cannot_go_on_are_dropped_unanswered,
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
/// peer, quoting what [`quoted`] says; returns the answer.
pub fn assert_answered_through_tunnel(
    gw: &mut Gateway,
    inner: &[u8],
    kind: Icmpv4Type,
    want: Reason,
) -> Vec<u8> {
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
    let error = icmp_error(error, kind, &inner[..quoted(inner)]);
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
    out
}

/// How much of IPv4 `packet` the gateway's own errors quote: the header and
/// 8 bytes (RFC 792), or a TCP segment's whole fixed header.
fn quoted(packet: &[u8]) -> usize {
    let tcp = packet[9] == 6;
    20 + if tcp { 20 } else { 8 }
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
        ethernet(
            GW_MAC,
            ROUTER_MAC,
            &icmp_error(error, kind, &packet[..quoted(packet)])
        ),
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
    assert_answered_through_tunnel(gw, &probe, exceeded.clone(), Reason::TtlExceeded);
    // A TCP probe (tcptraceroute) gets its whole fixed header quoted.
    let tcp_probe = ip_packet(
        Ip {
            ttl: 1,
            ..Ip::new(CLIENT, SERVER)
        },
        L4::syn(40000, 443),
    );
    assert_answered_through_tunnel(gw, &tcp_probe, exceeded.clone(), Reason::TtlExceeded);
    // TTL 0 (RFC 2003: never forward one after decapsulation) alike.
    let ttl_0 = ip_packet(
        Ip {
            ttl: 0,
            ..Ip::new(CLIENT, SERVER)
        },
        udp,
    );
    assert_answered_through_tunnel(gw, &ttl_0, exceeded, Reason::TtlExceeded);
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

/// An ICMP error about a flow: what it is, the flow's first packet (from
/// the client), the error's source, its type, and how many bytes of the
/// packet it quotes (`usize::MAX`: all of it).
type ErrorCase = (&'static str, L4<'static>, [u8; 4], Icmpv4Type, usize);

/// One error of each kind, each about a flow of its own, sent by the
/// quoted packet's destination `host` or by a `router` on its way.
fn error_cases(host: [u8; 4], router: [u8; 4]) -> [ErrorCase; 5] {
    let unreachable = Icmpv4Type::DestinationUnreachable;
    [
        (
            "port unreachable, whole UDP datagram quoted",
            QUERY,
            host,
            unreachable(DestUnreachableHeader::Port),
            usize::MAX,
        ),
        (
            "fragmentation needed, whole TCP segment quoted",
            L4::tcp(40000, 443, b"hello"),
            router,
            unreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 }),
            usize::MAX,
        ),
        (
            "time exceeded, 8 bytes of TCP quoted (no checksum)",
            L4::tcp(40001, 443, b"hello"),
            router,
            Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
            28,
        ),
        (
            "host unreachable about an echo flow",
            L4::EchoRequest { id: 77, seq: 3 },
            router,
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
            router,
            Icmpv4Type::ParameterProblem(ParameterProblemHeader::PointerIndicatesError(8)),
            usize::MAX,
        ),
    ]
}

/// The first `quoted` bytes of a packet `before` and `after` the gateway
/// translates it (UDP without checksum for the case that says so: the
/// sender computed none, and it stays 0 both ways).
fn quotes(what: &str, quoted: usize, mut before: Vec<u8>, mut after: Vec<u8>) -> [Vec<u8>; 2] {
    let n = quoted.min(before.len());
    [&mut before, &mut after].map(|p| {
        if what.contains("without checksum") {
            p[26..28].copy_from_slice(&[0, 0]);
        }
        p[..n].to_vec()
    })
}

/// No ICMP error about a datagram to a group or to everyone (RFC 1122
/// 3.2.2): mDNS from a client whose default route is the tunnel has TTL 1.
fn ttl_1_to_a_multicast_or_broadcast_address_is_dropped_unanswered(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    for dst in [[224, 0, 0, 251], [239, 1, 2, 3], [255, 255, 255, 255]] {
        let mdns = ip_packet(
            Ip {
                ttl: 1,
                ..Ip::new(CLIENT, dst)
            },
            L4::Udp {
                sport: 5353,
                dport: 5353,
                payload: b"mdns query",
            },
        );
        let (verdict, _, reason) = gw.run(&from_peer(&mdns));
        assert_eq!(
            (verdict, reason),
            (Verdict::Drop, Reason::TtlExceeded),
            "to {dst:?}"
        );
    }
    assert_eq!(gw.flow_entries(), 0);
}

fn icmp_errors_about_a_flow_reach_its_client_translated_back(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    for (what, l4, from, kind, quoted) in error_cases(SERVER, INTERNET_ROUTER) {
        let nat_port = outbound(gw, CLIENT, l4, Reason::NewFlow);
        let [sent, original] = quotes(
            what,
            quoted,
            as_sent(GW, l4.with_sport(nat_port)),
            as_sent(CLIENT, l4),
        );
        let (verdict, out, reason) = gw.run(&internet_error(from, kind.clone(), &sent));
        assert_eq!(
            (verdict, reason),
            (Verdict::Tx, Reason::IcmpErrorRelayed),
            "{what}"
        );
        assert_checksums_valid(&out);
        assert_eq!(
            out,
            relayed_to_client(&out, from, kind, &original),
            "{what}"
        );
    }
}

/// An ICMP error of type `kind` from `from` on the Internet side to the
/// translation address, quoting `quote`, as Linux sends it.
fn internet_error(from: [u8; 4], kind: Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    ethernet(
        ROUTER_MAC,
        GW_MAC,
        &icmp_error(internet_error_ip(from), kind, quote),
    )
}

fn internet_error_ip(from: [u8; 4]) -> Ip {
    Ip {
        df: false,
        tos: 0xc0,
        ..Ip::new(from, GW)
    }
}

/// The [`internet_error`] the gateway relays to the client, quoting
/// `quote`: encapsulated to the peer with the outer ID that `out` has.
fn relayed_to_client(out: &[u8], from: [u8; 4], kind: Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    let relayed = icmp_error(translated_in(internet_error_ip(from), CLIENT), kind, quote);
    let outer = Ip {
        id: u16::from_be_bytes([out[18], out[19]]),
        df: false,
        tos: 0xc0,
        ..Ip::new(GW, PEER)
    };
    ethernet(GW_MAC, ROUTER_MAC, &encapsulate(outer, &relayed))
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
    // No packet of a flow carries options (the gateway drops a client's
    // that do): a quote with them is about something else, even where
    // the options' bytes read as the flow's ports.
    let mut with_options = as_sent(GW, udp.with_sport(nat_port));
    let [p0, p1] = nat_port.to_be_bytes();
    with_options.splice(20..20, [p0, p1, 0, 53]);
    with_options[0] = 0x46;
    with_options[3] += 4;
    fix_ipv4_checksum(&mut with_options, 0);
    for (what, frame) in [
        (
            "a port with no flow (the host's own traffic)",
            about(&other_port),
        ),
        ("a packet from another address", about(&other_source)),
        ("a later fragment (no ports)", about(&later_fragment)),
        ("a quoted header with options", about(&with_options)),
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

/// `packet` as the first fragment of a larger datagram (more fragments).
fn first_fragment(mut packet: Vec<u8>) -> Vec<u8> {
    packet[6] |= 0x20;
    fix_ipv4_checksum(&mut packet, 0);
    packet
}

/// "Fragment reassembly time exceeded" quotes the first fragment of the
/// datagram that never completed (RFC 792): its ports name the flow, so it
/// is relayed like any error, from the remote to the client and back.
fn icmp_errors_quoting_a_first_fragment_are_relayed_both_ways(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let nat_port = outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let reassembly = Icmpv4Type::TimeExceeded(TimeExceededCode::FragmentReassemblyTimeExceeded);

    let sent = first_fragment(as_sent(GW, QUERY.with_sport(nat_port)));
    let (verdict, out, reason) = gw.run(&internet_error(SERVER, reassembly.clone(), &sent));
    assert_eq!((verdict, reason), (Verdict::Tx, Reason::IcmpErrorRelayed));
    assert_checksums_valid(&out);
    let original = first_fragment(as_sent(CLIENT, QUERY));
    assert_eq!(
        out,
        relayed_to_client(&out, SERVER, reassembly.clone(), &original),
        "from the remote to the client"
    );

    let received = first_fragment(query_reply());
    let error = client_error_ip(CLIENT, SERVER);
    let out = outbound_packet(
        gw,
        &icmp_error(error, reassembly.clone(), &received),
        Reason::IcmpErrorRelayed,
    );
    let sent = first_fragment(as_received(GW, QUERY.reply_to(nat_port)));
    assert_eq!(
        out,
        ethernet(
            GW_MAC,
            ROUTER_MAC,
            &icmp_error(translated_out(error), reassembly, &sent)
        ),
        "from the client to the remote"
    );
}

/// A datagram of the [`QUERY`] flow `len` IP bytes long, its payload
/// counting bytes, from `sport` to `dport`, as `packet` has it sent or
/// received: what long errors about the flow quote (routers quote up to
/// 576 bytes of error, RFC 1812 4.3.2.3).
fn long_datagram(
    len: usize,
    sport: u16,
    dport: u16,
    packet: fn([u8; 4], L4) -> Vec<u8>,
    addr: [u8; 4],
) -> Vec<u8> {
    let payload: Vec<u8> = (0..len - 28).map(|i| i as u8).collect();
    let udp = L4::Udp {
        sport,
        dport,
        payload: &payload,
    };
    packet(addr, udp)
}

/// Errors of any length are relayed whole and byte-exact: an odd length
/// (the last byte summed padded with zero), a router's 576 bytes quoting
/// part of a longer datagram, and one of 1401 bytes.
fn long_icmp_errors_are_relayed_whole_both_ways(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let nat_port = outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let exceeded = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
    let client_port = QUERY.sport();
    let before = gw.flows();
    for error_len in [61, 576, 1401] {
        let quoted = error_len - 28;
        let sent = long_datagram(1000.max(quoted), nat_port, 53, as_sent, GW);
        let original = long_datagram(1000.max(quoted), client_port, 53, as_sent, CLIENT);
        let frame = internet_error(INTERNET_ROUTER, exceeded.clone(), &sent[..quoted]);
        assert_eq!(frame.len(), 14 + error_len);
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!(
            (verdict, reason),
            (Verdict::Tx, Reason::IcmpErrorRelayed),
            "{error_len} bytes from the remote"
        );
        assert_checksums_valid(&out);
        let want = relayed_to_client(&out, INTERNET_ROUTER, exceeded.clone(), &original[..quoted]);
        assert!(
            out == want,
            "{error_len} bytes from the remote: not as relayed"
        );

        let received = long_datagram(1000.max(quoted), 53, client_port, as_received, CLIENT);
        let sent = long_datagram(1000.max(quoted), 53, nat_port, as_received, GW);
        let error = client_error_ip(CLIENT_ROUTER, SERVER);
        let inner = icmp_error(error, exceeded.clone(), &received[..quoted]);
        assert_eq!(inner.len(), error_len);
        let out = outbound_packet(gw, &inner, Reason::IcmpErrorRelayed);
        let want = ethernet(
            GW_MAC,
            ROUTER_MAC,
            &icmp_error(translated_out(error), exceeded.clone(), &sent[..quoted]),
        );
        assert!(
            out == want,
            "{error_len} bytes from the client: not as relayed"
        );
    }
    assert_eq!(gw.flows(), before, "an error changed a flow");
}

/// An error about a flow whose ICMP checksum does not verify over the
/// whole message is dropped (RFC 5508 REQ-3; its receiver would discard it
/// anyway), either way, and left as it came: wrong in its checksum field,
/// or corrupt where the translation never reads (deep in the quote, or its
/// odd last byte).
fn icmp_errors_with_a_wrong_checksum_are_dropped(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let nat_port = outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let client_port = QUERY.sport();
    // Errors of `len` IP bytes from the remote and from the client, with
    // `corrupt` applied to their IP packets (the ICMP message at 20).
    let errors = |len: usize, corrupt: &dyn Fn(&mut Vec<u8>)| {
        let quoted = len - 28;
        let sent = long_datagram(1000.max(quoted), nat_port, 53, as_sent, GW);
        let mut from_remote = icmp_error(
            internet_error_ip(SERVER),
            unreachable.clone(),
            &sent[..quoted],
        );
        corrupt(&mut from_remote);
        let received = long_datagram(1000.max(quoted), 53, client_port, as_received, CLIENT);
        let mut from_client = port_unreachable(&received[..quoted]);
        corrupt(&mut from_client);
        [
            ethernet(ROUTER_MAC, GW_MAC, &from_remote),
            from_peer(&from_client),
        ]
    };
    let wrong_by = |p: &mut Vec<u8>| add_to_checksum(p, 20 + 2, 0x1234);
    let deep = |p: &mut Vec<u8>| p[20 + 8 + 300] ^= 0x01;
    let last = |p: &mut Vec<u8>| *p.last_mut().unwrap() ^= 0x80;
    let [wrong_remote, wrong_client] = errors(61, &wrong_by);
    let [deep_remote, deep_client] = errors(576, &deep);
    let [last_remote, last_client] = errors(1401, &last);
    let drop = |what, frame| (what, frame, Verdict::Drop, Reason::BadChecksum);
    let cases = vec![
        drop("checksum off by 0x1234, from the remote", wrong_remote),
        drop("checksum off by 0x1234, from the client", wrong_client),
        drop(
            "a bit flipped deep in the quote, from the remote",
            deep_remote,
        ),
        drop(
            "a bit flipped deep in the quote, from the client",
            deep_client,
        ),
        drop("the odd last byte changed, from the remote", last_remote),
        drop("the odd last byte changed, from the client", last_client),
    ];
    let before = gw.flows();
    assert_cases(gw, cases);
    assert_eq!(gw.flows(), before, "an error changed a flow");
}

/// An error about a flow that expires at the gateway, or does not fit the
/// next hop with DF set, is dropped: never an ICMP error about an ICMP
/// error (RFC 1122 3.2.2), either way.
fn icmp_errors_that_cannot_go_on_are_dropped_unanswered(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let nat_port = outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    outbound_to(gw, CLIENT, BEHIND_SMALL_MTU, QUERY, Reason::NewFlow);
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    // A datagram of the flow of `len` IP bytes, as the gateway sent it to
    // `remote`, and as the client received the reply from there.
    let long = |len: usize| vec![0x5a; len - 28];
    let sent = |len| {
        let payload = long(len);
        let l4 = L4::Udp {
            sport: nat_port,
            dport: 53,
            payload: &payload,
        };
        as_sent(GW, l4)
    };
    let received = |len, remote| {
        let payload = long(len);
        let l4 = L4::Udp {
            sport: 53,
            dport: QUERY.sport(),
            payload: &payload,
        };
        ip_packet(
            Ip {
                dst: CLIENT,
                ..Ip::new(remote, CLIENT)
            },
            l4,
        )
    };
    let from_remote = |ip: Ip, quote: &[u8]| {
        ethernet(
            ROUTER_MAC,
            GW_MAC,
            &icmp_error(ip, unreachable.clone(), quote),
        )
    };
    let drop = |what, frame, reason| (what, frame, Verdict::Drop, reason);
    let cases = vec![
        drop(
            "from the remote, TTL 1 at the gateway",
            from_remote(
                Ip {
                    ttl: 1,
                    ..Ip::new(SERVER, GW)
                },
                &sent(100),
            ),
            Reason::TtlExceeded,
        ),
        drop(
            // 28 bytes of headers and a 1453-byte quote: 1481 bytes, one
            // more than the tunnel takes on a 1500-byte link.
            "from the remote, too big for the tunnel, DF set",
            from_remote(Ip::new(SERVER, GW), &sent(1453)),
            Reason::TooBig,
        ),
        drop(
            "from the client, too big for the route to the remote, DF set",
            from_peer(&icmp_error(
                Ip {
                    df: true,
                    ..client_error_ip(CLIENT, BEHIND_SMALL_MTU)
                },
                unreachable.clone(),
                &received(SMALL_MTU as usize - 27, BEHIND_SMALL_MTU),
            )),
            Reason::TooBig,
        ),
    ];
    let before = gw.flows();
    assert_cases(gw, cases);
    assert_eq!(gw.flows(), before, "an error changed a flow");
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
    let nat_port = outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let ttl_1 = Ip {
        ttl: 1,
        ..Ip::new(SERVER, GW)
    };
    let answer = |payload: &[u8]| {
        let udp = L4::Udp {
            sport: 53,
            dport: nat_port,
            payload,
        };
        ip_packet(ttl_1, udp)
    };
    let reply = answer(b"answer");
    let exceeded = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
    assert_answered_to_sender(gw, &reply, exceeded.clone(), Reason::TtlExceeded);
    // A UDP checksum of all ones (a sum of zero) is quoted as it is, also
    // where TC settles quoted checksums that might be pending.
    let all_ones = (0..=u16::MAX)
        .map(|w| answer(&w.to_be_bytes()))
        .find(|p| p[26..28] == [0xff, 0xff])
        .unwrap();
    assert_answered_to_sender(gw, &all_ones, exceeded.clone(), Reason::TtlExceeded);
    // A TCP segment gets its whole fixed header quoted.
    let tcp_port = outbound(gw, CLIENT, L4::syn(40000, 443), Reason::NewFlow);
    let tcp_reply = ip_packet(ttl_1, L4::tcp(443, tcp_port, b"answer"));
    assert_answered_to_sender(gw, &tcp_reply, exceeded.clone(), Reason::TtlExceeded);
    // TTL 0 (RFC 2003: never encapsulate one) alike.
    let ttl_0 = Ip { ttl: 0, ..ttl_1 };
    let udp = L4::Udp {
        sport: 53,
        dport: nat_port,
        payload: b"answer",
    };
    assert_answered_to_sender(gw, &ip_packet(ttl_0, udp), exceeded, Reason::TtlExceeded);
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

/// An ICMP error `from` a client-side host `to` a remote quoting `quote`,
/// as Linux sends it, and tunnelled by the peer.
fn client_error(from: [u8; 4], to: [u8; 4], kind: Icmpv4Type, quote: &[u8]) -> Vec<u8> {
    icmp_error(client_error_ip(from, to), kind, quote)
}

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

/// The client's port unreachable about the reply to [`QUERY`].
fn port_unreachable(quote: &[u8]) -> Vec<u8> {
    let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    client_error(CLIENT, SERVER, kind, quote)
}

/// The reply to [`QUERY`] as the client received it.
fn query_reply() -> Vec<u8> {
    as_received(CLIENT, QUERY.reply_to(QUERY.sport()))
}

fn icmp_errors_from_a_client_reach_the_remote_translated(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    for (what, l4, from, kind, quoted) in error_cases(CLIENT, CLIENT_ROUTER) {
        let nat_port = outbound(gw, CLIENT, l4, Reason::NewFlow);
        let [received, sent] = quotes(
            what,
            quoted,
            as_received(CLIENT, l4.reply_to(l4.sport())),
            as_received(GW, l4.reply_to(nat_port)),
        );
        let error = client_error_ip(from, SERVER);
        let before = gw.flows();
        let out = outbound_packet(
            gw,
            &icmp_error(error, kind.clone(), &received),
            Reason::IcmpErrorRelayed,
        );
        assert_eq!(
            out,
            ethernet(
                GW_MAC,
                ROUTER_MAC,
                &icmp_error(translated_out(error), kind, &sent)
            ),
            "{what}"
        );
        assert_eq!(gw.flows(), before, "{what}: the error changed a flow");
    }
}

fn icmp_errors_from_a_client_about_no_flow_are_dropped(hook: Hook) {
    let gw = &mut Gateway::with(hook, |p| p.admission.peers.push(PEER2.into()));
    outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let reply = query_reply();
    let edited = |at: usize, bytes: &[u8]| {
        let mut quote = reply.clone();
        quote[at..at + bytes.len()].copy_from_slice(bytes);
        from_peer(&port_unreachable(&quote))
    };
    let no_flow = |what, frame| (what, frame, Verdict::Drop, Reason::IcmpErrorNoFlow);
    let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let cases = vec![
        no_flow(
            "a port with no flow",
            from_peer(&port_unreachable(&as_received(
                CLIENT,
                QUERY.reply_to(QUERY.sport() + 1),
            ))),
        ),
        no_flow("a packet from another remote", edited(12, &INTERNET_ROUTER)),
        no_flow(
            "sent to another host than the quote's source",
            from_peer(&client_error(CLIENT, INTERNET_ROUTER, kind, &reply)),
        ),
        no_flow("a later fragment (no ports)", edited(6, &[0, 0x10])),
        no_flow("a quoted header with options", edited(0, &[0x46])),
        no_flow(
            "an echo request (replies are what the client receives)",
            from_peer(&port_unreachable(&as_received(
                CLIENT,
                L4::EchoRequest { id: 7, seq: 1 },
            ))),
        ),
        no_flow(
            "the flow, but tunnelled by another peer than the flow's",
            ethernet(
                ROUTER_MAC,
                GW_MAC,
                &encapsulate(Ip::new(PEER2, GW), &port_unreachable(&reply)),
            ),
        ),
    ];
    let before = gw.flows();
    assert_cases(gw, cases);
    assert_eq!(gw.flows(), before, "an error changed a flow");
}

fn icmp_errors_from_outside_the_policy_are_refused(hook: Hook) {
    let gw = &mut Gateway::with(hook, |p| {
        p.admission.peers.push(PEER2.into());
        p.admission.peer_clients = [(PEER2.into(), vec!["10.0.0.0/16".parse().unwrap()])].into();
    });
    outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let error = |from| client_error(from, SERVER, kind.clone(), &query_reply());
    let drop = |what, frame, reason| (what, frame, Verdict::Drop, reason);
    let cases = vec![
        drop(
            "tunnelled by an address not a peer",
            ethernet(
                ROUTER_MAC,
                GW_MAC,
                &encapsulate(Ip::new([10, 0, 9, 9], GW), &error(CLIENT)),
            ),
            Reason::PeerNotAllowed,
        ),
        drop(
            "sent by an address not a client",
            from_peer(&error([172, 16, 0, 1])),
            Reason::ClientNotAllowed,
        ),
        drop(
            "sent by the gateway's own address",
            from_peer(&error(GW)),
            Reason::Loop,
        ),
        drop(
            "tunnelled by a peer bound to other clients",
            ethernet(
                ROUTER_MAC,
                GW_MAC,
                &encapsulate(Ip::new(PEER2, GW), &error(CLIENT)),
            ),
            Reason::ClientNotAllowed,
        ),
    ];
    assert_cases(gw, cases);
}

fn short_or_expiring_icmp_errors_from_a_client_are_dropped(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    outbound(gw, CLIENT, QUERY, Reason::NewFlow);
    let reply = query_reply();
    let short = |what, n| {
        let frame = from_peer(&port_unreachable(&reply[..n]));
        (what, frame, Verdict::Drop, Reason::Truncated)
    };
    let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let cases = vec![
        short("a quote short of the 8 transport bytes", 27),
        short("the quoted header cut short", 12),
        (
            // The IP lengths end with the quoted IP header; the ports
            // follow in the frame, outside the error.
            "the ports after the error's IP length",
            [
                from_peer(&port_unreachable(&reply[..20])),
                reply[20..28].to_vec(),
            ]
            .concat(),
            Verdict::Drop,
            Reason::Truncated,
        ),
        (
            // Never an ICMP error about an ICMP error.
            "TTL 1 at the gateway",
            from_peer(&icmp_error(
                Ip {
                    ttl: 1,
                    ..client_error_ip(CLIENT, SERVER)
                },
                kind,
                &reply,
            )),
            Verdict::Drop,
            Reason::TtlExceeded,
        ),
    ];
    let before = gw.flows();
    assert_cases(gw, cases);
    assert_eq!(gw.flows(), before, "an error changed a flow");
}
