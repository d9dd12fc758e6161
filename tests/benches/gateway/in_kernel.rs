//! In-kernel cost per packet: single BPF_PROG_TEST_RUN runs on fresh
//! frames (the programs rewrite packets in place, so the kernel's own
//! repeat would not redo the work), the kernel's timing of each run.

use crate::frames::{Ip, L4, encapsulate, ethernet, icmp_error, ip_packet};
use crate::gateway::*;
use crate::report::Series;
use egress_common::flow::Flow;
use egress_user::settings::PortRange;
use tests::tiny_bpf::{HashMap, Hook, Program, programs};

/// Runs of `PER_RUN` packets of every series, `BLOCK` of a series in a row
/// in turn: whatever else the shared machine does hits all series alike,
/// and each runs warm, as in a stream of packets (one packet of each in
/// turn would add 5-10% of cold caches to every figure).
pub const RUNS: usize = 5;
pub const PER_RUN: usize = 20_000;
pub const BLOCK: usize = 100;
/// Every new flow takes a translation port of its own, so half a block
/// per turn: all runs' flows fit one address's port range.
pub const NEW_FLOWS_PER_RUN: usize = PER_RUN / 2;
/// The share of each run's packets its figure is the mean of: the middle,
/// without the fastest and slowest tenth.
pub const CENTRAL_SHARE: f64 = 0.8;
const ALL_PORTS: PortRange = PortRange {
    min: 1024,
    max: 65535,
};
const XDP_TX: u32 = 3;

/// One figure per run of each series.
#[derive(Default)]
pub struct InKernel {
    /// An empty program: the cost of timing itself.
    pub harness: Series,
    pub mac_swap_floor: Series,
    pub flow_lookup_floor: Series,
    pub outbound: Series,
    pub inbound: Series,
    pub icmp_error: Series,
    pub new_flow: Series,
}

impl InKernel {
    /// Every series, in the order of their turns.
    fn all_mut(&mut self) -> [&mut Series; 7] {
        [
            &mut self.harness,
            &mut self.mac_swap_floor,
            &mut self.flow_lookup_floor,
            &mut self.outbound,
            &mut self.inbound,
            &mut self.icmp_error,
            &mut self.new_flow,
        ]
    }
}

/// A run's figure: the mean of its middle [`CENTRAL_SHARE`] of packets.
/// The odd interrupt does not move it, as it would not move a median, and
/// unlike a median it resolves differences finer than the steps in which
/// the kernel's clock advances (10 ns on our VMs).
fn central_mean(mut ns: Vec<u64>) -> f64 {
    ns.sort_unstable();
    let cut = (ns.len() as f64 * (1.0 - CENTRAL_SHARE) / 2.0) as usize;
    let middle = &ns[cut..ns.len() - cut];
    middle.iter().sum::<u64>() as f64 / middle.len() as f64
}

/// The time of one run, after checking the packet got `XDP_TX`: a broken
/// setup must not pass for a fast one.
fn timed(verdict: u32, duration: std::time::Duration) -> u64 {
    assert_eq!(verdict, XDP_TX, "benchmark packet not forwarded");
    duration.as_nanos() as u64
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
    let harness = Program::load(Hook::Xdp, &programs::transmit()).expect("load empty program");
    let mut out = vec![0u8; 2048];

    let mut figures = InKernel::default();
    for run in 0..RUNS {
        let new_flows: Vec<Vec<u8>> = (run * NEW_FLOWS_PER_RUN..(run + 1) * NEW_FLOWS_PER_RUN)
            .map(new_flow_frame)
            .collect();
        // In the order of `InKernel::all_mut`.
        let mut times: [Vec<u64>; 7] = Default::default();
        let [
            harness_ns,
            floor_ns,
            lookup_ns,
            out_ns,
            in_ns,
            icmp_ns,
            new_ns,
        ] = &mut times;
        gw.with_runs(|gateway| {
            // As many turns as blocks of PER_RUN.
            for new_flows in new_flows.chunks(BLOCK / 2) {
                let floors = [
                    (&harness, &mut *harness_ns),
                    (&floor, &mut *floor_ns),
                    (&lookup_floor, &mut *lookup_ns),
                ];
                for (prog, ns) in floors {
                    for _ in 0..BLOCK {
                        let r = prog.test_run(&inbound, &mut out).expect("run floor");
                        ns.push(timed(r.verdict, r.duration));
                    }
                }
                let mut run = |frame: &[u8], ns: &mut Vec<u64>| {
                    let r = gateway(frame, &mut out);
                    ns.push(timed(r.return_value, r.duration));
                };
                let paths = [
                    (&outbound, &mut *out_ns),
                    (&inbound, &mut *in_ns),
                    (&error, &mut *icmp_ns),
                ];
                for (frame, ns) in paths {
                    for _ in 0..BLOCK {
                        run(frame, ns);
                    }
                }
                for frame in new_flows {
                    run(frame, new_ns);
                }
            }
        });
        for (series, times) in figures.all_mut().into_iter().zip(times) {
            series.push(central_mean(times));
        }
    }
    figures
}
