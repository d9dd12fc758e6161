//! IPv4 fragments of translated flows: the first fragment carries the ports
//! and is translated like a whole packet; the later ones follow it by
//! (source, destination, IP ID, protocol), in both directions.

use egress_common::{flow::DIR_OUT, fragment::FRAGMENT_TIMEOUT_NS};

use super::*;
use crate::frames::fragment;

for_each_hook!(
    fragments_of_udp_tcp_and_echo_are_translated_both_ways,
    a_later_fragment_before_its_first_is_dropped_and_counted,
    later_fragments_follow_their_first_only_for_the_reassembly_time,
    a_later_fragment_from_another_peer_is_unmatched,
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
/// `order`; each must leave as the same piece of the translated datagram.
/// The first fragment is counted as `first`. Returns the translated port
/// (or echo identifier).
fn outbound_fragments(
    gw: &mut Gateway,
    l4: L4,
    cuts: &[usize],
    order: &[usize],
    first: Reason,
) -> u16 {
    let ip = fragmentable(CLIENT, SERVER);
    let pieces = fragment(&ip_packet(ip, l4), cuts);
    let outs: Vec<(usize, Vec<u8>)> = order
        .iter()
        .map(|&i| {
            let want = if i == 0 { first } else { Reason::Translated };
            (i, outbound_packet(gw, &pieces[i], want))
        })
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
    let port = outbound_fragments(gw, query, &[1480, 2960], &[0, 1, 2], Reason::NewFlow);
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
    let port = outbound_fragments(gw, segment, &[24], &[0, 1], Reason::NewFlow);
    assert_eq!(port, 23456);
    let reply = L4::tcp(80, 23456, &data[..100]);
    inbound_fragments(gw, reply, &[40, 64], reply);

    // ICMP echo: the first fragment is the 8-byte header alone.
    let id = outbound_fragments(
        gw,
        L4::EchoRequest { id: 7, seq: 1 },
        &[8],
        &[0, 1],
        Reason::NewFlow,
    );
    inbound_fragments(
        gw,
        L4::EchoReply { id, seq: 1 },
        &[8],
        L4::EchoReply { id: 7, seq: 1 },
    );
    assert_eq!(gw.fragment_entries(), 6, "one per first fragment");
}

fn a_later_fragment_before_its_first_is_dropped_and_counted(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let data = [0x5a; 3000];
    let l4 = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: &data,
    };
    let cuts = [1480, 2960];
    let pieces = fragment(&ip_packet(fragmentable(CLIENT, SERVER), l4), &cuts);
    let frame = from_peer(&pieces[2]);
    let (verdict, out, reason) = gw.run(&frame);
    assert_eq!(
        (verdict, reason),
        (Verdict::Drop, Reason::FragmentUnmatched)
    );
    assert_eq!(out, frame, "left as it was");
    assert_eq!((gw.flow_entries(), gw.fragment_entries()), (0, 0));
    // Once the first has passed, the rest follow in any order.
    outbound_fragments(gw, l4, &cuts, &[0, 2, 1], Reason::NewFlow);
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
    outbound_fragments(gw, query, &cuts, &[0], Reason::NewFlow);
    let reply = L4::Udp {
        sport: 53,
        dport: 21000,
        payload: &data,
    };
    inbound_fragments(gw, reply, &[1200], reply);
    gw.age_fragments(FRAGMENT_TIMEOUT_NS);

    let late = fragment(&ip_packet(fragmentable(CLIENT, SERVER), query), &cuts);
    let (verdict, _, reason) = gw.run(&from_peer(&late[1]));
    assert_eq!(
        (verdict, reason),
        (Verdict::Drop, Reason::FragmentUnmatched)
    );
    // Inbound, an unmatched later fragment may be the host's own.
    let late = fragment(&ip_packet(reply_ip(SERVER), reply), &[1200]);
    let frame = ethernet(ROUTER_MAC, GW_MAC, &late[1]);
    let (verdict, out, reason) = gw.run(&frame);
    assert_eq!((verdict, reason), (Verdict::Pass, Reason::NotOurs));
    assert_eq!(out, frame);
}

fn a_later_fragment_from_another_peer_is_unmatched(hook: Hook) {
    let gw = &mut Gateway::with(hook, |p| p.admission.peers.push(PEER2.into()));
    let data = [0x33; 2000];
    let l4 = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: &data,
    };
    let pieces = fragment(&ip_packet(fragmentable(CLIENT, SERVER), l4), &[1480]);
    outbound_packet(gw, &pieces[0], Reason::NewFlow);
    let other = ethernet(
        ROUTER_MAC,
        GW_MAC,
        &encapsulate(Ip::new(PEER2, GW), &pieces[1]),
    );
    let (verdict, _, reason) = gw.run(&other);
    assert_eq!(
        (verdict, reason),
        (Verdict::Drop, Reason::FragmentUnmatched)
    );
}

fn unsolicited_inbound_fragments_pass_and_create_nothing(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let data = [0x42; 2000];
    // To a translation port no flow has, or the host's own fragmented
    // traffic: the kernel's to reassemble.
    let l4 = L4::Udp {
        sport: 53,
        dport: 20001,
        payload: &data,
    };
    for piece in fragment(&ip_packet(reply_ip(SERVER), l4), &[1200]) {
        let frame = ethernet(ROUTER_MAC, GW_MAC, &piece);
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!((verdict, reason), (Verdict::Pass, Reason::NotOurs));
        assert_eq!(out, frame, "left as it was");
    }
    assert_eq!((gw.flow_entries(), gw.fragment_entries()), (0, 0));
}
