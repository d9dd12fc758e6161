//! In-kernel cost per packet: single BPF_PROG_TEST_RUN runs on fresh
//! frames (the programs rewrite packets in place, so the kernel's own
//! repeat would not redo the work), the kernel's timing of each run.

use crate::frames::{Ip, L4, encapsulate, ethernet, icmp_error, ip_packet};
use crate::gateway::*;
use crate::report::Series;
use egress_common::flow::Flow;
use egress_user::settings::PortRange;
use tests::tiny_bpf::{HashMap, Hook, Program, programs};

/// Runs of `PER_RUN` single packets; each figure is the median of the
/// runs' medians.
pub const RUNS: usize = 5;
pub const PER_RUN: usize = 20_000;
/// Every new flow takes a translation port of its own, so fewer of them:
/// all runs' flows fit one address's port range.
pub const NEW_FLOWS_PER_RUN: usize = 10_000;
const ALL_PORTS: PortRange = PortRange {
    min: 1024,
    max: 65535,
};
const XDP_TX: u32 = 3;

pub struct InKernel {
    pub mac_swap_floor: Series,
    pub flow_lookup_floor: Series,
    pub outbound: Series,
    pub inbound: Series,
    pub new_flow: Series,
    pub icmp_error: Series,
}

fn median(mut ns: Vec<u64>) -> u64 {
    ns.sort_unstable();
    ns[ns.len() / 2]
}

/// Every run's median, after checking each packet got `XDP_TX`: a broken
/// setup must not pass for a fast one.
fn run_median(results: impl IntoIterator<Item = (u32, std::time::Duration)>) -> u64 {
    median(
        results
            .into_iter()
            .map(|(verdict, d)| {
                assert_eq!(verdict, XDP_TX, "benchmark packet not forwarded");
                d.as_nanos() as u64
            })
            .collect(),
    )
}

/// Frame from the peer carrying `l4` from the client to `server`.
fn from_peer(server: [u8; 4], l4: L4) -> Vec<u8> {
    let inner = ip_packet(Ip::new(CLIENT, server), l4);
    ethernet(ROUTER_MAC, GW_MAC, &encapsulate(Ip::new(PEER, GW), &inner))
}

/// Flow `n` of the new-flow series: a client port of its own (never the
/// established flow's), so every packet creates a mapping and a flow.
fn new_flow_frame(n: usize) -> Vec<u8> {
    from_peer(SERVER, L4::syn(30_000 + n as u16, 443))
}

pub fn measure() -> InKernel {
    // Room for every new flow of every run: the tables never fill.
    let max_flows = (RUNS * NEW_FLOWS_PER_RUN).next_power_of_two() as u32;
    let mut gw = Gateway::with(crate::gateway::Hook::Xdp, |p| {
        p.max_flows = max_flows;
        p.ports = ALL_PORTS;
    });
    let floor = Program::load(Hook::Xdp, &programs::mac_swap()).expect("load MAC swap");
    let payload = [0u8; 64];
    let outbound = from_peer(SERVER, L4::tcp(23456, 443, &payload));
    let inbound = ethernet(
        ROUTER_MAC,
        GW_MAC,
        &ip_packet(Ip::new(SERVER, GW), L4::tcp(443, 23456, &payload)),
    );
    // Create the flow; the established series then reuse it.
    gw.run(&outbound);
    // Port unreachable from the server about the flow's translated segment
    // (the client's port is free, so it is kept).
    let sent = ip_packet(Ip::new(GW, SERVER), L4::tcp(23456, 443, &payload));
    let unreachable = etherparse::Icmpv4Type::DestinationUnreachable(
        etherparse::icmpv4::DestUnreachableHeader::Port,
    );
    let error = ethernet(
        ROUTER_MAC,
        GW_MAC,
        &icmp_error(Ip::new(SERVER, GW), unreachable, &sent),
    );
    // The floor plus what no translator can skip: one lookup in a hash
    // map the size of the gateway's flow table, entries as large.
    let flows = HashMap::new(16, size_of::<Flow>(), 2 * max_flows).expect("create flow map");
    let key = programs::flow_lookup_key(&inbound);
    flows
        .insert(&key, &[0; size_of::<Flow>()])
        .expect("insert flow");
    let lookup_floor =
        Program::load(Hook::Xdp, &programs::flow_lookup(&flows)).expect("load flow lookup");
    let mut out = vec![0u8; 2048];

    let mut figures = InKernel {
        mac_swap_floor: Series::default(),
        flow_lookup_floor: Series::default(),
        outbound: Series::default(),
        inbound: Series::default(),
        new_flow: Series::default(),
        icmp_error: Series::default(),
    };
    // Series interleaved run by run, so drift on a shared machine hits all alike.
    for run in 0..RUNS {
        for (series, prog) in [
            (&mut figures.mac_swap_floor, &floor),
            (&mut figures.flow_lookup_floor, &lookup_floor),
        ] {
            series.push(run_median((0..PER_RUN).map(|_| {
                let r = prog.test_run(&inbound, &mut out).expect("run floor");
                (r.verdict, r.duration)
            })));
        }
        for (series, frame) in [
            (&mut figures.outbound, &outbound),
            (&mut figures.inbound, &inbound),
            (&mut figures.icmp_error, &error),
        ] {
            series.push(run_median(
                gw.test_run(frame, PER_RUN, &mut out)
                    .into_iter()
                    .map(|r| (r.return_value, r.duration)),
            ));
        }
        let frames: Vec<Vec<u8>> = (run * NEW_FLOWS_PER_RUN..(run + 1) * NEW_FLOWS_PER_RUN)
            .map(new_flow_frame)
            .collect();
        figures.new_flow.push(run_median(
            gw.test_runs(frames.iter().map(Vec::as_slice), &mut out)
                .into_iter()
                .map(|r| (r.return_value, r.duration)),
        ));
    }
    figures
}
