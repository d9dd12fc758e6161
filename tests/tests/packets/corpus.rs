//! A corpus of random and mutated frames through each hook: valid outbound
//! frames, replies and ICMP errors about flows (from the Internet and from
//! clients), with bits flipped, cut short or extended, and lengths, header
//! lengths, protocols, flags, TTLs, addresses and ports changed (mostly
//! with the IP checksums fixed, so the mutation reaches past the checksum
//! check), and frames of random bytes.
//! Every frame must get a defined action and exactly one reason counter;
//! every frame sent on must be well formed by an independent parser; a
//! frame passed to the kernel is untouched unless translated for it. The
//! corpus is a function of its seed: `EGRESS_CORPUS_SEED=N` replays (or
//! explores) another one.

use std::collections::HashMap;

use egress_common::{
    flow::{Flow, IPPROTO_TCP, IPPROTO_UDP},
    reason::Verdict as Class,
    tcp,
};
use etherparse::{
    Icmpv4Type, IpNumber,
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
};

use super::*;
use crate::frames::{Parsed, checksum, fix_ipv4_checksum, icmp_error, parse};

for_each_hook!(random_and_mutated_frames_get_defined_verdicts_and_well_formed_output);

const SEED: u64 = 0x6567_7265_7373;
const FRAMES: usize = 4000;

/// SplitMix64: a tiny generator, so that a seed names a corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }

    /// `min` to `min + spread - 1` random bytes.
    fn bytes(&mut self, min: usize, spread: usize) -> Vec<u8> {
        let n = min + self.below(spread);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A valid frame to mutate: where its IPv4 headers and transport header
/// start, and the (IP, transport) header pair whose transport checksum a
/// mutation may fix.
#[derive(Clone)]
struct Base {
    frame: Vec<u8>,
    ips: Vec<usize>,
    l4: usize,
    check: (usize, usize),
}

impl Base {
    fn outbound(client: [u8; 4], remote: [u8; 4], l4: L4) -> Self {
        Self {
            frame: from_peer(&ip_packet(Ip::new(client, remote), l4)),
            ips: vec![14, 34],
            l4: 54,
            check: (34, 54),
        }
    }

    fn reply(remote: [u8; 4], nat: [u8; 4], l4: L4) -> Self {
        Self {
            frame: ethernet(ROUTER_MAC, GW_MAC, &ip_packet(Ip::new(remote, nat), l4)),
            ips: vec![14],
            l4: 34,
            check: (14, 34),
        }
    }
}

const PAYLOAD: &[u8] = b"0123456789abcdef0123456789";
/// A TCP MSS option of 1460.
const MSS_1460: &[u8] = &[2, 4, 0x05, 0xb4];

/// A valid outbound frame of a random kind, client, destination and port.
fn outbound_base(rng: &mut Rng) -> Base {
    let client = rng.pick(&[CLIENT, CLIENT2, [192, 168, 250, 1]]);
    let remote = rng.pick(&[SERVER, SERVER, UNRESOLVED, BEYOND_ETH1]);
    let port = 20000 + rng.below(50) as u16;
    let payload = &PAYLOAD[..rng.below(PAYLOAD.len())];
    let l4 = match rng.below(5) {
        0 => L4::syn(port, 80),
        // The gateway clamps this MSS (1460) to its tunnel's.
        4 => L4::with_options(port, 80, tcp::SYN, MSS_1460),
        1 => L4::tcp(port, 443, payload),
        2 => L4::Udp {
            sport: port,
            dport: 53,
            payload,
        },
        _ => L4::EchoRequest { id: port, seq: 1 },
    };
    Base::outbound(client, remote, l4)
}

/// A valid reply to one of the gateway's flows.
fn reply_base(rng: &mut Rng, flows: &[Flow]) -> Base {
    let f = flows[rng.below(flows.len())];
    let (rport, nport) = (
        u16::from_be_bytes(f.remote_port),
        u16::from_be_bytes(f.nat_port),
    );
    let payload = &PAYLOAD[..rng.below(PAYLOAD.len())];
    let l4 = match f.proto {
        IPPROTO_TCP if rng.percent(20) => {
            L4::with_options(rport, nport, tcp::SYN | tcp::ACK, MSS_1460)
        }
        IPPROTO_TCP => L4::tcp(rport, nport, payload),
        IPPROTO_UDP => L4::Udp {
            sport: rport,
            dport: nport,
            payload,
        },
        _ => L4::EchoReply { id: nport, seq: 1 },
    };
    Base::reply(f.remote_addr, f.nat_addr, l4)
}

/// A valid ICMP error about one of the gateway's flows: from the Internet,
/// quoting the packet the gateway sent, or from a client through the
/// tunnel, quoting a return packet as the client received it.
fn icmp_error_base(rng: &mut Rng, flows: &[Flow], from_client: bool) -> Base {
    let f = flows[rng.below(flows.len())];
    let (addr, port) = if from_client {
        (f.client_addr, f.client_port)
    } else {
        (f.nat_addr, f.nat_port)
    };
    let (port, rport) = (u16::from_be_bytes(port), u16::from_be_bytes(f.remote_port));
    let l4 = match f.proto {
        IPPROTO_TCP => L4::tcp(port, rport, b""),
        IPPROTO_UDP => L4::Udp {
            sport: port,
            dport: rport,
            payload: PAYLOAD,
        },
        _ => L4::EchoRequest { id: port, seq: 1 },
    };
    let quoted = if from_client {
        ip_packet(Ip::new(f.remote_addr, addr), l4.reply_to(port))
    } else {
        ip_packet(Ip::new(addr, f.remote_addr), l4)
    };
    let kind = match rng.below(3) {
        0 => Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        1 => Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
        _ => Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }),
    };
    let quote = &quoted[..rng.pick(&[28, quoted.len()])];
    // The quoted packet's destination, or a router on its way.
    let router = if from_client { CLIENT2 } else { ROUTER };
    let from = rng.pick(&[quoted[16..20].try_into().unwrap(), router]);
    let error = icmp_error(
        Ip::new(from, quoted[12..16].try_into().unwrap()),
        kind,
        quote,
    );
    // The error's header (after the outer one) and the quoted one.
    let (frame, ips, at) = if from_client {
        (from_peer(&error), vec![14, 34, 62], 34)
    } else {
        (ethernet(ROUTER_MAC, GW_MAC, &error), vec![14, 42], 14)
    };
    Base {
        frame,
        ips,
        l4: at + 48,
        check: (at, at + 20),
    }
}

fn set_u16(f: &mut [u8], at: usize, v: u16) {
    if at + 2 <= f.len() {
        f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// Applies one random mutation to `b`.
fn mutate(rng: &mut Rng, b: &mut Base) {
    let f = &mut b.frame;
    let ip = rng.pick(&b.ips);
    let len = f.len();
    // Header mutations only while the header is there.
    let kinds = if ip + 20 <= len { 12 } else { 4 };
    let (r8, r16) = (rng.next() as u8, rng.next() as u16);
    match rng.below(kinds) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(len);
                f[at] ^= 1 << rng.below(8);
            }
        }
        1 => f[rng.below(len)] = rng.next() as u8,
        2 => f.truncate(14 + rng.below(len - 13)),
        3 => {
            let tail = rng.bytes(1, 64);
            f.extend_from_slice(&tail);
        }
        4 => {
            let old = i32::from(u16::from_be_bytes([f[ip + 2], f[ip + 3]]));
            let v = match rng.below(3) {
                0 => i32::from(r16),
                1 => old + rng.below(9) as i32 - 4,
                _ => rng.pick(&[0, 19, 20, 27, 39, 40, 47]),
            };
            set_u16(f, ip + 2, v as u16);
        }
        5 => f[ip] = rng.pick(&[0x40 | (r8 & 0x0f), r8, 0x46, 0x44]),
        6 => f[ip + 9] = rng.pick(&[0, 1, 4, 6, 17, 41, 47, r8]),
        7 => {
            let frags = rng.pick(&[0x2000, 0x0001, 0x00b9, 0x4000, 0x6000, r16]);
            set_u16(f, ip + 6, frags);
        }
        8 => f[ip + 8] = rng.pick(&[0, 1, 2, r8]),
        9 => {
            // UDP length, or TCP data offset.
            if rng.percent(50) {
                let v = rng.pick(&[0, 7, 8, 9, r16 & 0x3f]);
                set_u16(f, b.l4 + 4, v);
            } else if b.l4 + 12 < len {
                f[b.l4 + 12] = r8 & 0xf0;
            }
        }
        10 => {
            let addr = rng.pick(&[GW, PEER, CLIENT, CLIENT2, SERVER, UNRESOLVED, [0; 4]]);
            let at = ip + rng.pick(&[12, 16]);
            f[at..at + 4].copy_from_slice(&addr);
        }
        _ => {
            let at = b.l4 + rng.below(4);
            if at < len {
                f[at] = r8;
            }
        }
    }
}

/// Recomputes the transport checksum of the innermost IPv4 packet at `ip`
/// when its header fits: mutations of the transport header then reach the
/// checks of a valid checksum's survival.
fn fix_l4_checksum(f: &mut [u8], ip: usize, l4: usize) {
    let tot = usize::from(u16::from_be_bytes([f[ip + 2], f[ip + 3]]));
    let end = ip + tot;
    let check = match f[ip + 9] {
        6 => l4 + 16,
        17 => l4 + 6,
        1 => l4 + 2,
        _ => return,
    };
    if end > f.len() || check + 2 > end || l4 < ip + 20 {
        return;
    }
    f[check..check + 2].fill(0);
    let mut words = f[l4..end].to_vec();
    if f[ip + 9] != 1 {
        words.resize(words.len().next_multiple_of(2), 0);
        // The pseudo-header: addresses, protocol and transport length.
        words.extend_from_slice(&f[ip + 12..ip + 20]);
        words.extend_from_slice(&[0, f[ip + 9]]);
        words.extend_from_slice(&((end - l4) as u16).to_be_bytes());
    }
    let sum = checksum(&words);
    f[check..check + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The next frame of the corpus.
fn frame(rng: &mut Rng, flows: &[Flow]) -> Vec<u8> {
    match rng.below(22) {
        // Random bytes, as any frame or as IPv4 to the gateway.
        0 => rng.bytes(14, 120),
        1 => {
            let mut f = rng.bytes(34, 100);
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14] = 0x45;
            f[14 + 9] = rng.pick(&[1, 4, 6, 17]);
            f[30..34].copy_from_slice(&GW);
            if rng.percent(50) {
                fix_ipv4_checksum(&mut f, 14);
            }
            f
        }
        n => {
            let mut b = match n {
                _ if n < 11 || flows.is_empty() => outbound_base(rng),
                11..17 => reply_base(rng, flows),
                17..20 => icmp_error_base(rng, flows, false),
                _ => icmp_error_base(rng, flows, true),
            };
            // A few frames go through valid, to make flows and replies.
            for _ in 0..rng.below(4) {
                mutate(rng, &mut b);
            }
            if rng.percent(80) {
                for &ip in &b.ips {
                    let len = b.frame.len();
                    let fits = b
                        .frame
                        .get(ip)
                        .is_some_and(|v| ip + usize::from(v & 0x0f).max(5) * 4 <= len);
                    if fits {
                        fix_ipv4_checksum(&mut b.frame, ip);
                    }
                }
            }
            // Last: an ICMP error's checksum covers the quoted header's.
            let (ip, l4) = b.check;
            if rng.percent(30) && b.frame.len() >= l4 {
                fix_l4_checksum(&mut b.frame, ip, l4);
            }
            b.frame
        }
    }
}

fn random_and_mutated_frames_get_defined_verdicts_and_well_formed_output(hook: Hook) {
    let seed = std::env::var("EGRESS_CORPUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    let mut rng = Rng(seed);
    // A table small enough to fill: refusals answer with ICMP errors.
    let gw = &mut Gateway::with(hook, |p| p.max_flows = 256);
    let (mut flows, mut skipped) = (Vec::new(), 0);
    let mut seen = HashMap::<Reason, usize>::new();
    for i in 0..FRAMES {
        if i % 200 == 0 {
            flows = gw.outbound_flows();
        }
        let frame = frame(&mut rng, &flows);
        // BPF_PROG_TEST_RUN makes no skb of an IPv4 or IPv6 frame shorter
        // than that header; XDP sees those.
        let ip_header = match frame[12..14] {
            [0x08, 0x00] => 20,
            [0x86, 0xdd] => 40,
            _ => 0,
        };
        if hook == Hook::Tc && frame.len() < 14 + ip_header {
            skipped += 1;
            continue;
        }
        let run = gw.try_run(&frame);
        if let Err(problem) = judge(&frame, &run) {
            panic!(
                "seed {seed} frame {i} ({hook:?}): {problem}\nin:  {}\nout: {}\nmoved: {:?}",
                hex(&frame),
                hex(&run.out),
                run.moved
            );
        }
        *seen.entry(run.moved[0]).or_default() += 1;
    }
    assert!(skipped < FRAMES / 10, "{skipped} frames not run");
    // The corpus reaches past the checks: translations both ways, refusals
    // answered with ICMP errors, and the malformed kinds, each seen.
    for reason in [
        Reason::NewFlow,
        Reason::TableFull,
        Reason::Translated,
        Reason::ReverseHit,
        Reason::IcmpErrorRelayed,
        Reason::IcmpErrorNoFlow,
        Reason::TtlExceeded,
        Reason::NoNeighbour,
        Reason::BadChecksum,
        Reason::BadLength,
        Reason::BadHeader,
        Reason::Truncated,
        Reason::FragmentAhead,
        Reason::NestedTunnel,
    ] {
        assert!(
            seen.contains_key(&reason),
            "seed {seed}: no {reason:?} in {seen:?}"
        );
    }
}

/// Whether one run did what the gateway promises for any input.
fn judge(frame: &[u8], run: &Run) -> Result<(), String> {
    let verdict = run.verdict.ok_or(format!("undefined action {}", run.ret))?;
    let [reason] = run.moved[..] else {
        return Err(format!("{} reason counters moved", run.moved.len()));
    };
    let sent = matches!(verdict, Verdict::Tx | Verdict::Redirect);
    match (reason.verdict(), verdict) {
        (Class::Forwarded, Verdict::Tx | Verdict::Redirect)
        | (Class::Passed, Verdict::Pass)
        | (Class::Dropped, Verdict::Drop) => {}
        // A refused packet answered with an ICMP error (checked below).
        (Class::Dropped, Verdict::Tx | Verdict::Redirect) => {}
        (class, v) => return Err(format!("{reason:?} ({class:?}) but {v:?}")),
    }
    // Translated, for the kernel to forward (resolve the neighbour, or
    // fragment).
    let for_kernel = matches!(reason, Reason::NoNeighbour | Reason::KernelFragments);
    if verdict == Verdict::Pass && !for_kernel {
        return (run.out == frame)
            .then_some(())
            .ok_or("passed to the kernel changed".into());
    }
    if !sent && !for_kernel {
        return Ok(());
    }
    let out = parse(&run.out).map_err(|e| format!("output malformed: {e}"))?;
    let input = parse(frame).map_err(|e| format!("sent on, but the input is malformed: {e}"))?;
    if reason.verdict() == Class::Dropped {
        return check_answer(&input, &out);
    }
    check_translation(reason, &input, &out)?;
    if input.l4_valid && !out.l4_valid {
        return Err("a right transport checksum went wrong".into());
    }
    if input.udp_none != out.udp_none {
        return Err("UDP checksum presence changed".into());
    }
    Ok(())
}

/// A refused packet may only be answered: an ICMP error from the gateway
/// to the packet's source, through the tunnel to a client or straight to
/// an Internet host.
fn check_answer(input: &Parsed, out: &Parsed) -> Result<(), String> {
    let (asked, answer) = (input.ips.last().unwrap(), out.ips.last().unwrap());
    let tunnel_ok = match (input.ips.len(), out.ips.len()) {
        (2, 2) => out.ips[0].destination == input.ips[0].source,
        (1, 1) => true,
        _ => false,
    };
    let ok = matches!(out.icmp_type, Some(3 | 11 | 12))
        && out.l4_valid
        && answer.source == GW
        && answer.destination == asked.source
        && tunnel_ok;
    ok.then_some(())
        .ok_or("a refused packet was sent on, not answered".into())
}

/// The output of a translation has the shape and addresses its direction
/// gives it.
fn check_translation(reason: Reason, input: &Parsed, out: &Parsed) -> Result<(), String> {
    let (inner_in, inner_out) = (input.ips.last().unwrap(), out.ips.last().unwrap());
    let expect = |ok: bool, what: &str| ok.then_some(()).ok_or(what.to_owned());
    expect(inner_in.protocol == inner_out.protocol, "protocol changed")?;
    expect(out.proto == input.proto, "transport changed")?;
    expect(out.icmp_type == input.icmp_type, "ICMP type changed")?;
    if input.ips.len() == 1 {
        // Return (a reply or an ICMP error): encapsulated to the peer, with
        // our hop on the inner TTL.
        expect(out.ips.len() == 2, "not encapsulated")?;
        expect(
            out.ips[0].source == GW && out.ips[0].destination == PEER,
            "outer addresses",
        )?;
        expect(out.ips[0].protocol == IpNumber::IPV4, "outer protocol")?;
        expect(inner_out.source == inner_in.source, "return source changed")?;
        expect(inner_out.time_to_live + 1 == inner_in.time_to_live, "TTL")
    } else {
        expect(out.ips.len() == 1, "not decapsulated")?;
        expect(inner_out.source == GW, "not translated to the gateway")?;
        expect(
            inner_out.destination == inner_in.destination,
            "destination changed",
        )?;
        // What the kernel forwards for us, it decrements itself.
        let hop = u8::from(reason.verdict() == Class::Forwarded);
        expect(inner_out.time_to_live + hop == inner_in.time_to_live, "TTL")
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
