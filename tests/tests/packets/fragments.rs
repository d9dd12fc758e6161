//! IPv4 fragments of translated flows: the first fragment carries the ports
//! and is translated like a whole packet; the later ones follow it by
//! (source, destination, IP ID, protocol), in both directions. Outbound, a
//! later fragment without its first is translated by address alone.

use egress_common::{flow::DIR_OUT, fragment::FRAGMENT_TIMEOUT_NS};

use super::*;
use crate::frames::fragment;

for_each_hook!(
    fragments_of_udp_tcp_and_echo_are_translated_both_ways,
    later_fragments_before_their_first_are_translated_by_address,
    later_fragments_follow_their_first_only_for_the_reassembly_time,
    a_later_fragment_from_another_peer_is_translated_if_it_may_send_for_the_client,
    unsolicited_inbound_fragments_pass_and_create_nothing,
);

/// The IP header of a datagram a host fragments (DF clear).
fn fragmentable(src: [u8; 4], dst: [u8; 4]) -> Ip {
    Ip {
        df: false,
        ..Ip::new(src, dst)
    }
}

/// Sends the client's datagram `l4` cut at `cuts`, the fragments in
/// `order`, each with the reason it must be counted as; each must leave as
/// the same piece of the translated datagram. Returns the translated port
/// (or echo identifier).
fn outbound_fragments(gw: &mut Gateway, l4: L4, cuts: &[usize], order: &[(usize, Reason)]) -> u16 {
    let ip = fragmentable(CLIENT, SERVER);
    let pieces = fragment(&ip_packet(ip, l4), cuts);
    let outs: Vec<(usize, Vec<u8>)> = order
        .iter()
        .map(|&(i, want)| (i, outbound_packet(gw, &pieces[i], want)))
        .collect();
    let (_, out) = outs.iter().find(|(i, _)| *i == 0).expect("first sent");
    let at = 14
        + 20
        + if matches!(l4, L4::EchoRequest { .. }) {
            4
        } else {
            0
        };
    let port = u16::from_be_bytes([out[at], out[at + 1]]);
    let want = fragment(&ip_packet(translated_out(ip), l4.with_sport(port)), cuts);
    for (i, out) in outs {
        let want = ethernet(GW_MAC, ROUTER_MAC, &want[i]);
        assert_eq!(out, want, "fragment {i} of {}", pieces.len());
    }
    port
}

/// The `n` fragments of a new flow's datagram in order, with their reasons.
fn in_order(n: usize) -> Vec<(usize, Reason)> {
    (0..n)
        .map(|i| match i {
            0 => (i, Reason::NewFlow),
            _ => (i, Reason::Translated),
        })
        .collect()
}

/// Sends the server's datagram `l4` to the translation, cut at `cuts`;
/// each fragment must leave encapsulated to the peer as the same piece of
/// the client's datagram `client_l4`.
fn inbound_fragments(gw: &mut Gateway, l4: L4, cuts: &[usize], client_l4: L4) {
    let ip = reply_ip(SERVER);
    let pieces = fragment(&ip_packet(ip, l4), cuts);
    let wants = fragment(&ip_packet(translated_in(ip, CLIENT), client_l4), cuts);
    for (piece, want) in pieces.iter().zip(&wants) {
        inbound_packet(gw, piece, want);
    }
}

fn fragments_of_udp_tcp_and_echo_are_translated_both_ways(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    // UDP from a port outside the range, so the port changes: 3008 bytes
    // cut as a 1500-byte link would, in order.
    let query = L4::Udp {
        sport: 5353,
        dport: 53,
        payload: &data,
    };
    let port = outbound_fragments(gw, query, &[1480, 2960], &in_order(3));
    assert_ne!(port, 5353);
    let answer = &data[..2000];
    let reply = |dport| L4::Udp {
        sport: 53,
        dport,
        payload: answer,
    };
    inbound_fragments(gw, reply(port), &[1200], reply(5353));
    // Every fragment is counted in its flow, by IP length.
    let flows = gw.flows();
    let (_, out) = flows
        .iter()
        .find(|(k, _)| k.dir == DIR_OUT && k.sport == 5353u16.to_be_bytes())
        .unwrap();
    let inb = flows[&out.in_key()];
    assert_eq!((out.packets, out.bytes), (3, 3008 + 3 * 20));
    assert_eq!((inb.packets, inb.bytes), (2, 2008 + 2 * 20));

    // TCP: the first fragment holds the whole header; ports kept.
    let segment = L4::tcp(23456, 80, &data[..100]);
    let port = outbound_fragments(gw, segment, &[24], &in_order(2));
    assert_eq!(port, 23456);
    let reply = L4::tcp(80, 23456, &data[..100]);
    inbound_fragments(gw, reply, &[40, 64], reply);

    // ICMP echo: the first fragment is the 8-byte header alone.
    let id = outbound_fragments(gw, L4::EchoRequest { id: 7, seq: 1 }, &[8], &in_order(2));
    inbound_fragments(
        gw,
        L4::EchoReply { id, seq: 1 },
        &[8],
        L4::EchoReply { id: 7, seq: 1 },
    );
    assert_eq!(gw.fragment_entries(), 6, "one per first fragment");
}

fn later_fragments_before_their_first_are_translated_by_address(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let data = [0x5a; 3000];
    let l4 = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: &data,
    };
    // The last fragment first, then the first, then the middle one: each
    // leaves as its piece of the translated datagram.
    let port = outbound_fragments(
        gw,
        l4,
        &[1480, 2960],
        &[
            (2, Reason::FragmentAhead),
            (0, Reason::NewFlow),
            (1, Reason::Translated),
        ],
    );
    assert_eq!(port, 21000);
    // The one ahead of its first created nothing and is counted in no flow.
    assert_eq!((gw.flow_entries(), gw.fragment_entries()), (2, 1));
    let [out] = gw.outbound_flows()[..] else {
        panic!("one flow")
    };
    assert_eq!((out.packets, out.bytes), (2, 1500 + 1500));
}

fn later_fragments_follow_their_first_only_for_the_reassembly_time(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let data = [0xa5; 2000];
    let query = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: &data,
    };
    let cuts = [1480];
    outbound_fragments(gw, query, &cuts, &in_order(1));
    let reply = L4::Udp {
        sport: 53,
        dport: 21000,
        payload: &data,
    };
    inbound_fragments(gw, reply, &[1200], reply);
    gw.age_fragments(FRAGMENT_TIMEOUT_NS);

    // Outbound, the entry no longer serves: translated by address alone,
    // not counted in the flow.
    let late = fragment(&ip_packet(fragmentable(CLIENT, SERVER), query), &cuts);
    let [before] = gw.outbound_flows()[..] else {
        panic!("one flow")
    };
    outbound_packet(gw, &late[1], Reason::FragmentAhead);
    assert_eq!(gw.outbound_flows()[..], [before]);
    // Inbound, an unmatched later fragment may be the host's own: the
    // kernel gets it, the daemon a copy.
    let late = fragment(&ip_packet(reply_ip(SERVER), reply), &[1200]);
    let frame = ethernet(ROUTER_MAC, GW_MAC, &late[1]);
    let (verdict, out, reason) = gw.run(&frame);
    assert_eq!(
        (verdict, reason),
        (Verdict::Pass, Reason::FragmentUnmatched)
    );
    assert_eq!(out, frame);
    assert_eq!(gw.held_fragments(), [(GW, late[1].clone())]);
}

fn a_later_fragment_from_another_peer_is_translated_if_it_may_send_for_the_client(hook: Hook) {
    let gw = &mut Gateway::with(hook, |p| p.admission.peers.push(PEER2.into()));
    let data = [0x33; 2000];
    let l4 = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: &data,
    };
    let ip = fragmentable(CLIENT, SERVER);
    let pieces = fragment(&ip_packet(ip, l4), &[1480]);
    outbound_packet(gw, &pieces[0], Reason::NewFlow);
    let [flow] = gw.outbound_flows()[..] else {
        panic!("one flow")
    };
    let via_peer2 = ethernet(
        ROUTER_MAC,
        GW_MAC,
        &encapsulate(Ip::new(PEER2, GW), &pieces[1]),
    );
    // Another peer's fragment is not the flow's: translated by address,
    // it neither moves the flow nor is counted in it.
    let (verdict, out, reason) = gw.run(&via_peer2);
    assert_eq!((verdict, reason), (Verdict::Tx, Reason::FragmentAhead));
    let want = fragment(&ip_packet(translated_out(ip), l4), &[1480]);
    assert_eq!(out, ethernet(GW_MAC, ROUTER_MAC, &want[1]));
    assert_eq!(gw.outbound_flows()[..], [flow]);
    // A peer bound to other clients may not send for this one.
    gw.reconfigure(|p| {
        p.admission.peer_clients = [(PEER2.into(), vec!["10.0.2.0/24".parse().unwrap()])].into();
    });
    let (verdict, out, reason) = gw.run(&via_peer2);
    assert_eq!((verdict, reason), (Verdict::Drop, Reason::ClientNotAllowed));
    assert_eq!(out, via_peer2, "left as it was");
}

fn unsolicited_inbound_fragments_pass_and_create_nothing(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let data = [0x42; 2000];
    // To a translation port no flow has, or the host's own fragmented
    // traffic: the kernel's to reassemble. The later fragment may also be
    // ahead of a first that has a flow: the daemon gets a copy.
    let l4 = L4::Udp {
        sport: 53,
        dport: 20001,
        payload: &data,
    };
    let pieces = fragment(&ip_packet(reply_ip(SERVER), l4), &[1200]);
    for (piece, want) in pieces
        .iter()
        .zip([Reason::NotOurs, Reason::FragmentUnmatched])
    {
        let frame = ethernet(ROUTER_MAC, GW_MAC, piece);
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!((verdict, reason), (Verdict::Pass, want));
        assert_eq!(out, frame, "left as it was");
    }
    assert_eq!((gw.flow_entries(), gw.fragment_entries()), (0, 0));
    assert_eq!(gw.held_fragments(), [(GW, pieces[1].clone())]);
}
