//! Malformed and hostile input: every kind of broken frame gets a defined
//! verdict and the reason counter that names what is wrong with it, in both
//! directions, and is left as it came; oddities that are not errors
//! (transport checksums, UDP surplus, Ethernet padding) are translated.

use etherparse::{
    Icmpv4Type,
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
};

use super::*;
use crate::frames::{add_to_checksum, fix_ipv4_checksum, icmp_error};

for_each_hook!(
    malformed_outbound_frames_are_dropped_with_their_reason,
    malformed_return_frames_get_their_verdict,
    wrong_transport_checksums_are_translated_and_stay_wrong,
    udp_surplus_and_ethernet_padding_are_carried_along,
    bytes_after_an_icmp_error_are_not_its_quote,
);

/// Where the headers of a frame from the peer start.
const OUTER: usize = 14;
const INNER: usize = 34;
/// Transport header of a frame from the peer.
const L4_OUT: usize = 54;
/// IP and transport header of a return frame.
const IP_RET: usize = 14;
const L4_RET: usize = 34;
/// Offsets in an IPv4 header.
const TOT_LEN: usize = 2;
const FRAGS: usize = 6;
const PROTO: usize = 9;
const CHECK: usize = 10;

fn set_u16(frame: &mut [u8], at: usize, v: u16) {
    frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get_u16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// Adds `n` to the IPv4 total length at `ip`.
fn grow_len(frame: &mut [u8], ip: usize, n: i32) {
    let len = i32::from(get_u16(frame, ip + TOT_LEN)) + n;
    set_u16(frame, ip + TOT_LEN, len as u16);
}

/// `frame` changed by `edit`, with the IPv4 header checksums at `fix`
/// recomputed afterwards (so only the edit is wrong with it).
fn edited(frame: &[u8], fix: &[usize], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = frame.to_vec();
    edit(&mut f);
    for &at in fix {
        fix_ipv4_checksum(&mut f, at);
    }
    f
}

/// Four bytes of IP options (NOPs) inserted after the IPv4 header at `ip`,
/// with its IHL and total length grown to match.
fn with_options(f: &mut Vec<u8>, ip: usize) {
    f.splice(ip + 20..ip + 20, [1, 1, 1, 1]);
    f[ip] = 0x46;
    grow_len(f, ip, 4);
}

const ANSWER: &[u8] = b"answer";

fn malformed_outbound_frames_are_dropped_with_their_reason(hook: Hook) {
    let ip = Ip::new(CLIENT, SERVER);
    let tcp = from_peer(&ip_packet(ip, L4::syn(23456, 80)));
    let udp = from_peer(&ip_packet(
        ip,
        L4::Udp {
            sport: 21000,
            dport: 53,
            payload: b"query",
        },
    ));
    let both = &[OUTER, INNER];
    let drop = |what, frame, reason| (what, frame, Verdict::Drop, reason);
    let mut cases = vec![
        drop(
            "frame ends inside the TCP header",
            tcp[..L4_OUT + 10].to_vec(),
            Reason::BadLength,
        ),
        drop(
            "IP lengths leave no room for the TCP header",
            edited(&tcp[..L4_OUT + 10], both, |f| {
                grow_len(f, OUTER, -10);
                grow_len(f, INNER, -10);
            }),
            Reason::Truncated,
        ),
        drop(
            "outer IHL 4",
            edited(&tcp, &[OUTER], |f| f[OUTER] = 0x44),
            Reason::BadHeader,
        ),
        drop(
            "outer version 6",
            edited(&tcp, &[OUTER], |f| f[OUTER] = 0x65),
            Reason::BadHeader,
        ),
        drop(
            "outer header with options",
            edited(&tcp, &[OUTER], |f| with_options(f, OUTER)),
            Reason::BadOuter,
        ),
        drop(
            "outer ECN CE over an inner packet that is not ECN-capable",
            edited(&tcp, &[OUTER], |f| f[OUTER + 1] = 0b11),
            Reason::BadOuter,
        ),
        drop(
            "outer header is a first fragment",
            edited(&tcp, &[OUTER], |f| f[OUTER + FRAGS] |= 0x20),
            Reason::BadOuter,
        ),
        drop(
            "outer header is a later fragment",
            edited(&tcp, &[OUTER], |f| f[OUTER + FRAGS + 1] = 8),
            Reason::BadOuter,
        ),
        drop(
            "outer checksum wrong",
            edited(&tcp, &[], |f| f[OUTER + CHECK + 1] ^= 1),
            Reason::BadChecksum,
        ),
        drop(
            "outer TTL changed, checksum not",
            edited(&tcp, &[], |f| f[OUTER + 8] -= 1),
            Reason::BadChecksum,
        ),
        drop(
            "outer length beyond the frame",
            edited(&tcp, &[OUTER], |f| grow_len(f, OUTER, 1)),
            Reason::BadLength,
        ),
        drop(
            "outer length short of two IPv4 headers",
            edited(&tcp, &[OUTER], |f| set_u16(f, OUTER + TOT_LEN, 39)),
            Reason::BadLength,
        ),
        drop(
            "inner IPv6",
            edited(&tcp, &[], |f| f[INNER] = 0x60),
            Reason::InnerNotIpv4,
        ),
        drop(
            "inner IHL 4",
            edited(&tcp, &[INNER], |f| f[INNER] = 0x44),
            Reason::BadHeader,
        ),
        drop(
            "inner header with options",
            edited(&tcp, both, |f| {
                with_options(f, INNER);
                grow_len(f, OUTER, 4);
            }),
            Reason::InnerOptions,
        ),
        drop(
            "inner checksum wrong",
            edited(&tcp, &[], |f| f[INNER + CHECK] ^= 0x80),
            Reason::BadChecksum,
        ),
        drop(
            "inner length one short of the outer's",
            edited(&tcp, &[INNER], |f| grow_len(f, INNER, -1)),
            Reason::BadLength,
        ),
        drop(
            "inner length beyond the outer's",
            edited(&tcp, &[INNER], |f| grow_len(f, INNER, 1)),
            Reason::BadLength,
        ),
        drop(
            "nested IP-in-IP",
            from_peer(&encapsulate(ip, &ip_packet(ip, L4::syn(23456, 80)))),
            Reason::NestedTunnel,
        ),
        drop(
            "UDP length 0",
            edited(&udp, &[], |f| set_u16(f, L4_OUT + 4, 0)),
            Reason::BadLength,
        ),
        drop(
            "UDP length 7",
            edited(&udp, &[], |f| set_u16(f, L4_OUT + 4, 7)),
            Reason::BadLength,
        ),
        drop(
            "UDP length beyond the IP packet",
            edited(&udp, &[], |f| set_u16(f, L4_OUT + 4, 8 + 5 + 1)),
            Reason::BadLength,
        ),
        drop(
            "TCP header length 16",
            edited(&tcp, &[], |f| f[L4_OUT + 12] = 0x40),
            Reason::BadLength,
        ),
        drop(
            "TCP header length beyond the segment",
            edited(&tcp, &[], |f| f[L4_OUT + 12] = 0x60),
            Reason::BadLength,
        ),
        drop(
            "inner protocol GRE",
            edited(&udp, &[INNER], |f| f[INNER + PROTO] = 47),
            Reason::Unsupported,
        ),
        drop(
            "ICMP timestamp request",
            edited(
                &from_peer(&ip_packet(ip, L4::EchoRequest { id: 7, seq: 1 })),
                &[],
                |f| f[L4_OUT] = 13,
            ),
            Reason::Unsupported,
        ),
        drop(
            "ICMP error with no room for the quoted IP header and 8 bytes",
            from_peer(&icmp_error(
                Ip::new(CLIENT, SERVER),
                Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
                &ip_packet(Ip::new(SERVER, CLIENT), L4::syn(80, 23456))[..24],
            )),
            Reason::Truncated,
        ),
    ];
    // BPF_PROG_TEST_RUN refuses to make an skb of an IPv4 frame shorter
    // than an IPv4 header, so only XDP can be shown one.
    if hook == Hook::Xdp {
        cases.push(drop(
            "frame ends inside the outer IPv4 header",
            tcp[..OUTER + 12].to_vec(),
            Reason::Truncated,
        ));
    }
    let gw = &mut Gateway::new(hook);
    let query = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: b"query",
    };
    outbound(gw, CLIENT, query, Reason::NewFlow);
    let answer = ip_packet(Ip::new(SERVER, CLIENT), query.reply_to(21000));
    let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let mut error = icmp_error(Ip::new(CLIENT, SERVER), kind, &answer);
    add_to_checksum(&mut error, 20 + 2, 1);
    cases.push(drop(
        "ICMP error about a flow with a wrong ICMP checksum",
        from_peer(&error),
        Reason::BadChecksum,
    ));
    assert_cases(gw, cases);
}

fn malformed_return_frames_get_their_verdict(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let port = outbound(
        gw,
        CLIENT,
        L4::Udp {
            sport: 5353,
            dport: 53,
            payload: b"q",
        },
        Reason::NewFlow,
    );
    outbound(gw, CLIENT, L4::syn(23456, 80), Reason::NewFlow);
    let reply = |l4| ethernet(ROUTER_MAC, GW_MAC, &ip_packet(Ip::new(SERVER, GW), l4));
    let udp = reply(L4::Udp {
        sport: 53,
        dport: port,
        payload: ANSWER,
    });
    let tcp = reply(L4::tcp(80, 23456, b""));
    // A time exceeded about a datagram sent from translation port `port`,
    // its ICMP checksum off by one.
    let wrong_error = |port| {
        let udp = L4::Udp {
            sport: port,
            dport: 53,
            payload: b"q",
        };
        let sent = ip_packet(Ip::new(GW, SERVER), udp);
        let kind = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
        let mut error = icmp_error(Ip::new(ROUTER, GW), kind, &sent);
        add_to_checksum(&mut error, 20 + 2, 1);
        ethernet(ROUTER_MAC, GW_MAC, &error)
    };
    let ip = &[IP_RET];
    let drop = |what, frame, reason| (what, frame, Verdict::Drop, reason);
    let pass = |what, frame| (what, frame, Verdict::Pass, Reason::NotOurs);
    let cases = vec![
        drop(
            "frame ends inside the UDP header",
            udp[..L4_RET + 6].to_vec(),
            Reason::BadLength,
        ),
        drop(
            "IP length leaves no room for the UDP header",
            edited(&udp[..L4_RET + 6], ip, |f| grow_len(f, IP_RET, -8)),
            Reason::Truncated,
        ),
        drop(
            "IP length leaves no room for the UDP header (padded frame)",
            edited(&udp, ip, |f| set_u16(f, IP_RET + TOT_LEN, 20 + 6)),
            Reason::Truncated,
        ),
        drop(
            "IHL 4",
            edited(&udp, ip, |f| f[IP_RET] = 0x44),
            Reason::BadHeader,
        ),
        drop(
            "version 5",
            edited(&udp, ip, |f| f[IP_RET] = 0x55),
            Reason::BadHeader,
        ),
        // Options and fragments are the kernel's to judge: the host's own
        // traffic shares the address.
        pass(
            "header with options",
            edited(&udp, ip, |f| with_options(f, IP_RET)),
        ),
        (
            "later fragment without state",
            edited(&udp, ip, |f| f[IP_RET + FRAGS + 1] = 185),
            Verdict::Pass,
            Reason::FragmentUnmatched,
        ),
        drop(
            "checksum wrong",
            edited(&udp, &[], |f| f[IP_RET + CHECK] ^= 0x10),
            Reason::BadChecksum,
        ),
        drop(
            "length beyond the frame",
            edited(&udp, ip, |f| grow_len(f, IP_RET, 1)),
            Reason::BadLength,
        ),
        drop(
            "length short of the IPv4 header",
            edited(&udp, ip, |f| set_u16(f, IP_RET + TOT_LEN, 19)),
            Reason::BadLength,
        ),
        drop(
            "UDP length 0",
            edited(&udp, &[], |f| set_u16(f, L4_RET + 4, 0)),
            Reason::BadLength,
        ),
        drop(
            "UDP length beyond the IP packet",
            edited(&udp, &[], |f| {
                set_u16(f, L4_RET + 4, 8 + ANSWER.len() as u16 + 1)
            }),
            Reason::BadLength,
        ),
        drop(
            "TCP header length 8",
            edited(&tcp, &[], |f| f[L4_RET + 12] = 0x20),
            Reason::BadLength,
        ),
        drop(
            "TCP header length beyond the segment",
            edited(&tcp, &[], |f| f[L4_RET + 12] = 0xf0),
            Reason::BadLength,
        ),
        drop(
            "ICMP error about a flow with a wrong ICMP checksum",
            wrong_error(port),
            Reason::BadChecksum,
        ),
        // The kernel checks the errors about its own traffic.
        pass(
            "ICMP error about no flow with a wrong ICMP checksum",
            wrong_error(port + 1),
        ),
    ];
    assert_cases(gw, cases);
}

fn wrong_transport_checksums_are_translated_and_stay_wrong(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let ip = Ip::new(CLIENT, SERVER);
    let syn = L4::syn(23456, 80);
    // Transport checksums are not verified: the translation changes them
    // incrementally, which keeps an error exactly as it was, so the
    // receiver discards the segment as it would have without us.
    let tcp_check = L4_OUT + 16;
    let mut frame = from_peer(&ip_packet(ip, syn));
    add_to_checksum(&mut frame, tcp_check, 1);
    let (verdict, out, reason) = gw.run(&frame);
    assert_eq!((verdict, reason), (Verdict::Tx, Reason::NewFlow));
    let translated = Ip {
        src: GW,
        ttl: ip.ttl - 1,
        ..ip
    };
    let mut want = ethernet(GW_MAC, ROUTER_MAC, &ip_packet(translated, syn));
    add_to_checksum(&mut want, tcp_check - 20, 1);
    assert_eq!(out, want, "the same error after translation");

    let mut reply = ethernet(
        ROUTER_MAC,
        GW_MAC,
        &ip_packet(Ip::new(SERVER, GW), L4::tcp(80, 23456, b"x")),
    );
    add_to_checksum(&mut reply, L4_RET + 16, 0x1234);
    let (verdict, out, reason) = gw.run(&reply);
    assert_eq!((verdict, reason), (Verdict::Tx, Reason::ReverseHit));
    let back = Ip {
        dst: CLIENT,
        ttl: 63,
        ..Ip::new(SERVER, GW)
    };
    let mut want = ip_packet(back, L4::tcp(80, 23456, b"x"));
    add_to_checksum(&mut want, 20 + 16, 0x1234);
    assert_eq!(&out[INNER..], &want[..], "the same error after translation");
}

fn udp_surplus_and_ethernet_padding_are_carried_along(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let ip = Ip::new(CLIENT, SERVER);
    let udp = L4::Udp {
        sport: 21000,
        dport: 53,
        payload: b"query",
    };
    // UDP length 3 bytes short of the IP payload (a surplus area, where
    // UDP options go), no UDP checksum, and 6 bytes of Ethernet padding.
    let mut frame = from_peer(&ip_packet(ip, udp));
    set_u16(&mut frame, L4_OUT + 4, 8 + 2);
    set_u16(&mut frame, L4_OUT + 6, 0);
    frame.extend_from_slice(&[0; 6]);
    let (verdict, out, reason) = gw.run(&frame);
    assert_eq!((verdict, reason), (Verdict::Tx, Reason::NewFlow));
    let mut want = [&frame[..OUTER], &frame[INNER..]].concat();
    want[..12].copy_from_slice(&[ROUTER_MAC, GW_MAC].concat());
    want[OUTER + 12..OUTER + 16].copy_from_slice(&GW);
    want[OUTER + 8] -= 1;
    fix_ipv4_checksum(&mut want, OUTER);
    assert_eq!(out, want, "translated with surplus and padding");
}

fn bytes_after_an_icmp_error_are_not_its_quote(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let syn = L4::syn(23456, 80);
    outbound(gw, CLIENT, syn, Reason::NewFlow);
    let kind = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
    let error = Ip::new(ROUTER, GW);
    let sent = ip_packet(Ip::new(GW, SERVER), syn);
    let padding = [0xaa; 20];

    // A router's error quoting 28 bytes of the SYN: the quote ends before
    // the TCP checksum, and the frame carries bytes after the IP packet
    // where the checksum would be. Translating them would break the ICMP
    // checksum (a bug the corpus found): they are left alone.
    let frame = [
        ethernet(
            ROUTER_MAC,
            GW_MAC,
            &icmp_error(error, kind.clone(), &sent[..28]),
        ),
        padding.to_vec(),
    ]
    .concat();
    let (verdict, out, reason) = gw.run(&frame);
    assert_eq!((verdict, reason), (Verdict::Tx, Reason::IcmpErrorRelayed));
    let (relayed, tail) = out.split_at(out.len() - padding.len());
    assert_eq!(tail, padding, "padding changed");
    assert_checksums_valid(relayed);
    let back = Ip {
        dst: CLIENT,
        ttl: error.ttl - 1,
        ..error
    };
    let quote = &ip_packet(Ip::new(CLIENT, SERVER), syn)[..28];
    assert_eq!(
        &relayed[INNER..],
        &icmp_error(back, kind.clone(), quote)[..]
    );

    // An error whose length ends with the quoted IP header, followed by
    // the flow's ports outside it: no ports, no flow; the kernel's.
    let mut frame = ethernet(ROUTER_MAC, GW_MAC, &icmp_error(error, kind, &sent[..28]));
    grow_len(&mut frame, IP_RET, -8);
    fix_ipv4_checksum(&mut frame, IP_RET);
    let (verdict, out, reason) = gw.run(&frame);
    assert_eq!((verdict, reason), (Verdict::Pass, Reason::NotOurs));
    assert_eq!(out, frame);
}
