//! In-kernel cost per packet, two ways, in the same run:
//! - cold: single BPF_PROG_TEST_RUN runs on fresh frames, the kernel's
//!   timing of each run; the caches and TLB are as the syscall left them;
//! - warm: the kernel's own repeat over one packet, which a restoring
//!   program (`programs::restore_and_call`) puts back before tail-calling
//!   the program measured, as a stream of packets meets it at line rate.

use crate::frames::{Ip, L4, encapsulate, ethernet, icmp_error, ip_packet};
use crate::gateway::*;
use crate::report::Series;
use egress_common::flow::Flow;
use egress_common::flow_cache::CACHE_SLOTS;
use egress_common::reason::Reason;
use egress_user::settings::PortRange;
use tests::tiny_bpf::{HashMap, Hook, ProgArray, Program, programs, xdp_md};

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
/// Established flows the many-flows series sends a packet of in turn, each
/// to a server of its own: four times the slots of a CPU's flow cache, so
/// that by a flow's next packet others have taken its slot, and every
/// packet takes the flow table (as under more busy flows than the cache
/// holds).
pub const MANY_FLOWS: usize = 4 * CACHE_SLOTS as usize;
/// The share of each run's packets its figure is the mean of: the middle,
/// without the fastest and slowest tenth.
pub const CENTRAL_SHARE: f64 = 0.8;
const ALL_PORTS: PortRange = PortRange {
    min: 1024,
    max: 65535,
};
const XDP_TX: u32 = 3;
/// Warm: each run's figure is the mean of `WARM_TURNS` turns of every warm
/// series in turn, each a test run of `WARM_REPEAT` repeats.
pub const WARM_TURNS: usize = 4;
pub const WARM_REPEAT: u32 = 20_000;

/// One figure per run of each series.
#[derive(Default)]
pub struct InKernel {
    /// An empty program: the cost of timing itself.
    pub harness: Series,
    pub mac_swap_floor: Series,
    pub flow_lookup_floor: Series,
    pub outbound: Series,
    /// Established outbound, [`MANY_FLOWS`] flows in turn.
    pub outbound_many: Series,
    pub inbound: Series,
    pub icmp_error: Series,
    pub new_flow: Series,
    pub warm: Warm,
}

/// Warm figures: the kernel's repeat over one packet. The empty program
/// and the floor run under it as they are (swapping MAC addresses twice
/// leaves a frame as it was); every other series through a restoring
/// program and its tail call, which `restore_floor` times on the floor.
#[derive(Default)]
pub struct Warm {
    pub harness: Series,
    pub floor: Series,
    /// Restore + tail call + MAC swap and XDP_TX.
    pub restore_floor: Series,
    pub outbound: Series,
    pub inbound: Series,
    pub icmp_error: Series,
}

impl Warm {
    /// Every series, in the order of their turns.
    fn all_mut(&mut self) -> [&mut Series; 6] {
        [
            &mut self.harness,
            &mut self.floor,
            &mut self.restore_floor,
            &mut self.outbound,
            &mut self.inbound,
            &mut self.icmp_error,
        ]
    }
}

impl InKernel {
    /// The single-run series, in the order of their turns.
    fn all_mut(&mut self) -> [&mut Series; 8] {
        [
            &mut self.harness,
            &mut self.mac_swap_floor,
            &mut self.flow_lookup_floor,
            &mut self.outbound,
            &mut self.outbound_many,
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

/// Flow `n` of the many-flows series: a client port and a server of its
/// own (198.19.0.0/16, for benchmarks, routed by default like the server),
/// beside every other series' flows.
fn many_flows_frame(n: usize, payload: &[u8]) -> Vec<u8> {
    let server = [198, 19, (n >> 8) as u8, n as u8];
    from_peer(server, L4::tcp(16_000 + n as u16, 443, payload))
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
    // Create the flows; the established series then reuse them.
    gw.run(&outbound);
    let many: Vec<Vec<u8>> = (0..MANY_FLOWS)
        .map(|n| many_flows_frame(n, &payload))
        .collect();
    for frame in &many {
        assert_eq!(gw.run(frame).2, Reason::NewFlow, "many flows: a new flow");
    }
    let mut many = many.iter().cycle();
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
    let restoring = warm_programs(&mut gw, &floor, &inbound, [&outbound, &inbound, &error]);
    let [restore_floor, warm_out, warm_in, warm_icmp] = &restoring.programs;
    // In the order of `Warm::all_mut`.
    let warm: [(&[u8], &Program); 6] = [
        (&inbound, &harness),
        (&inbound, &floor),
        (&inbound, restore_floor),
        (&outbound, warm_out),
        (&inbound, warm_in),
        (&error, warm_icmp),
    ];

    let mut figures = InKernel::default();
    for run in 0..RUNS {
        let new_flows: Vec<Vec<u8>> = (run * NEW_FLOWS_PER_RUN..(run + 1) * NEW_FLOWS_PER_RUN)
            .map(new_flow_frame)
            .collect();
        // In the order of `InKernel::all_mut`.
        let mut times: [Vec<u64>; 8] = Default::default();
        let [
            harness_ns,
            floor_ns,
            lookup_ns,
            out_ns,
            many_ns,
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
                for frame in many.by_ref().take(BLOCK) {
                    run(frame, many_ns);
                }
                for frame in new_flows {
                    run(frame, new_ns);
                }
            }
        });
        for (series, times) in figures.all_mut().into_iter().zip(times) {
            series.push(central_mean(times));
        }
        let mut warm_ns: [Vec<u64>; 6] = Default::default();
        gw.with_program(|_, ifindex| {
            for _ in 0..WARM_TURNS {
                for ((frame, prog), ns) in warm.iter().zip(&mut warm_ns) {
                    let ctx = xdp_md(frame, ifindex);
                    let r = prog
                        .test_run_repeated(frame, &ctx, WARM_REPEAT, &mut out)
                        .expect("run warm");
                    ns.push(timed(r.verdict, r.duration));
                }
            }
        });
        for (series, ns) in figures.warm.all_mut().into_iter().zip(warm_ns) {
            series.push(ns.iter().sum::<u64>() as f64 / ns.len() as f64);
        }
    }
    figures
}

/// The restoring programs of the warm series, and the program arrays their
/// tail calls go through (closing an array empties it).
struct Restoring {
    /// For the floor's frame, then for each of the gateway's.
    programs: [Program; 4],
    _calls: [ProgArray; 2],
}

/// The restoring program for `floor_frame` (calling `floor`), then the
/// gateway's for each of `frames`.
fn warm_programs(
    gw: &mut Gateway,
    floor: &Program,
    floor_frame: &[u8],
    frames: [&[u8]; 3],
) -> Restoring {
    let [to_floor, to_gateway] = [(); 2].map(|_| ProgArray::new().expect("program array"));
    to_floor.set(floor.fd()).expect("call the floor");
    gw.with_program(|gateway, _| to_gateway.set(gateway))
        .expect("call the gateway");
    let mut out = vec![0u8; 2048];
    let r = floor.test_run(floor_frame, &mut out).expect("run floor");
    let floor_left = out[..r.len].to_vec();
    let restore_floor = restoring(gw, floor_frame, &to_floor, &floor_left, None);
    let [out, inb, icmp] = frames.map(|frame| {
        let (_, left, reason) = gw.run(frame);
        restoring(gw, frame, &to_gateway, &left, Some(reason))
    });
    Restoring {
        programs: [restore_floor, out, inb, icmp],
        _calls: [to_floor, to_gateway],
    }
}

/// The restoring program for `frame` calling `next`'s program, checked to
/// do the work on every repeat: every repeat counts `reason` (the gateway's
/// for a single run of the frame), and the last leaves the frame as `left`
/// (a single run's).
fn restoring(
    gw: &mut Gateway,
    frame: &[u8],
    next: &ProgArray,
    left: &[u8],
    reason: Option<Reason>,
) -> Program {
    const CHECKED: u32 = 1000;
    let prog = Program::load(Hook::Xdp, &programs::restore_and_call(frame, next))
        .expect("load restoring program");
    let mut out = vec![0u8; 2048];
    let before = gw.stats();
    let r = gw
        .with_program(|_, ifindex| {
            prog.test_run_repeated(frame, &xdp_md(frame, ifindex), CHECKED, &mut out)
        })
        .expect("run restoring program");
    let after = gw.stats();
    assert_eq!(r.verdict, XDP_TX, "warm repeats: the verdict");
    assert_eq!(&out[..r.len], left, "warm repeats: the frame left");
    let moved: Vec<(Reason, u64)> = Reason::ALL
        .into_iter()
        .filter(|r| after[r] != before[r])
        .map(|r| (r, after[&r] - before[&r]))
        .collect();
    let expected = Vec::from_iter(reason.map(|r| (r, u64::from(CHECKED))));
    assert_eq!(moved, expected, "warm repeats: the reasons counted");
    prog
}
