//! The outer IP ID of what the gateway tunnels to a peer: 0 with DF (an
//! atomic datagram), else the next of the peer's counter, so that the IDs
//! the peer reassembles fragments by come round only after 65,536 packets
//! (RFC 6864 section 4.1), whichever flow, CPU or program sends them.

use std::collections::HashSet;

use egress_common::{ip_id::ip_id_bucket, reason::Reason};
use etherparse::{Icmpv4Type, Ipv4HeaderSlice, icmpv4::TimeExceededCode};

use super::*;
use crate::icmp::assert_answered_through_tunnel;

for_each_hook!(
    what_goes_to_a_peer_without_df_takes_the_next_id_of_its_counter,
    each_peer_has_a_counter_of_its_own,
    the_counters_go_on_across_a_restart,
    two_cpus_at_once_never_take_the_same_id,
);

/// A client's UDP flow as the gateway translated it.
#[derive(Clone, Copy)]
struct Flow {
    client: [u8; 4],
    port: u16,
    nat_port: u16,
    peer: [u8; 4],
}

fn query(sport: u16) -> L4<'static> {
    L4::Udp {
        sport,
        dport: 53,
        payload: b"q",
    }
}

fn answer(dport: u16) -> L4<'static> {
    L4::Udp {
        sport: 53,
        dport,
        payload: b"a",
    }
}

/// Starts a flow of `client` from `port`, tunnelled through `peer`.
fn flow(gw: &mut Gateway, client: [u8; 4], port: u16, peer: [u8; 4]) -> Flow {
    let inner = ip_packet(Ip::new(client, SERVER), query(port));
    let frame = ethernet(ROUTER_MAC, GW_MAC, &encapsulate(Ip::new(peer, GW), &inner));
    let (verdict, out, reason) = gw.run(&frame);
    assert_eq!((verdict, reason), (Verdict::Tx, Reason::NewFlow));
    let nat_port = u16::from_be_bytes([out[34], out[35]]);
    Flow {
        client,
        port,
        nat_port,
        peer,
    }
}

/// The server's IP packet answering `flow`, with DF or not.
fn reply(flow: Flow, df: bool) -> Vec<u8> {
    let ip = Ip {
        df,
        ..reply_ip(SERVER)
    };
    ip_packet(ip, answer(flow.nat_port))
}

/// Sends the server's answer to `flow`; asserts it reaches the flow's peer
/// as it should (with DF, with outer ID 0), and returns its outer ID.
fn reply_id(gw: &mut Gateway, flow: Flow, df: bool) -> u16 {
    let ip = Ip {
        df,
        ..reply_ip(SERVER)
    };
    let inner = ip_packet(translated_in(ip, flow.client), answer(flow.port));
    outer_id(&inbound_packet_to(gw, &reply(flow, df), &inner, flow.peer))
}

fn outer_id(frame: &[u8]) -> u16 {
    Ipv4HeaderSlice::from_slice(&frame[14..])
        .unwrap()
        .identification()
}

/// Asserts that `ids` follow each other, from wherever the first is.
fn assert_consecutive(ids: &[u16]) {
    let want: Vec<u16> = (0..ids.len() as u16)
        .map(|i| ids[0].wrapping_add(i))
        .collect();
    assert_eq!(ids, want, "consecutive outer IDs");
}

/// Replies of two flows to one peer, with and without DF: every one
/// without DF takes the next ID, and one with DF takes 0 and leaves the
/// counter as it was. An error the gateway itself answers a client with
/// through the tunnel takes none (under 100 bytes, it is never fragmented;
/// see `icmp::rewrite`).
fn what_goes_to_a_peer_without_df_takes_the_next_id_of_its_counter(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let a = flow(gw, CLIENT, 21000, PEER);
    let b = flow(gw, CLIENT2, 21001, PEER);
    let mut ids = Vec::new();
    for (flow, df) in [
        (a, false),
        (b, false),
        (a, true),
        (b, false),
        (b, true),
        (a, false),
        (a, false),
    ] {
        let id = reply_id(gw, flow, df);
        if !df {
            ids.push(id);
        }
    }
    let expiring = ip_packet(
        Ip {
            ttl: 1,
            ..Ip::new(CLIENT, SERVER)
        },
        query(21000),
    );
    let exceeded = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
    assert_answered_through_tunnel(gw, &expiring, exceeded, Reason::TtlExceeded);
    ids.push(reply_id(gw, b, false));
    assert_consecutive(&ids);
}

/// Replies to two peers, interleaved: each peer's IDs follow each other,
/// whatever went to the other in between. Both counters start somewhere
/// random (both at 0 by chance: once in 2^32 runs).
fn each_peer_has_a_counter_of_its_own(hook: Hook) {
    assert_ne!(
        ip_id_bucket(PEER),
        ip_id_bucket(PEER2),
        "the test's peers share a counter"
    );
    let gw = &mut Gateway::with(hook, |p| p.admission.peers.push(PEER2.into()));
    let a = flow(gw, CLIENT, 21000, PEER);
    let b = flow(gw, CLIENT2, 21000, PEER2);
    let (mut to_a, mut to_b) = (Vec::new(), Vec::new());
    for flow in [a, b, b, a, b, a, a, b] {
        let id = reply_id(gw, flow, false);
        if flow.peer == PEER {
            &mut to_a
        } else {
            &mut to_b
        }
        .push(id);
    }
    assert_consecutive(&to_a);
    assert_consecutive(&to_b);
    assert_ne!((to_a[0], to_b[0]), (0, 0), "counters not set at random");
}

/// A gateway loaded again on its pinned state (a restart, or a reload's
/// new image while the old one still runs) counts on from where the last
/// one was, never from somewhere that may repeat the IDs just sent.
fn the_counters_go_on_across_a_restart(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let a = flow(gw, CLIENT, 21000, PEER);
    let before = reply_id(gw, a, false);
    gw.restart(false);
    assert_consecutive(&[before, reply_id(gw, a, false), reply_id(gw, a, false)]);
}

/// One flow's replies on two CPUs at once: every one gets an ID of its own,
/// and together they are one run of consecutive IDs.
fn two_cpus_at_once_never_take_the_same_id(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let a = flow(gw, CLIENT, 21000, PEER);
    let frames = vec![ethernet(ROUTER_MAC, GW_MAC, &reply(a, false)); 2000];
    let [first, second] = gw.race(&frames);
    let ids: HashSet<u16> = first
        .iter()
        .chain(&second)
        .map(|out| {
            assert_eq!(out[14 + 16..14 + 20], PEER, "tunnelled to the peer");
            outer_id(out)
        })
        .collect();
    assert_eq!(ids.len(), 2 * frames.len(), "an ID taken twice");
    let start = *ids
        .iter()
        .find(|&&id| !ids.contains(&id.wrapping_sub(1)))
        .unwrap();
    for i in 0..ids.len() as u16 {
        assert!(ids.contains(&start.wrapping_add(i)), "not one run");
    }
}
