//! In-kernel cost per packet of the XDP program's established paths,
//! measured with BPF_PROG_TEST_RUN (`cargo xtask bench`). Prints figures;
//! never fails on timing.

#[path = "../tests/packets/frames.rs"]
#[allow(dead_code)]
mod frames;
#[path = "../tests/packets/gateway.rs"]
#[allow(dead_code)]
mod gateway;

use frames::{Ip, L4, encapsulate, ethernet, ip_packet};
use gateway::*;

const RUNS: usize = 20_000;

fn median_ns(gw: &mut Gateway, frame: &[u8]) -> u128 {
    let mut out = vec![0u8; frame.len() + 256];
    let mut ns: Vec<u128> = gw
        .test_run(frame, RUNS, &mut out)
        .iter()
        .map(|r| r.duration.as_nanos())
        .collect();
    ns.sort_unstable();
    ns[ns.len() / 2]
}

fn main() {
    let mut gw = Gateway::new();
    let payload = [0u8; 64];
    let out_l4 = L4::tcp(23456, 443, &payload);
    let outbound = ethernet(
        ROUTER_MAC,
        GW_MAC,
        &encapsulate(
            Ip::new(PEER, GW),
            &ip_packet(Ip::new(CLIENT, SERVER), out_l4),
        ),
    );
    // Create the flow, then time packets of the established flow.
    gw.run(&outbound);
    let ret_l4 = L4::tcp(443, 23456, &payload);
    let inbound = ethernet(ROUTER_MAC, GW_MAC, &ip_packet(Ip::new(SERVER, GW), ret_l4));

    println!("BPF_PROG_TEST_RUN, median of {RUNS} single runs, 64-byte TCP payload");
    println!("{:<44} {:>8}", "path", "ns/pkt");
    for (name, frame) in [
        ("established outbound (decap + SNAT + FIB)", &outbound),
        ("established return (un-NAT + encap + FIB)", &inbound),
    ] {
        println!("{name:<44} {:>8}", median_ns(&mut gw, frame));
    }
}
