//! Connection state at scale (`cargo xtask bench`): how fast the data path
//! sets up new flows, and, with the table holding 1,000,000 flows, the
//! memory of the state maps and the time of a garbage-collection sweep.
//! Prints figures; never fails on timing.

#[path = "../tests/packets/frames.rs"]
#[allow(dead_code)]
mod frames;
#[path = "../tests/packets/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use std::time::{Duration, Instant};

use egress_common::flow::{Flow, IPPROTO_UDP, Mapping};
use egress_user::gc;
use frames::{Ip, L4, encapsulate, ethernet, ip_packet};
use gateway::*;

const FLOWS: u32 = 1_000_000;
/// New flows created through the data path (the rest are inserted directly).
const NEW_FLOWS: u32 = 20_000;

/// The `i`-th client endpoint (each its own mapping) and its remote.
fn endpoint(i: u32) -> ([u8; 4], u16, [u8; 4]) {
    let port = 1024 + (i % 60_000) as u16;
    let [_, _, hi, lo] = (i / 60_000).to_be_bytes();
    ([10, 0, 100 + hi, lo], port, [203, 0, 113, (i % 251) as u8])
}

fn main() {
    let mut gw = Gateway::with(Hook::Xdp, |p| {
        p.max_flows = FLOWS;
        p.ports = egress_user::settings::PortRange {
            min: 1024,
            max: 65535,
        };
        p.client_cidrs.push("10.0.0.0/8".parse().unwrap());
    });

    let frames: Vec<Vec<u8>> = (0..NEW_FLOWS)
        .map(|i| {
            let (client, sport, remote) = endpoint(i);
            let l4 = L4::Udp {
                sport,
                dport: 53,
                payload: b"q",
            };
            let inner = ip_packet(Ip::new(client, remote), l4);
            ethernet(ROUTER_MAC, GW_MAC, &encapsulate(Ip::new(PEER, GW), &inner))
        })
        .collect();
    let mut out = vec![0u8; 256];
    let mut in_kernel = Duration::ZERO;
    for frame in &frames {
        in_kernel += gw.test_run(frame, 1, &mut out)[0].duration;
    }
    let per_sec = |d: Duration| f64::from(NEW_FLOWS) / d.as_secs_f64();

    // Fill the table to FLOWS with flows as the data path makes them.
    let now = gc::monotonic_ns();
    let fill = Instant::now();
    {
        let mut state = gw.state();
        for i in NEW_FLOWS..FLOWS {
            let (client, sport, remote) = endpoint(i);
            // One translation address per 60,000 ports, as a pool would.
            let nat_addr = [10, 1, 2, client[3]];
            let flow = Flow {
                client_addr: client,
                nat_addr,
                remote_addr: remote,
                peer_addr: PEER,
                client_port: sport.to_be_bytes(),
                nat_port: sport.to_be_bytes(),
                remote_port: 53u16.to_be_bytes(),
                proto: IPPROTO_UDP,
                created_ns: now,
                last_seen_ns: now,
                ..Flow::default()
            };
            state.flows.insert(&flow.out_key(), &flow, 0).unwrap();
            state.flows.insert(&flow.in_key(), &flow, 0).unwrap();
            let pair = Mapping::pair(
                IPPROTO_UDP,
                (client, flow.client_port),
                (nat_addr, flow.nat_port),
                now,
            );
            for (key, value) in pair {
                state.mappings.insert(&key, &value, 0).unwrap();
            }
        }
    }
    let fill = fill.elapsed();

    let mut state = gw.state();
    let memory = state.memory().unwrap();
    let timeouts = gc::Timeouts::default();
    let stop = gc::Stop::default();
    let keep = gc::sweep(&mut state, &timeouts, gc::monotonic_ns(), &stop).unwrap();
    let hours = 3 * 3600 * 1_000_000_000;
    let expire = gc::sweep(&mut state, &timeouts, gc::monotonic_ns() + hours, &stop).unwrap();

    println!("connection state, {FLOWS} flows (UDP, one mapping each)");
    println!(
        "  new flows through the data path: {:.0}/s ({:.0} ns each, in-kernel time of BPF_PROG_TEST_RUN)",
        per_sec(in_kernel),
        in_kernel.as_nanos() as f64 / f64::from(NEW_FLOWS)
    );
    for (map, bytes) in memory {
        println!(
            "  memory of {map}: {:.1} MiB",
            bytes as f64 / (1 << 20) as f64
        );
    }
    println!("  (filling the table from userspace took {fill:.1?})");
    println!(
        "  GC sweep, nothing expired: {:.2?} ({} live)",
        keep.took, keep.live
    );
    println!(
        "  GC sweep, all expired: {:.2?} ({} flows, {} mappings removed)",
        expire.took, expire.expired, expire.mappings_expired
    );

    let figures = serde_json::json!({
        "flows": FLOWS,
        "new_flows_per_s": per_sec(in_kernel),
        "memory_bytes": memory.iter().map(|(m, b)| (m.to_string(), serde_json::Value::from(*b))).collect::<serde_json::Map<_, _>>(),
        "gc_sweep_s": { "nothing_expired": keep.took.as_secs_f64(), "all_expired": expire.took.as_secs_f64() },
    });
    record(figures);
}

/// Adds the figures to the report the gateway bench wrote (BENCH_JSON).
fn record(figures: serde_json::Value) {
    let Some(path) = std::env::var_os("BENCH_JSON") else {
        return;
    };
    let mut report: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    report["state_at_scale"] = figures;
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap() + "\n").unwrap();
}
