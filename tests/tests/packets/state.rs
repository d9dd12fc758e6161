//! Connection state: TCP tracking, timeouts, endpoint-independent mapping,
//! port allocation under pressure, caps, races and restarts.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    os::fd::{FromRawFd as _, OwnedFd},
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, IterableMap as _, Map, MapData},
};

use egress_common::{
    flow::{DIR_IN, DIR_OUT, Flow},
    reason::Reason,
    tcp::{ACK, FIN, RST, SYN, TcpState},
};
use egress_user::{clock, gc, settings::PortRange};
use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};

use super::*;
use crate::icmp::assert_answered_through_tunnel;

for_each_hook!(
    tcp_state_follows_handshake_and_teardown_in_both_directions,
    a_reset_its_sender_talks_past_does_not_end_the_connection,
    simultaneous_open_passes_both_ways_and_establishes,
    replies_follow_a_moved_flow_at_once_on_its_cpu,
    unsolicited_inbound_packets_create_no_state,
    only_the_flows_own_remote_reaches_its_translation,
    packets_either_way_refresh_their_flow,
    mapping_is_endpoint_independent,
    udp_and_echo_mappings_are_endpoint_independent,
    a_pool_gives_each_client_one_address,
    exhausted_ports_refuse_new_flows_and_keep_old_ones,
    the_last_free_ports_of_a_range_are_found,
    a_full_table_refuses_new_flows_and_keeps_old_ones,
    a_client_at_its_cap_is_refused_and_others_are_not,
    sweeps_remove_exactly_the_flows_past_their_timeout,
    a_stopped_sweep_changes_nothing_and_the_next_one_sweeps,
    a_sweep_an_error_ends_counts_what_it_removed,
    flows_a_cut_short_sweep_half_removed_go_and_leave_the_client_count,
    a_busy_lone_half_goes_once_past_the_grace_period,
    a_sweep_removes_the_flows_of_an_address_no_longer_ours,
    a_sweep_removes_the_flows_of_clients_and_peers_no_longer_allowed,
    a_flow_follows_its_client_to_another_peer,
    a_peer_bound_to_other_clients_can_neither_use_nor_take_their_flows,
    a_table_too_large_for_the_kernel_is_refused_with_a_clear_error,
    a_return_tuple_held_by_another_clients_flow_is_never_shared,
    restart_keeps_flows_and_reset_clears_them,
    first_packets_racing_on_two_cpus_make_one_flow_each,
);

/// A second Internet host, routed like the first.
const SERVER2: [u8; 4] = [198, 51, 100, 20];
/// A second translation address.
const GW2: [u8; 4] = [10, 1, 1, 11];

fn udp(sport: u16) -> L4<'static> {
    L4::Udp {
        sport,
        dport: 53,
        payload: b"q",
    }
}

/// The one flow's outbound and return halves.
pub fn halves(gw: &mut Gateway) -> (Flow, Flow) {
    let flows = gw.flows();
    assert_eq!(flows.len(), 2, "one flow, two halves");
    let out = *flows.iter().find(|(k, _)| k.dir == DIR_OUT).unwrap().1;
    (out, flows[&out.in_key()])
}

pub fn tcp_state(gw: &mut Gateway) -> TcpState {
    let (out, inb) = halves(gw);
    TcpState::of(out.tcp_flags, inb.tcp_flags)
}

/// The client's segment with `flags` on the tests' TCP connection,
/// counted as `want`.
fn out(gw: &mut Gateway, flags: u8, want: Reason) {
    outbound(gw, CLIENT, L4::segment(23456, 80, flags, b""), want);
}

/// The server's segment with `flags` on the tests' TCP connection.
fn back(gw: &mut Gateway, flags: u8) {
    let l4 = L4::segment(80, 23456, flags, b"");
    inbound(gw, l4, CLIENT, l4);
}

fn tcp_state_follows_handshake_and_teardown_in_both_directions(hook: Hook) {
    let mut gw = Gateway::new(hook);
    out(&mut gw, SYN, Reason::NewFlow);
    assert_eq!(tcp_state(&mut gw), TcpState::SynSent);
    back(&mut gw, SYN | ACK);
    assert_eq!(tcp_state(&mut gw), TcpState::SynReceived);
    out(&mut gw, ACK, Reason::Translated);
    assert_eq!(tcp_state(&mut gw), TcpState::Established);

    // Round trips from the handshake: Internet leg SYN → SYN-ACK, tunnel
    // leg SYN-ACK → ACK, each on the nanosecond clock.
    let (o, i) = halves(&mut gw);
    assert!(o.handshake_ns > 0 && i.handshake_ns > o.handshake_ns);
    assert_eq!(i.rtt_ns, i.handshake_ns - o.handshake_ns);
    assert!(o.rtt_ns > 0, "tunnel leg measured");

    out(&mut gw, FIN | ACK, Reason::Translated);
    assert_eq!(tcp_state(&mut gw), TcpState::Closing);
    back(&mut gw, FIN | ACK);
    assert_eq!(tcp_state(&mut gw), TcpState::Closed);
    // The same 5-tuple opens a new connection: both records start again.
    out(&mut gw, SYN, Reason::Translated);
    assert_eq!(tcp_state(&mut gw), TcpState::SynSent);
    assert_eq!(halves(&mut gw).1.handshake_ns, 0);
    back(&mut gw, RST | ACK);
    assert_eq!(tcp_state(&mut gw), TcpState::Reset);
}

/// A RST whose sender goes on sending was ignored by its receiver (out of
/// window, RFC 5961): the connection is established again, not left to a
/// reset's 10 s timeout. After a RST its sender keeps to, it stays reset
/// whatever the other side still sends.
fn a_reset_its_sender_talks_past_does_not_end_the_connection(hook: Hook) {
    let mut gw = Gateway::new(hook);
    out(&mut gw, SYN, Reason::NewFlow);
    back(&mut gw, SYN | ACK);
    out(&mut gw, ACK, Reason::Translated);
    back(&mut gw, RST);
    assert_eq!(tcp_state(&mut gw), TcpState::Reset);
    back(&mut gw, ACK);
    assert_eq!(tcp_state(&mut gw), TcpState::Established);

    out(&mut gw, RST | ACK, Reason::Translated);
    back(&mut gw, ACK);
    assert_eq!(tcp_state(&mut gw), TcpState::Reset);
}

/// RFC 5382 REQ-2: both ends send a SYN before either answers. The
/// server's bare SYN to the client's flow is translated like any reply, and
/// the crossed SYN-ACKs establish the connection.
fn simultaneous_open_passes_both_ways_and_establishes(hook: Hook) {
    let mut gw = Gateway::new(hook);
    out(&mut gw, SYN, Reason::NewFlow);
    back(&mut gw, SYN);
    assert_eq!(tcp_state(&mut gw), TcpState::SynReceived);
    out(&mut gw, SYN | ACK, Reason::Translated);
    back(&mut gw, SYN | ACK);
    assert_eq!(tcp_state(&mut gw), TcpState::Established);
    assert_eq!(gw.flow_entries(), 2, "one flow");
}

fn unsolicited_inbound_packets_create_no_state(hook: Hook) {
    let mut gw = Gateway::new(hook);
    for l4 in [
        L4::syn(80, 20005),
        udp(20005),
        L4::EchoReply { id: 20005, seq: 1 },
    ] {
        let frame = ethernet(ROUTER_MAC, GW_MAC, &ip_packet(Ip::new(SERVER, GW), l4));
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!((verdict, reason), (Verdict::Pass, Reason::NotOurs));
        assert_eq!(out, frame);
    }
    assert_eq!(gw.flow_entries(), 0);
    assert!(gw.mappings().is_empty());
}

/// RFC 4787 REQ-8, as the gateway filters (address and port dependent):
/// while a client's flow lives, a packet to its translation address and
/// port from another port of its server, or from another host, is not
/// translated: the host's stack gets it untouched, and no flow is made.
fn only_the_flows_own_remote_reaches_its_translation(hook: Hook) {
    let mut gw = Gateway::new(hook);
    let port = outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    let reply = |sport| udp(21000).reply_to(port).with_sport(sport);
    inbound(&mut gw, reply(53), CLIENT, udp(21000).reply_to(21000));
    for (remote, sport) in [(SERVER, 54), (SERVER2, 53)] {
        let frame = ethernet(
            ROUTER_MAC,
            GW_MAC,
            &ip_packet(Ip::new(remote, GW), reply(sport)),
        );
        let (verdict, out, reason) = gw.run(&frame);
        assert_eq!(
            (verdict, reason),
            (Verdict::Pass, Reason::NotOurs),
            "from {remote:?}:{sport}"
        );
        assert_eq!(out, frame);
    }
    assert_eq!(gw.flow_entries(), 2, "the one flow");
}

/// RFC 4787 REQ-6 and 6a: a flow's packets refresh it, outbound and return
/// ones alike. A UDP flow last seen 4 minutes ago (its timeout is 5) gets
/// one packet, one way: it lives on until 5 minutes after that packet.
fn packets_either_way_refresh_their_flow(hook: Hook) {
    for outbound_refreshes in [true, false] {
        let mut gw = Gateway::new(hook);
        let port = outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
        let (reply, to_client) = (udp(21000).reply_to(port), udp(21000).reply_to(21000));
        inbound(&mut gw, reply, CLIENT, to_client);
        let aged = clock::monotonic_ns() - 240 * 1_000_000_000;
        let (mut out, mut inb) = halves(&mut gw);
        (out.last_seen_ns, inb.last_seen_ns) = (aged, aged);
        let mut state = gw.state();
        state.flows.insert(&out.out_key(), &out, 0).unwrap();
        state.flows.insert(&inb.in_key(), &inb, 0).unwrap();
        // Past a tick, whatever the kernel's HZ: a CPU's flow cache serves
        // a flow's packets within a tick without its table entry.
        std::thread::sleep(std::time::Duration::from_millis(50));
        if outbound_refreshes {
            outbound(&mut gw, CLIENT, udp(21000), Reason::Translated);
        } else {
            inbound(&mut gw, reply, CLIENT, to_client);
        }
        let sent = clock::monotonic_ns();
        let way = if outbound_refreshes {
            "outbound"
        } else {
            "return"
        };
        gw.sweep(sent + 120 * 1_000_000_000);
        assert_eq!(gw.flow_entries(), 2, "2 min after the {way} packet");
        gw.sweep(sent + 301 * 1_000_000_000);
        assert_eq!(gw.flow_entries(), 0, "5 min after the {way} packet");
    }
}

fn mapping_is_endpoint_independent(hook: Hook) {
    let mut gw = Gateway::new(hook);
    // 40000 is outside the translation range: the mapping picks a port.
    let to = |dport| L4::syn(40000, dport);
    let port = outbound_to(&mut gw, CLIENT, SERVER, to(80), Reason::NewFlow);
    assert_ne!(port, 40000);
    assert_eq!(
        outbound_to(&mut gw, CLIENT, SERVER2, to(443), Reason::NewFlow),
        port,
        "a second destination sees the same translated port"
    );
    let reply = |sport, dport| L4::tcp(sport, dport, b"x");
    inbound_from(
        &mut gw,
        SERVER2,
        reply(443, port),
        CLIENT,
        reply(443, 40000),
    );
    inbound_from(&mut gw, SERVER, reply(80, port), CLIENT, reply(80, 40000));
    assert_eq!(gw.flow_entries(), 4);
    assert_eq!(
        gw.mappings().len(),
        2,
        "one mapping: client and reservation side"
    );
}

/// RFC 4787 REQ-1 and RFC 5508 REQ-1a (echo identifiers): a client's
/// second destination sees the translation its first did.
fn udp_and_echo_mappings_are_endpoint_independent(hook: Hook) {
    let mut gw = Gateway::new(hook);
    // Port and identifier outside the translation range: the mapping
    // picks them.
    let query = L4::Udp {
        sport: 40000,
        dport: 53,
        payload: b"q",
    };
    let ping = L4::EchoRequest { id: 40001, seq: 1 };
    for l4 in [query, ping] {
        let nat = outbound_to(&mut gw, CLIENT, SERVER, l4, Reason::NewFlow);
        assert_ne!(nat, l4.sport());
        assert_eq!(
            outbound_to(&mut gw, CLIENT, SERVER2, l4, Reason::NewFlow),
            nat,
            "a second destination sees the same translation"
        );
        for remote in [SERVER2, SERVER] {
            inbound_from(
                &mut gw,
                remote,
                l4.reply_to(nat),
                CLIENT,
                l4.reply_to(l4.sport()),
            );
        }
    }
    assert_eq!(gw.flow_entries(), 8);
}

/// RFC 4787 REQ-2 (paired pooling): with two translation addresses, every
/// flow of a client, TCP, UDP and echo alike, leaves from one of them, the
/// clients spread over both, and replies to either reach their client.
fn a_pool_gives_each_client_one_address(hook: Hook) {
    let mut gw = Gateway::with(hook, |p| p.snat.push(GW2.into()));
    let mut used = HashSet::new();
    for host in 1..=8 {
        let client = [10, 0, 3, host];
        let mut addrs = HashSet::new();
        for l4 in [
            L4::syn(30000, 80),
            udp(30001),
            L4::EchoRequest { id: 30002, seq: 1 },
        ] {
            let ip = Ip::new(client, SERVER);
            let out = outbound_packet(&mut gw, &ip_packet(ip, l4), Reason::NewFlow);
            let parsed = etherparse::SlicedPacket::from_ethernet(&out).unwrap();
            let Some(etherparse::NetSlice::Ipv4(v4)) = parsed.net else {
                panic!("not IPv4: {out:?}")
            };
            let addr = v4.header().source();
            let port = match parsed.transport.unwrap() {
                etherparse::TransportSlice::Tcp(t) => t.source_port(),
                etherparse::TransportSlice::Udp(u) => u.source_port(),
                etherparse::TransportSlice::Icmpv4(i) => match i.icmp_type() {
                    Icmpv4Type::EchoRequest(e) => e.id,
                    t => panic!("{t:?}"),
                },
                t => panic!("{t:?}"),
            };
            let translated = Ip {
                src: addr,
                ..translated_out(ip)
            };
            let want = ip_packet(translated, l4.with_sport(port));
            assert_eq!(out, ethernet(GW_MAC, ROUTER_MAC, &want), "{client:?}");
            addrs.insert(addr);

            let reply = Ip {
                df: false,
                ..Ip::new(SERVER, addr)
            };
            let inner = ip_packet(translated_in(reply, client), l4.reply_to(l4.sport()));
            inbound_packet(&mut gw, &ip_packet(reply, l4.reply_to(port)), &inner);
        }
        assert_eq!(addrs.len(), 1, "{client:?} used {addrs:?}");
        used.extend(addrs);
    }
    assert_eq!(used, HashSet::from([GW, GW2]), "8 clients on one address");
}

/// Asserts that `frame`, refused, came back as ICMP destination
/// unreachable, administratively prohibited, to `client` through the tunnel.
fn assert_refused(gw: &mut Gateway, client: [u8; 4], l4: L4, want: Reason) {
    let inner = ip_packet(Ip::new(client, SERVER), l4);
    let prohibited = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FilterProhibited);
    assert_answered_through_tunnel(gw, &inner, prohibited, want);
}

fn exhausted_ports_refuse_new_flows_and_keep_old_ones(hook: Hook) {
    let mut gw = Gateway::with(hook, |p| {
        p.ports = PortRange {
            min: 20000,
            max: 20001,
        }
    });
    assert_eq!(
        outbound(&mut gw, CLIENT, udp(20000), Reason::NewFlow),
        20000
    );
    assert_eq!(
        outbound(&mut gw, CLIENT2, udp(20001), Reason::NewFlow),
        20001
    );
    assert_refused(&mut gw, CLIENT, udp(20001), Reason::PortsExhausted);
    assert_eq!(
        outbound(&mut gw, CLIENT, udp(20000), Reason::Translated),
        20000
    );
    assert_eq!(
        outbound(&mut gw, CLIENT2, udp(20001), Reason::Translated),
        20001
    );
    // Another protocol has its own ports.
    let echo = L4::EchoRequest { id: 9, seq: 1 };
    outbound(&mut gw, CLIENT, echo, Reason::NewFlow);
    assert_eq!(gw.flow_entries(), 6);
}

/// A range of 256 ports, as many as a new flow tries: with all but two in
/// use, two new flows still get those two (16 candidates would both find
/// them about one time in 300), and only once every port is in use is a
/// flow refused.
fn the_last_free_ports_of_a_range_are_found(hook: Hook) {
    let (min, max) = (20000, 20255);
    let mut gw = Gateway::with(hook, |p| p.ports = PortRange { min, max });
    let free = [20077, 20201];
    // Each takes its own port (kept, as it lies in the range).
    for port in (min..=max).filter(|p| !free.contains(p)) {
        assert_eq!(outbound(&mut gw, CLIENT, udp(port), Reason::NewFlow), port);
    }
    // Their own ports are in use: they walk the range to the free ones.
    let clients = [CLIENT2, [10, 0, 2, 3]];
    let got = clients.map(|c| outbound(&mut gw, c, udp(min), Reason::NewFlow));
    assert_eq!(HashSet::from(got), HashSet::from(free));
    assert_refused(&mut gw, CLIENT2, udp(min + 1), Reason::PortsExhausted);
    assert_eq!(
        outbound(&mut gw, clients[1], udp(min), Reason::Translated),
        got[1]
    );
}

fn a_full_table_refuses_new_flows_and_keeps_old_ones(hook: Hook) {
    let mut gw = Gateway::with(hook, |p| p.max_flows = 2);
    outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    outbound(&mut gw, CLIENT2, udp(21000), Reason::NewFlow);
    assert_refused(&mut gw, CLIENT, udp(21001), Reason::TableFull);
    outbound(&mut gw, CLIENT, udp(21000), Reason::Translated);
    outbound(&mut gw, CLIENT2, udp(21000), Reason::Translated);
    assert_eq!(gw.flow_entries(), 4);
}

fn a_client_at_its_cap_is_refused_and_others_are_not(hook: Hook) {
    let mut gw = Gateway::with(hook, |p| p.max_client_flows = 2);
    outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    outbound_to(&mut gw, CLIENT, SERVER2, udp(21000), Reason::NewFlow);
    assert_refused(&mut gw, CLIENT, udp(21001), Reason::ClientLimit);
    outbound(&mut gw, CLIENT, udp(21000), Reason::Translated);
    outbound(&mut gw, CLIENT2, udp(21000), Reason::NewFlow);
    assert_eq!((gw.client_flows(CLIENT), gw.client_flows(CLIENT2)), (2, 1));
}

fn sweeps_remove_exactly_the_flows_past_their_timeout(hook: Hook) {
    let mut gw = Gateway::new(hook);
    let syn = |port| L4::syn(port, 80);
    // Established TCP (21000), handshake only (21001), reset (21002).
    outbound(&mut gw, CLIENT, syn(21000), Reason::NewFlow);
    let reply = L4::segment(80, 21000, SYN | ACK, b"");
    inbound(&mut gw, reply, CLIENT, reply);
    outbound(&mut gw, CLIENT, L4::tcp(21000, 80, b""), Reason::Translated);
    outbound(&mut gw, CLIENT, syn(21001), Reason::NewFlow);
    outbound(&mut gw, CLIENT, syn(21002), Reason::NewFlow);
    let rst = L4::segment(80, 21002, RST | ACK, b"");
    inbound(&mut gw, rst, CLIENT, rst);
    outbound(&mut gw, CLIENT, udp(21003), Reason::NewFlow);
    let echo = L4::EchoRequest { id: 21004, seq: 1 };
    outbound(&mut gw, CLIENT, echo, Reason::NewFlow);

    let now = clock::monotonic_ns();
    let live_ports = |gw: &mut Gateway| -> HashSet<u16> {
        gw.outbound_flows()
            .iter()
            .map(|f| u16::from_be_bytes(f.client_port))
            .collect()
    };
    // (seconds idle, client ports still live): reset 10 s, ICMP 60 s,
    // transitory 4 min, UDP 5 min, established 2 h 4 min.
    for (secs, live) in [
        (0, &[21000, 21001, 21002, 21003, 21004][..]),
        (11, &[21000, 21001, 21003, 21004]),
        (61, &[21000, 21001, 21003]),
        (241, &[21000, 21003]),
        (301, &[21000]),
        (7439, &[21000]),
        (7441, &[]),
    ] {
        let sweep = gw.sweep(now + secs * 1_000_000_000);
        assert_eq!(
            live_ports(&mut gw),
            live.iter().copied().collect(),
            "after {secs} s"
        );
        assert_eq!(sweep.live, live.len());
        assert_eq!(
            gw.client_flows(CLIENT),
            live.len() as u64,
            "client count after {secs} s"
        );
    }
    assert_eq!(gw.flow_entries(), 0);
    assert!(
        gw.mappings().is_empty(),
        "unused mappings expire with their flows"
    );
}

fn a_stopped_sweep_changes_nothing_and_the_next_one_sweeps(hook: Hook) {
    let mut gw = Gateway::new(hook);
    outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    outbound(&mut gw, CLIENT, udp(21001), Reason::NewFlow);
    let (flows, mappings) = (gw.flows(), gw.mappings());
    // Past the UDP timeout: a whole sweep would remove everything.
    let later = clock::monotonic_ns() + 301 * 1_000_000_000;
    let stop = gc::Stop::default();
    stop.request();
    let stopped = gc::sweep(
        &mut gw.state(),
        &gc::Timeouts::default(),
        &gw.allowed(),
        later,
        &stop,
    );
    assert!(
        stopped.is_err(),
        "a stopped sweep reports it did not finish"
    );
    assert_eq!(gw.flows(), flows);
    assert_eq!(gw.mappings(), mappings);
    assert_eq!(gw.client_flows(CLIENT), 2);

    let sweep = gw.sweep(later);
    assert_eq!((sweep.expired, sweep.mappings_expired), (2, 2));
    assert_eq!(gw.flow_entries(), 0);
    assert!(gw.mappings().is_empty());
    assert_eq!(gw.client_flows(CLIENT), 0);
}

/// A sweep that an error ends part way reports what it removed until
/// then: here every expired flow goes, then the kernel refuses to delete
/// their mappings (EPERM: the sweep's handle on the mapping table is
/// read-only). The flows count, the mappings do not; the next sweep
/// removes and counts those.
fn a_sweep_an_error_ends_counts_what_it_removed(hook: Hook) {
    let mut gw = Gateway::new(hook);
    outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    outbound(&mut gw, CLIENT, udp(21001), Reason::NewFlow);
    let mappings = gw.mappings();
    // Past the UDP timeout: a whole sweep would remove everything.
    let later = clock::monotonic_ns() + 301 * 1_000_000_000;
    let mut state = gw.state();
    state.mappings = read_only(&state.mappings);
    let swept = gc::sweep(
        &mut state,
        &gc::Timeouts::default(),
        &gw.allowed(),
        later,
        &gc::Stop::default(),
    );
    let Err(unfinished) = swept else {
        panic!("the sweep deleted through a read-only handle: {swept:?}");
    };
    let errno = unfinished
        .error
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::raw_os_error);
    assert_eq!(errno, Some(libc::EPERM), "{:#}", unfinished.error);
    let s = unfinished.sweep;
    assert_eq!((s.expired, s.mappings_expired), (2, 0), "{s:?}");
    assert_eq!(gw.flow_entries(), 0);
    assert_eq!(gw.mappings(), mappings);
    assert_eq!(gw.client_flows(CLIENT), 0);

    let sweep = gw.sweep(later);
    assert_eq!((sweep.expired, sweep.mappings_expired), (0, 2));
    assert!(gw.mappings().is_empty());
}

/// A handle on `map` opened read-only (`BPF_F_RDONLY`): the kernel refuses
/// any change through it.
fn read_only<K: Pod, V: Pod>(map: &BpfHashMap<MapData, K, V>) -> BpfHashMap<MapData, K, V> {
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_F_RDONLY: u32 = 1 << 3;
    /// The `BPF_*_GET_FD_BY_ID` member of `union bpf_attr`.
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = GetFdById {
        id: map.map().info().unwrap().id(),
        next_id: 0,
        open_flags: BPF_F_RDONLY,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_FD_BY_ID,
            &mut attr as *mut GetFdById,
            size_of::<GetFdById>(),
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    BpfHashMap::try_from(Map::HashMap(MapData::from_fd(fd).unwrap())).unwrap()
}

/// A sweep stopped between deleting return halves and outbound halves
/// leaves outbound halves alone; the next sweep removes them, their
/// mappings, and their count.
fn flows_a_cut_short_sweep_half_removed_go_and_leave_the_client_count(hook: Hook) {
    let mut gw = Gateway::new(hook);
    outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    outbound(&mut gw, CLIENT, udp(21001), Reason::NewFlow);
    let cut = gw
        .outbound_flows()
        .into_iter()
        .find(|f| f.client_port == 21001u16.to_be_bytes())
        .unwrap();
    gw.state().flows.remove(&cut.in_key()).unwrap();

    // Idle past the grace period, within the UDP timeout.
    let sweep = gw.sweep(clock::monotonic_ns() + 11 * 1_000_000_000);
    assert_eq!((sweep.live, sweep.mappings_expired), (1, 1));
    let left = gw.outbound_flows();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].client_port, 21000u16.to_be_bytes());
    assert_eq!(gw.flow_entries(), 2);
    assert_eq!(
        gw.mappings().len(),
        2,
        "the live flow's mapping, both sides"
    );
    assert_eq!(gw.client_flows(CLIENT), 1);
}

/// A lone outbound half its client keeps using still goes once past the
/// grace period: it would translate requests whose replies match nothing.
fn a_busy_lone_half_goes_once_past_the_grace_period(hook: Hook) {
    let mut gw = Gateway::new(hook);
    outbound(&mut gw, CLIENT, udp(21001), Reason::NewFlow);
    let mut cut = gw.outbound_flows()[0];
    gw.state().flows.remove(&cut.in_key()).unwrap();

    // Past the grace period since it was created, and just used.
    let later = cut.created_ns + 11 * 1_000_000_000;
    cut.last_seen_ns = later;
    gw.state().flows.insert(&cut.out_key(), &cut, 0).unwrap();
    gw.sweep(later);
    assert_eq!(gw.flow_entries(), 0);
    assert!(gw.mappings().is_empty());
    assert_eq!(gw.client_flows(CLIENT), 0);
}

/// A translation address the gateway no longer has (restarted with another
/// `snat`, or its address changed): its flows and mappings go at the next
/// sweep, as MASQUERADE forgets its connections when its address goes, and
/// the client's next packet makes a flow on the new address.
fn a_sweep_removes_the_flows_of_an_address_no_longer_ours(hook: Hook) {
    const NEW_SNAT: [u8; 4] = [10, 1, 1, 20];
    let mut gw = Gateway::new(hook);
    let query = from_peer(&ip_packet(Ip::new(CLIENT, SERVER), udp(21000)));
    outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    gw.reconfigure(|p| p.snat = vec![NEW_SNAT.into()]);
    // Until the sweep, the data path keeps to a known flow's translation.
    assert_eq!(gw.run(&query).2, Reason::Translated);

    let sweep = gw.sweep(clock::monotonic_ns());
    assert_eq!((sweep.disallowed, sweep.live), (1, 0));
    assert_eq!(gw.flow_entries(), 0);
    assert!(gw.mappings().is_empty());
    assert_eq!(gw.client_flows(CLIENT), 0);
    // Past a tick: no flow cache serves the old flow.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(gw.run(&query).2, Reason::NewFlow);
    assert_eq!(gw.outbound_flows()[0].nat_addr, NEW_SNAT);
}

/// A client range or a peer the gateway no longer allows: their flows and
/// the mappings of those clients go at the next sweep, the rest stay.
fn a_sweep_removes_the_flows_of_clients_and_peers_no_longer_allowed(hook: Hook) {
    let mut gw = Gateway::with(hook, |p| p.admission.peers.push(PEER2.into()));
    outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    outbound(&mut gw, CLIENT2, udp(21000), Reason::NewFlow);
    let inner = ip_packet(Ip::new(CLIENT, SERVER), udp(21001));
    let via_peer2 = ethernet(ROUTER_MAC, GW_MAC, &encapsulate(Ip::new(PEER2, GW), &inner));
    assert_eq!(gw.run(&via_peer2).2, Reason::NewFlow);
    // CLIENT2 is in 10.0.0.0/16, CLIENT in the other range.
    gw.reconfigure(|p| {
        p.admission.peers = vec![PEER.into()];
        p.admission
            .client_cidrs
            .retain(|net| !net.contains(&Ipv4Addr::from(CLIENT2)));
    });

    let sweep = gw.sweep(clock::monotonic_ns());
    assert_eq!((sweep.disallowed, sweep.live), (2, 1));
    let left = gw.outbound_flows();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].client_port, left[0].peer_addr),
        (21000u16.to_be_bytes(), PEER)
    );
    assert_eq!(gw.flow_entries(), 2);
    assert_eq!(gw.client_flows(CLIENT2), 0);
    let clients: HashSet<[u8; 4]> = gw
        .mappings()
        .iter()
        .map(|(k, m)| if k.dir == DIR_OUT { k.addr } else { m.addr })
        .collect();
    assert_eq!(clients, HashSet::from([CLIENT]), "mappings' clients");
}

/// A UDP flow of the client through PEER, PEER2 allowed too: the gateway,
/// a reply to the flow, and the client's IP packet (to tunnel through
/// either peer).
fn failover_flow(hook: Hook) -> (Gateway, Vec<u8>, Vec<u8>) {
    let mut gw = Gateway::with(hook, |p| p.admission.peers.push(PEER2.into()));
    let port = outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    let reply = L4::Udp {
        sport: 53,
        dport: port,
        payload: b"a",
    };
    let reply = ethernet(ROUTER_MAC, GW_MAC, &ip_packet(reply_ip(SERVER), reply));
    let inner = ip_packet(Ip::new(CLIENT, SERVER), udp(21000));
    (gw, reply, inner)
}

/// Where the (encapsulated) frame `out` is tunnelled to: its outer
/// destination, as an independent parser reads it.
fn outer_destination(out: &[u8]) -> [u8; 4] {
    match etherparse::SlicedPacket::from_ethernet(out).unwrap().net {
        Some(etherparse::NetSlice::Ipv4(ip)) => ip.header().destination(),
        net => panic!("{net:?}"),
    }
}

/// A client whose packets come through another allowed peer (its tunnel
/// failed over): the flow follows, so replies go back that way.
fn a_flow_follows_its_client_to_another_peer(hook: Hook) {
    let (gw, reply, inner) = &mut failover_flow(hook);
    let tunnelled_to = |gw: &mut Gateway| {
        let (_, out, reason) = gw.run(reply);
        assert_eq!(reason, Reason::ReverseHit);
        outer_destination(&out)
    };
    assert_eq!(tunnelled_to(gw), PEER);

    let via_peer2 = ethernet(ROUTER_MAC, GW_MAC, &encapsulate(Ip::new(PEER2, GW), inner));
    assert_eq!(gw.run(&via_peer2).2, Reason::PeerMoved);
    assert_eq!(gw.run(&via_peer2).2, Reason::Translated, "moved once");
    let (out, inb) = halves(gw);
    assert_eq!((out.peer_addr, inb.peer_addr), (PEER2, PEER2));
    // Past a tick: another CPU's cache may hold the old peer until then.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(tunnelled_to(gw), PEER2);
}

/// PEER2 bound to a /24 of CLIENT2's /16: a packet of CLIENT's through it (a
/// hostile or misrouted peer) is dropped, whether it would start a flow or
/// take over CLIENT's flow through PEER, whose replies still go to PEER;
/// so is one from the /16 outside the /24. Binding PEER to the /24 too
/// retires CLIENT's flow at the next sweep.
fn a_peer_bound_to_other_clients_can_neither_use_nor_take_their_flows(hook: Hook) {
    let (gw, reply, inner) = &mut failover_flow(hook);
    gw.reconfigure(|p| {
        p.admission.peer_clients = [(PEER2.into(), vec!["10.0.2.0/24".parse().unwrap()])].into();
    });
    let via_peer2 =
        |inner: &[u8]| ethernet(ROUTER_MAC, GW_MAC, &encapsulate(Ip::new(PEER2, GW), inner));
    let (verdict, _, reason) = gw.run(&via_peer2(inner));
    assert_eq!((verdict, reason), (Verdict::Drop, Reason::ClientNotAllowed));
    let another = ip_packet(Ip::new(CLIENT, SERVER), udp(21001));
    assert_eq!(gw.run(&via_peer2(&another)).2, Reason::ClientNotAllowed);
    let (out, inb) = halves(gw);
    assert_eq!((out.peer_addr, inb.peer_addr), (PEER, PEER));
    assert_eq!(gw.outbound_flows().len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (_, out, reason) = gw.run(reply);
    assert_eq!(reason, Reason::ReverseHit);
    assert_eq!(outer_destination(&out), PEER);
    let beside = ip_packet(Ip::new([10, 0, 3, 3], SERVER), udp(21000));
    assert_eq!(gw.run(&via_peer2(&beside)).2, Reason::ClientNotAllowed);
    // Its own clients it serves.
    let own = ip_packet(Ip::new(CLIENT2, SERVER), udp(21000));
    assert_eq!(gw.run(&via_peer2(&own)).2, Reason::NewFlow);

    gw.reconfigure(|p| {
        p.admission
            .peer_clients
            .insert(PEER.into(), vec!["10.0.2.0/24".parse().unwrap()]);
    });
    let sweep = gw.sweep(clock::monotonic_ns());
    assert_eq!((sweep.disallowed, sweep.live), (1, 1));
    assert_eq!(gw.outbound_flows()[0].client_addr, CLIENT2);
}

/// On the CPU that saw the client come through another peer, replies go
/// there at once, not after the cache's tick.
fn replies_follow_a_moved_flow_at_once_on_its_cpu(hook: Hook) {
    let (gw, reply, inner) = &mut failover_flow(hook);
    let via = |peer| ethernet(ROUTER_MAC, GW_MAC, &encapsulate(Ip::new(peer, GW), inner));
    // Each round within a tick or two: a reply cached, the client through
    // the other peer, a reply.
    for (from, to) in [(PEER, PEER2), (PEER2, PEER)].repeat(10) {
        let frames = [reply.clone(), via(to), reply.clone()];
        let outs = gw.outputs_on_cpu(0, &frames);
        assert_eq!(
            Ipv4Addr::from(outer_destination(&outs[0])),
            Ipv4Addr::from(from)
        );
        assert_eq!(
            Ipv4Addr::from(outer_destination(&outs[2])),
            Ipv4Addr::from(to),
            "a reply went to the old peer"
        );
    }
}

fn a_table_too_large_for_the_kernel_is_refused_with_a_clear_error(hook: Hook) {
    let gw = Gateway::new(hook);
    let e = gw
        .try_load(|p| {
            p.max_flows = u32::MAX / 2;
            p.reset_state = true;
        })
        .err()
        .expect("a flow table of 2^31 flows loaded");
    assert!(format!("{e:#}").contains("lower --max-flows"), "{e:#}");
}

/// Should a client's mapping go while its flow lives (a sweep racing the
/// mapping's reuse), its port can be handed to another client; a flow of
/// that client to the same remote would share the first flow's return
/// tuple. It is refused: the replies stay the first client's.
fn a_return_tuple_held_by_another_clients_flow_is_never_shared(hook: Hook) {
    let mut gw = Gateway::new(hook);
    // 21000 is in the range: both clients' ports are preserved.
    let port = outbound(&mut gw, CLIENT, udp(21000), Reason::NewFlow);
    assert_eq!(port, 21000);
    for key in gw.mappings().into_keys() {
        gw.state().mappings.remove(&key).unwrap();
    }
    let (verdict, _, reason) = gw.run(&from_peer(&ip_packet(Ip::new(CLIENT2, SERVER), udp(21000))));
    assert_eq!((verdict, reason), (Verdict::Drop, Reason::Internal));
    assert_eq!(gw.outbound_flows().len(), 1);
    let reply = |dport| L4::Udp {
        sport: 53,
        dport,
        payload: b"a",
    };
    inbound(&mut gw, reply(port), CLIENT, reply(21000));
}

fn restart_keeps_flows_and_reset_clears_them(hook: Hook) {
    let mut gw = Gateway::new(hook);
    let port = outbound(&mut gw, CLIENT, udp(5353), Reason::NewFlow);
    gw.restart(false);
    assert_eq!(
        outbound(&mut gw, CLIENT, udp(5353), Reason::Translated),
        port
    );
    let reply = |dport| L4::Udp {
        sport: 53,
        dport,
        payload: b"a",
    };
    inbound(&mut gw, reply(port), CLIENT, reply(5353));
    gw.restart(true);
    assert_eq!(gw.flow_entries(), 0);
    outbound(&mut gw, CLIENT, udp(5353), Reason::NewFlow);
}

fn first_packets_racing_on_two_cpus_make_one_flow_each(hook: Hook) {
    let mut gw = Gateway::new(hook);
    // Client ports inside the range: both CPUs try to preserve the same port.
    let ports = 21000..21200u16;
    let frames: Vec<Vec<u8>> = ports
        .clone()
        .map(|p| from_peer(&ip_packet(Ip::new(CLIENT, SERVER), udp(p))))
        .collect();
    gw.race(&frames);

    let flows = gw.flows();
    let outs: Vec<&Flow> = flows
        .iter()
        .filter(|(k, _)| k.dir == DIR_OUT)
        .map(|(_, f)| f)
        .collect();
    assert_eq!(outs.len(), ports.len());
    assert_eq!(flows.len(), 2 * ports.len(), "no half left alone");
    let mut nat_ports = HashSet::new();
    for out in &outs {
        let inb = &flows[&out.in_key()];
        assert_eq!(
            out.in_key(),
            inb.in_key(),
            "halves agree on the translation"
        );
        assert!(nat_ports.insert(out.nat_port), "translated port used twice");
    }
    let mappings = gw.mappings();
    assert_eq!(
        mappings.len(),
        2 * ports.len(),
        "one mapping per client port"
    );
    for (key, m) in &mappings {
        let twin = mappings
            .iter()
            .find(|(k, _)| k.dir != key.dir && k.addr == m.addr && k.port == m.port)
            .expect("each mapping entry has its twin");
        assert_eq!((twin.1.addr, twin.1.port), (key.addr, key.port));
        assert!(key.dir == DIR_OUT || key.dir == DIR_IN);
    }
    assert_eq!(
        gw.client_flows(CLIENT),
        ports.len() as u64,
        "each flow counted once"
    );
}
