//! The per-CPU flow cache in front of the flow table: every packet counted
//! wherever it was counted, a segment that changes the flow's record never
//! served from it, a flow the daemon removes not served from it once a
//! tick has passed, the counts held in the cache kept by a restart and
//! those of an earlier version's cache by an upgrade.

use std::{collections::HashMap, time::Duration};

use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use egress_common::{
    flow::{DIR_OUT, FlowKey, IPPROTO_UDP},
    flow_cache::{CACHE_SLOTS, CachedFlow, slot},
    reason::Reason,
    tcp::{ACK, FIN, RST, SYN, TcpState},
};
use egress_user::inspect::Pinned;

use super::*;
use crate::state::{halves, tcp_state};

for_each_hook!(
    every_packet_is_counted_cached_or_not,
    packets_cached_on_each_cpu_are_all_counted,
    flows_that_share_a_slot_keep_their_counts,
    a_segment_that_changes_the_record_is_never_served_from_the_cache,
    a_flow_removed_from_the_table_is_not_served_once_a_tick_passed,
    a_restart_keeps_the_counts_held_in_the_cache,
    an_upgrade_keeps_the_counts_of_an_earlier_per_cpu_cache,
);

/// IP length of every datagram below.
const LEN: u64 = 20 + 8 + 10;

fn udp(sport: u16, dport: u16) -> L4<'static> {
    L4::Udp {
        sport,
        dport,
        payload: b"0123456789",
    }
}

/// The client's datagram from `sport` to the server's port 53, from the peer.
fn query(sport: u16) -> Vec<u8> {
    from_peer(&ip_packet(Ip::new(CLIENT, SERVER), udp(sport, 53)))
}

/// The server's reply to translation port `nat_port`.
fn reply(nat_port: u16) -> Vec<u8> {
    ethernet(
        ROUTER_MAC,
        GW_MAC,
        &ip_packet(reply_ip(SERVER), udp(53, nat_port)),
    )
}

fn every_packet_is_counted_cached_or_not(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let port = outbound(gw, CLIENT, udp(21000, 53), Reason::NewFlow);
    let mut frames = vec![query(21000); 20];
    frames.extend(vec![reply(port); 10]);
    assert_eq!(
        gw.on_cpu(0, &frames),
        HashMap::from([(Reason::Translated, 20), (Reason::ReverseHit, 10)])
    );
    let (out, inb) = halves(gw);
    assert_eq!((out.packets, out.bytes), (21, 21 * LEN));
    assert_eq!((inb.packets, inb.bytes), (10, 10 * LEN));
    // The cache served packets: the table entry alone has not counted them
    // all (only a tick's first packet of a flow goes to the table, and 20
    // back to back span a tick or two).
    let table = gw.state().flows.get(&out.out_key(), 0).unwrap();
    assert!(table.packets < 21, "{} packets in the table", table.packets);
}

fn packets_cached_on_each_cpu_are_all_counted(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let port = outbound(gw, CLIENT, udp(21000, 53), Reason::NewFlow);
    // Each CPU has a slot of its own for the flow; readers add them all.
    // (On a host with one CPU, both rounds meet the same slot.)
    let last = std::thread::available_parallelism().unwrap().get() - 1;
    for cpu in [0, last] {
        gw.on_cpu(cpu, &vec![query(21000); 10]);
        gw.on_cpu(cpu, &vec![reply(port); 5]);
    }
    let (out, inb) = halves(gw);
    assert_eq!((out.packets, out.bytes), (21, 21 * LEN));
    assert_eq!((inb.packets, inb.bytes), (10, 10 * LEN));
}

fn flows_that_share_a_slot_keep_their_counts(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let key = |sport: u16| FlowKey {
        src: CLIENT,
        dst: SERVER,
        sport: sport.to_be_bytes(),
        dport: 53u16.to_be_bytes(),
        proto: IPPROTO_UDP,
        dir: DIR_OUT,
        _pad: [0; 2],
    };
    let a = 21000;
    let b = (a + 1..).find(|&p| slot(&key(p)) == slot(&key(a))).unwrap();
    outbound(gw, CLIENT, udp(a, 53), Reason::NewFlow);
    outbound(gw, CLIENT, udp(b, 53), Reason::NewFlow);
    // Each switch takes the slot from the other flow, whose counts move to
    // its table entry.
    let frames: Vec<_> = [a, a, b, a, b, b, b, a].map(query).into();
    assert_eq!(
        gw.on_cpu(0, &frames),
        HashMap::from([(Reason::Translated, 8)])
    );
    let flows = gw.flows();
    let packets = |port: u16| (flows[&key(port)].packets, flows[&key(port)].bytes);
    assert_eq!(packets(a), (5, 5 * LEN));
    assert_eq!(packets(b), (5, 5 * LEN));
}

fn a_segment_that_changes_the_record_is_never_served_from_the_cache(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let out = |flags| {
        from_peer(&ip_packet(
            Ip::new(CLIENT, SERVER),
            L4::segment(23456, 80, flags, b""),
        ))
    };
    let back = |flags| {
        let segment = L4::segment(80, 23456, flags, b"");
        ethernet(ROUTER_MAC, GW_MAC, &ip_packet(reply_ip(SERVER), segment))
    };
    gw.on_cpu(0, &[out(SYN), back(SYN | ACK)]);
    // The client's first ACK, acknowledgements the flow has seen (served
    // from the cache), then its FIN.
    gw.on_cpu(0, &[out(ACK), out(ACK), out(ACK), out(ACK), out(FIN | ACK)]);
    assert_eq!(tcp_state(gw), TcpState::Closing);
    gw.on_cpu(0, &[back(ACK), back(ACK), back(ACK), back(RST)]);
    assert_eq!(tcp_state(gw), TcpState::Reset);
    let (o, i) = halves(gw);
    assert_eq!((o.packets, i.packets), (6, 5));
    assert!(
        o.rtt_ns > 0,
        "the tunnel leg measured on the client's first ACK"
    );
}

fn a_flow_removed_from_the_table_is_not_served_once_a_tick_passed(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let port = outbound(gw, CLIENT, udp(21000, 53), Reason::NewFlow);
    let served = HashMap::from([(Reason::Translated, 1), (Reason::ReverseHit, 1)]);
    assert_eq!(gw.on_cpu(0, &[query(21000), reply(port)]), served);
    // The daemon removes the flow (its mapping stays, as in a sweep's
    // grace period).
    let (out, inb) = halves(gw);
    let mut state = gw.state();
    state.flows.remove(&out.out_key()).unwrap();
    state.flows.remove(&inb.in_key()).unwrap();
    // Past a tick, whatever the kernel's HZ.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        gw.on_cpu(0, &[reply(port), query(21000)]),
        HashMap::from([(Reason::NotOurs, 1), (Reason::NewFlow, 1)])
    );
}

fn a_restart_keeps_the_counts_held_in_the_cache(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let port = outbound(gw, CLIENT, udp(21000, 53), Reason::NewFlow);
    let mut frames = vec![query(21000); 20];
    frames.extend(vec![reply(port); 10]);
    gw.on_cpu(0, &frames);
    // Some of them counted in the cache alone (see above).
    let (out, _) = halves(gw);
    let table = gw.state().flows.get(&out.out_key(), 0).unwrap();
    assert!(table.packets < 21, "{} packets in the table", table.packets);

    // The restarted data path takes this version's cache over as it is.
    gw.restart(false);
    let (out, inb) = halves(gw);
    assert_eq!((out.packets, out.bytes), (21, 21 * LEN));
    assert_eq!((inb.packets, inb.bytes), (10, 10 * LEN));
}

fn an_upgrade_keeps_the_counts_of_an_earlier_per_cpu_cache(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let port = outbound(gw, CLIENT, udp(21000, 53), Reason::NewFlow);
    let (out, inb) = halves(gw);
    assert_eq!((out.packets, inb.packets), (1, 0));
    // The state as a version before e1cadbb leaves it: the cache a
    // per-CPU array whose slots hold packets of both halves, on every CPU,
    // that the table has not counted, and a slot of a flow the table no
    // longer has.
    let cpus = nr_cpus().unwrap().get() as u64;
    let gone = FlowKey {
        sport: 21001u16.to_be_bytes(),
        ..out.out_key()
    };
    let mut old = PerCpuArray::<MapData, CachedFlow>::create(CACHE_SLOTS, 0).unwrap();
    for (flow, key, packets) in [
        (out, out.out_key(), 7),
        (inb, inb.in_key(), 3),
        (out, gone, 100),
    ] {
        let cached = CachedFlow {
            flow,
            key,
            tick: 0,
            packets,
            bytes: packets * LEN,
        };
        let on_each = PerCpuValues::try_from(vec![cached; cpus as usize]).unwrap();
        old.set(slot(&key), on_each, 0).unwrap();
    }
    let pin = gw.state_dir().join("FLOW_CACHE");
    std::fs::remove_file(&pin).unwrap();
    old.pin(&pin).unwrap();
    // The new binary's `egress flows` before the daemon restarts: the
    // table's counts, without the old cache's.
    let (conns, _) = Pinned::open(gw.state_dir()).unwrap().flows().unwrap();
    let listed: Vec<_> = conns
        .iter()
        .map(|c| (c.out.packets, c.inb.packets))
        .collect();
    assert_eq!(listed, [(1, 0)]);

    gw.restart(false);
    let (out, inb) = halves(gw);
    let out_packets = 1 + 7 * cpus;
    assert_eq!((out.packets, out.bytes), (out_packets, out_packets * LEN));
    assert_eq!((inb.packets, inb.bytes), (3 * cpus, 3 * cpus * LEN));
    // The new cache serves and counts the flow.
    let frames: Vec<_> = (0..5).flat_map(|_| [query(21000), reply(port)]).collect();
    assert_eq!(
        gw.on_cpu(0, &frames),
        HashMap::from([(Reason::Translated, 5), (Reason::ReverseHit, 5)])
    );
    let (out, inb) = halves(gw);
    assert_eq!((out.packets, inb.packets), (out_packets + 5, 3 * cpus + 5));
}
