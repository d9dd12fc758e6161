//! Packet tests: a crafted frame into the XDP or the TC program
//! (BPF_PROG_TEST_RUN), the exact frame out, built and verified
//! independently with etherparse. Every case runs for both hooks, which
//! must agree to the byte. Need root.

/// One `#[test]` per hook for each case (a function of the hook), in
/// modules `xdp` and `tc`: `cargo test tc::` runs the TC program's.
macro_rules! for_each_hook {
    ($($case:ident),* $(,)?) => {
        for_each_hook!(@hook xdp Xdp; $($case),*);
        for_each_hook!(@hook tc Tc; $($case),*);
    };
    (@hook $module:ident $hook:ident; $($case:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $case() {
                    super::$case(super::Hook::$hook);
                }
            )*
        }
    };
}

mod cache;
mod corpus;
mod fragments;
mod frames;
mod gateway;
mod icmp;
mod malformed;
mod mss;
mod outer_id;
mod state;

use egress_common::reason::Reason;
use frames::{Ip, L4, assert_checksums_valid, encapsulate, ethernet, ip_packet};
use gateway::*;

for_each_hook!(
    tcp_outbound_and_return,
    udp_outbound_and_return_with_port_change,
    udp_without_checksum_stays_without,
    udp_checksum_that_sums_to_zero_goes_out_as_all_ones,
    the_outer_header_copies_dscp_and_ecn_of_the_inner,
    a_congestion_mark_on_the_outer_header_reaches_the_inner,
    icmp_echo_outbound_and_return,
    colliding_flows_get_distinct_ports_and_replies_reach_their_owner,
    unresolved_next_hop_goes_to_the_kernel_translated,
    route_via_another_interface_is_redirected_there,
    sweep_expires_idle_flows_whole_and_keeps_live_ones,
    rejected_frames_get_their_verdict_and_are_left_unchanged,
);

/// Byte range of the outer IPv4 identification in an encapsulated frame:
/// 0 when DF is set, else the next of the peer's counter, which starts
/// somewhere random (`outer_id` checks how it counts).
const OUTER_ID: std::ops::Range<usize> = 18..20;

/// A frame from the peer carrying `inner`.
fn from_peer(inner: &[u8]) -> Vec<u8> {
    ethernet(ROUTER_MAC, GW_MAC, &encapsulate(Ip::new(PEER, GW), inner))
}

/// Sends `l4` from `client` outbound; asserts it leaves decapsulated with
/// only the source translated, and returns the translated source port.
fn outbound(gw: &mut Gateway, client: [u8; 4], l4: L4, want: Reason) -> u16 {
    outbound_to(gw, client, SERVER, l4, want)
}

/// As [`outbound`], to `remote`.
fn outbound_to(gw: &mut Gateway, client: [u8; 4], remote: [u8; 4], l4: L4, want: Reason) -> u16 {
    outbound_as(gw, client, remote, l4, l4, want)
}

/// As [`outbound_to`], where the transport header leaves as `out_l4`
/// (its source port aside).
fn outbound_as(
    gw: &mut Gateway,
    client: [u8; 4],
    remote: [u8; 4],
    l4: L4,
    out_l4: L4,
    want: Reason,
) -> u16 {
    let ip = Ip::new(client, remote);
    let out = outbound_packet(gw, &ip_packet(ip, l4), want);
    let sliced = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
    let port = match sliced.transport.unwrap() {
        etherparse::TransportSlice::Tcp(t) => t.source_port(),
        etherparse::TransportSlice::Udp(u) => u.source_port(),
        etherparse::TransportSlice::Icmpv4(i) => match i.icmp_type() {
            etherparse::Icmpv4Type::EchoRequest(e) => e.id,
            t => panic!("{t:?}"),
        },
        t => panic!("{t:?}"),
    };
    let want = ip_packet(translated_out(ip), out_l4.with_sport(port));
    assert_eq!(
        out,
        ethernet(GW_MAC, ROUTER_MAC, &want),
        "translated outbound frame"
    );
    port
}

/// The IP header fields of an outbound packet from `ip` once translated.
fn translated_out(ip: Ip) -> Ip {
    Ip {
        src: GW,
        ttl: ip.ttl - 1,
        ..ip
    }
}

/// Sends the client's IP `packet` from the peer; asserts it is forwarded
/// (counted as `want`) with valid checksums, and returns the frame.
fn outbound_packet(gw: &mut Gateway, packet: &[u8], want: Reason) -> Vec<u8> {
    let (verdict, out, reason) = gw.run(&from_peer(packet));
    assert_eq!((verdict, reason), (Verdict::Tx, want));
    assert_checksums_valid(&out);
    out
}

/// Sends the server's reply `l4` to the translation; asserts it leaves
/// encapsulated to the peer with only the destination translated back.
fn inbound(gw: &mut Gateway, l4: L4, client: [u8; 4], client_l4: L4) {
    inbound_from(gw, SERVER, l4, client, client_l4)
}

/// As [`inbound`], from `remote`.
fn inbound_from(gw: &mut Gateway, remote: [u8; 4], l4: L4, client: [u8; 4], client_l4: L4) {
    let ip = reply_ip(remote);
    let inner = ip_packet(translated_in(ip, client), client_l4);
    inbound_packet(gw, &ip_packet(ip, l4), &inner);
}

/// The IP header fields of a reply from `remote` to the translation.
fn reply_ip(remote: [u8; 4]) -> Ip {
    Ip {
        df: false,
        tos: 0x28,
        ..Ip::new(remote, GW)
    }
}

/// The IP header fields of a reply from `ip` once translated to `client`.
fn translated_in(ip: Ip, client: [u8; 4]) -> Ip {
    Ip {
        dst: client,
        ttl: ip.ttl - 1,
        ..ip
    }
}

/// Sends the server's IP `packet` to the gateway; asserts it leaves as
/// `inner` encapsulated to the peer, and returns the frame.
fn inbound_packet(gw: &mut Gateway, packet: &[u8], inner: &[u8]) -> Vec<u8> {
    inbound_packet_to(gw, packet, inner, PEER)
}

/// As [`inbound_packet`], tunnelled to `peer`.
fn inbound_packet_to(gw: &mut Gateway, packet: &[u8], inner: &[u8], peer: [u8; 4]) -> Vec<u8> {
    let (verdict, out, reason) = gw.run(&ethernet(ROUTER_MAC, GW_MAC, packet));
    assert_eq!((verdict, reason), (Verdict::Tx, Reason::ReverseHit));
    assert_checksums_valid(&out);
    // RFC 2003: TOS and DF copied from the inner header, TTL ours.
    let outer = Ip {
        id: 0,
        df: inner[6] & 0x40 != 0,
        tos: inner[1],
        ..Ip::new(GW, peer)
    };
    let mut want = ethernet(GW_MAC, ROUTER_MAC, &encapsulate(outer, inner));
    assert_eq!(out.len(), want.len());
    if !outer.df {
        want[OUTER_ID].copy_from_slice(&out[OUTER_ID]);
        // The outer checksum covers the ID: take the one etherparse validated.
        want[24..26].copy_from_slice(&out[24..26]);
    }
    assert_eq!(out, want, "encapsulated return frame");
    out
}

/// A frame the gateway must not translate: what is wrong with it, the
/// frame, and the verdict and reason it gets.
type Case = (&'static str, Vec<u8>, Verdict, Reason);

/// Runs each case and asserts its verdict and reason, that the frame is
/// left as it came, and that no flow appeared.
fn assert_cases(gw: &mut Gateway, cases: Vec<Case>) {
    let entries = gw.flow_entries();
    for (what, frame, verdict, reason) in cases {
        let (v, out, r) = gw.run(&frame);
        assert_eq!((v, r), (verdict, reason), "{what}");
        assert_eq!(out, frame, "{what}: frame modified");
    }
    assert_eq!(gw.flow_entries(), entries, "a rejected frame created state");
}

fn tcp_outbound_and_return(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let syn = L4::syn(23456, 80);
    // The client's port lies in the range and is free: it is kept.
    assert_eq!(outbound(gw, CLIENT, syn, Reason::NewFlow), 23456);
    let data = L4::tcp(23456, 80, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(outbound(gw, CLIENT, data, Reason::Translated), 23456);
    let reply = L4::tcp(80, 23456, b"HTTP/1.0 200 OK\r\n");
    inbound(gw, reply, CLIENT, reply);
    // With DF, as most TCP is sent: the outer header has it too, and ID 0.
    let ip = Ip {
        df: true,
        ..reply_ip(SERVER)
    };
    let inner = ip_packet(translated_in(ip, CLIENT), reply);
    inbound_packet(gw, &ip_packet(ip, reply), &inner);
    assert_eq!(gw.flow_entries(), 2);
}

fn udp_outbound_and_return_with_port_change(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    // Port 5353 is outside the range: the flow gets one from the range.
    let q = L4::Udp {
        sport: 5353,
        dport: 53,
        payload: b"query",
    };
    let port = outbound(gw, CLIENT, q, Reason::NewFlow);
    assert!((PORTS.min..=PORTS.max).contains(&port), "{port}");
    let reply = L4::Udp {
        sport: 53,
        dport: port,
        payload: b"answer",
    };
    inbound(
        gw,
        reply,
        CLIENT,
        L4::Udp {
            sport: 53,
            dport: 5353,
            payload: b"answer",
        },
    );
}

fn udp_without_checksum_stays_without(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let mut inner = ip_packet(
        Ip::new(CLIENT, SERVER),
        L4::Udp {
            sport: 4000,
            dport: 9,
            payload: b"x",
        },
    );
    inner[26..28].copy_from_slice(&[0, 0]);
    let (verdict, out, _) = gw.run(&from_peer(&inner));
    assert_eq!(verdict, Verdict::Tx);
    assert_eq!(&out[14 + 26..14 + 28], &[0, 0]);
    assert_checksums_valid(&out);
    // And the reply without one: encapsulated to the client without one.
    let nat_port = u16::from_be_bytes([out[34], out[35]]);
    let reply = |dport| L4::Udp {
        sport: 9,
        dport,
        payload: b"y",
    };
    let ip = reply_ip(SERVER);
    let mut packet = ip_packet(ip, reply(nat_port));
    packet[26..28].copy_from_slice(&[0, 0]);
    let mut inner = ip_packet(translated_in(ip, CLIENT), reply(4000));
    inner[26..28].copy_from_slice(&[0, 0]);
    inbound_packet(gw, &packet, &inner);
}

/// RFC 768: a UDP checksum whose sum comes to zero is sent as all ones,
/// since zero means "none". A translation that makes the sum zero must
/// write 0xffff, not 0 (which would tell the receiver not to check).
fn udp_checksum_that_sums_to_zero_goes_out_as_all_ones(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    // Outbound: 21000 lies in the range and is kept, so the translated
    // packet is known before it is sent.
    fn query(payload: &[u8]) -> L4<'_> {
        L4::Udp {
            sport: 21000,
            dport: 53,
            payload,
        }
    }
    fn reply(payload: &[u8]) -> L4<'_> {
        L4::Udp {
            sport: 53,
            dport: 21000,
            payload,
        }
    }
    // The payload word that gives `packet` (built by etherparse, which
    // writes a zero sum as 0xffff) a checksum of all ones.
    let all_ones = |packet: &dyn Fn(&[u8]) -> Vec<u8>| {
        (0..=u16::MAX)
            .map(u16::to_be_bytes)
            .find(|w| packet(w)[26..28] == [0xff, 0xff])
            .unwrap()
    };
    let client = Ip::new(CLIENT, SERVER);
    let w = all_ones(&|w| ip_packet(translated_out(client), query(w)));
    assert_ne!(ip_packet(client, query(&w))[26..28], [0xff, 0xff]);
    // `outbound` and `inbound` compare every byte, the checksum's too.
    assert_eq!(outbound(gw, CLIENT, query(&w), Reason::NewFlow), 21000);
    // Return: the reply translated back to the client sums to zero.
    let ip = reply_ip(SERVER);
    let w = all_ones(&|w| ip_packet(translated_in(ip, CLIENT), reply(w)));
    inbound(gw, reply(&w), CLIENT, reply(&w));
}

/// RFC 2003 with RFC 6040's normal mode: the outer TOS byte is the inner
/// one, ECN field included, a congestion mark (CE) too, so that routers on
/// the way to the peer see the packet's DSCP and whether it is ECN-capable.
fn the_outer_header_copies_dscp_and_ecn_of_the_inner(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let nat_port = outbound(gw, CLIENT, L4::syn(23456, 80), Reason::NewFlow);
    let reply = L4::tcp(80, nat_port, b"x");
    let client_reply = L4::tcp(80, 23456, b"x");
    // DSCP AF11 with each ECN codepoint, and expedited forwarding.
    for tos in [0x28, 0x29, 0x2a, 0x2b, 0xb8] {
        let ip = Ip {
            tos,
            ..reply_ip(SERVER)
        };
        let inner = ip_packet(translated_in(ip, CLIENT), client_reply);
        // `inbound_packet` builds the outer header with the inner's TOS.
        inbound_packet(gw, &ip_packet(ip, reply), &inner);
    }
}

/// RFC 6040 at the tunnel's exit, as the kernel's ipip does it: CE on the
/// outer header of an ECN-capable packet marks the inner one, ECT(1) turns
/// an inner ECT(0) into ECT(1), the outer DSCP is not taken; CE over a
/// packet that is not ECN-capable cannot be carried on, and drops it.
fn a_congestion_mark_on_the_outer_header_reaches_the_inner(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let query = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: b"query",
    };
    let (ect_1, ect_0, ce) = (0b01, 0b10, 0b11);
    let client = |tos| Ip {
        tos,
        ..Ip::new(CLIENT, SERVER)
    };
    let tunnelled = |outer_tos, inner_tos| {
        let outer = Ip {
            tos: outer_tos,
            ..Ip::new(PEER, GW)
        };
        let inner = ip_packet(client(inner_tos), query);
        ethernet(ROUTER_MAC, GW_MAC, &encapsulate(outer, &inner))
    };
    let mut reason = Reason::NewFlow;
    // (outer TOS, inner TOS, the inner TOS that leaves)
    for (outer, inner, want) in [
        (ce, 0x28 | ect_0, 0x28 | ce),
        (ce, 0x28 | ect_1, 0x28 | ce),
        (ce, 0x28 | ce, 0x28 | ce),
        (0xb8 | ect_1, 0x28 | ect_0, 0x28 | ect_1),
        (ect_0, 0x28 | ect_1, 0x28 | ect_1),
        (0xb8 | ect_0, 0x28, 0x28),
        (0xb8, ect_0, ect_0),
    ] {
        let (verdict, out, r) = gw.run(&tunnelled(outer, inner));
        assert_eq!(
            (verdict, r),
            (Verdict::Tx, reason),
            "{outer:#x} over {inner:#x}"
        );
        let want = ip_packet(translated_out(client(want)), query);
        assert_eq!(
            out,
            ethernet(GW_MAC, ROUTER_MAC, &want),
            "{outer:#x} over {inner:#x}"
        );
        reason = Reason::Translated;
    }
    assert_cases(
        gw,
        vec![(
            "CE over a packet that is not ECN-capable",
            tunnelled(ce, 0x28),
            Verdict::Drop,
            Reason::BadOuter,
        )],
    );
}

fn icmp_echo_outbound_and_return(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let id = outbound(
        gw,
        CLIENT,
        L4::EchoRequest { id: 7, seq: 1 },
        Reason::NewFlow,
    );
    assert!((PORTS.min..=PORTS.max).contains(&id));
    inbound(
        gw,
        L4::EchoReply { id, seq: 1 },
        CLIENT,
        L4::EchoReply { id: 7, seq: 1 },
    );
}

fn colliding_flows_get_distinct_ports_and_replies_reach_their_owner(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let l4 = L4::syn(25000, 443);
    let first = outbound(gw, CLIENT, l4, Reason::NewFlow);
    let second = outbound(gw, CLIENT2, l4, Reason::NewFlow);
    assert_eq!(first, 25000);
    assert_ne!(second, first);
    let reply = |dport| L4::tcp(443, dport, b"");
    inbound(gw, reply(second), CLIENT2, reply(25000));
    inbound(gw, reply(first), CLIENT, reply(25000));
    assert_eq!(gw.flow_entries(), 4);
}

fn unresolved_next_hop_goes_to_the_kernel_translated(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let ip = Ip::new(CLIENT, UNRESOLVED);
    let l4 = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: b"q",
    };
    let (verdict, out, reason) = gw.run(&from_peer(&ip_packet(ip, l4)));
    assert_eq!((verdict, reason), (Verdict::Pass, Reason::NoNeighbour));
    // Addressed to us as it arrived; TTL left for the kernel to decrement.
    assert_eq!(
        out,
        ethernet(ROUTER_MAC, GW_MAC, &ip_packet(Ip { src: GW, ..ip }, l4))
    );
}

fn route_via_another_interface_is_redirected_there(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let ip = Ip::new(CLIENT, BEYOND_ETH1);
    let l4 = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: b"q",
    };
    let (verdict, out, reason) = gw.run(&from_peer(&ip_packet(ip, l4)));
    assert_eq!((verdict, reason), (Verdict::Redirect, Reason::NewFlow));
    let translated = Ip {
        src: GW,
        ttl: ip.ttl - 1,
        ..ip
    };
    assert_eq!(
        out,
        ethernet(ETH1_MAC, ETH1_NEXT_HOP_MAC, &ip_packet(translated, l4))
    );
}

fn sweep_expires_idle_flows_whole_and_keeps_live_ones(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let echo_id = outbound(
        gw,
        CLIENT,
        L4::EchoRequest { id: 7, seq: 1 },
        Reason::NewFlow,
    );
    let udp = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: b"q",
    };
    outbound(gw, CLIENT, udp, Reason::NewFlow);
    let now = egress_user::clock::monotonic_ns();
    let secs = |s: u64| now + s * 1_000_000_000;
    let sweep = |gw: &mut Gateway, t| {
        let s = gw.sweep(t);
        (s.live, s.expired)
    };
    assert_eq!(sweep(gw, now), (2, 0));
    // ICMP echo idles out after 60 s, UDP only after 300 s.
    assert_eq!(sweep(gw, secs(61)), (1, 1));
    assert_eq!(
        gw.flow_entries(),
        2,
        "both halves of the echo flow go, the UDP flow stays"
    );
    let reply = ip_packet(
        Ip::new(SERVER, GW),
        L4::EchoReply {
            id: echo_id,
            seq: 1,
        },
    );
    let (verdict, _, reason) = gw.run(&ethernet(ROUTER_MAC, GW_MAC, &reply));
    assert_eq!((verdict, reason), (Verdict::Pass, Reason::NotOurs));
    assert_eq!(sweep(gw, secs(301)), (0, 1));
    assert_eq!(gw.flow_entries(), 0);
}

/// Frames the gateway must not translate: (what, frame, verdict, reason).
fn rejected() -> Vec<(&'static str, Vec<u8>, Verdict, Reason)> {
    let tcp = L4::syn(23456, 80);
    let inner = ip_packet(Ip::new(CLIENT, SERVER), tcp);
    let mut arp = ethernet(ROUTER_MAC, GW_MAC, &[0u8; 28]);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let stranger = [10, 0, 9, 9];
    vec![
        (
            "peer not allowed",
            ethernet(
                ROUTER_MAC,
                GW_MAC,
                &encapsulate(Ip::new(stranger, GW), &inner),
            ),
            Verdict::Drop,
            Reason::PeerNotAllowed,
        ),
        (
            "inner source not a client",
            from_peer(&ip_packet(Ip::new([172, 16, 0, 1], SERVER), tcp)),
            Verdict::Drop,
            Reason::ClientNotAllowed,
        ),
        (
            "inner source is the gateway itself",
            from_peer(&ip_packet(Ip::new(GW, SERVER), tcp)),
            Verdict::Drop,
            Reason::Loop,
        ),
        (
            // Policy first: the gateway answers only its clients.
            "inner TTL 1 from a source not a client",
            from_peer(&ip_packet(
                Ip {
                    ttl: 1,
                    ..Ip::new([172, 16, 0, 1], SERVER)
                },
                tcp,
            )),
            Verdict::Drop,
            Reason::ClientNotAllowed,
        ),
        (
            // Policy first: RFC 6040's drop is for our peers' packets.
            "CE over a packet that is not ECN-capable, from a peer not allowed",
            ethernet(
                ROUTER_MAC,
                GW_MAC,
                &encapsulate(
                    Ip {
                        tos: 0b11,
                        ..Ip::new(stranger, GW)
                    },
                    &inner,
                ),
            ),
            Verdict::Drop,
            Reason::PeerNotAllowed,
        ),
        (
            "truncated inner header",
            from_peer(&inner)[..14 + 20 + 12].to_vec(),
            Verdict::Drop,
            Reason::Truncated,
        ),
        ("non-IPv4 (ARP)", arp, Verdict::Pass, Reason::NotIpv4),
        (
            "host traffic to the gateway (SSH)",
            ethernet(
                ROUTER_MAC,
                GW_MAC,
                &ip_packet(Ip::new(SERVER, GW), L4::syn(50000, 22)),
            ),
            Verdict::Pass,
            Reason::NotOurs,
        ),
        (
            "reply to a flow that does not exist",
            ethernet(
                ROUTER_MAC,
                GW_MAC,
                &ip_packet(
                    Ip::new(SERVER, GW),
                    L4::Udp {
                        sport: 53,
                        dport: 20001,
                        payload: b"",
                    },
                ),
            ),
            Verdict::Pass,
            Reason::NotOurs,
        ),
    ]
}

fn rejected_frames_get_their_verdict_and_are_left_unchanged(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    for (what, frame, verdict, reason) in rejected() {
        let (v, out, r) = gw.run(&frame);
        assert_eq!((v, r), (verdict, reason), "{what}");
        assert_eq!(out, frame, "{what}: frame modified");
    }
    assert_eq!(gw.flow_entries(), 0, "a rejected frame created state");
}
