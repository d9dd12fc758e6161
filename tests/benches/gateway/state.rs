//! Connection state at scale: how fast the data path sets up new flows,
//! and, with the table holding 1,000,000 flows, the memory of the state
//! maps and the time of a garbage-collection sweep.

use std::time::{Duration, Instant};

use crate::frames::{Ip, L4, encapsulate, ethernet, ip_packet};
use crate::gateway::*;
use crate::table;
use egress_user::{clock, gc, settings::PortRange};

pub const FLOWS: u32 = 1_000_000;
/// New flows created through the data path (the rest are inserted directly).
pub const NEW_FLOWS: u32 = 20_000;

pub struct StateAtScale {
    /// In-kernel time of `BPF_PROG_TEST_RUN` per new flow.
    pub new_flow: Duration,
    /// Kernel memory of each state map, sized for `FLOWS`.
    pub memory: [(&'static str, u64); 4],
    /// Inserting the flows from userspace (not a figure of the gateway).
    pub fill: Duration,
    pub sweep_nothing_expired: gc::Sweep,
    pub sweep_all_expired: gc::Sweep,
}

impl StateAtScale {
    pub fn new_flows_per_s(&self) -> f64 {
        1e9 / self.new_flow.as_nanos() as f64
    }
}

pub fn measure() -> StateAtScale {
    let mut gw = Gateway::with(Hook::Xdp, |p| {
        p.max_flows = FLOWS;
        p.ports = PortRange {
            min: 1024,
            max: 65535,
        };
    });

    let frames: Vec<Vec<u8>> = (0..NEW_FLOWS)
        .map(|i| {
            let (client, sport, remote) = table::endpoint(i);
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

    // The rest of the table, as the data path would have made it.
    let now = clock::monotonic_ns();
    let fill = Instant::now();
    table::fill(&mut gw.state(), NEW_FLOWS..FLOWS, |_| now);
    let fill = fill.elapsed();

    let mut state = gw.state();
    let memory = state.memory().unwrap();
    let (timeouts, stop) = (gc::Timeouts::default(), gc::Stop::default());
    // The table's translation addresses: the gateway's own (the flows the
    // data path made), and the pool the rest were written with.
    let mut allowed = gw.allowed();
    allowed.get_mut().unwrap().snat = table::nat_addrs(FLOWS);
    let sweep_nothing_expired = gc::sweep(
        &mut state,
        &timeouts,
        &allowed,
        clock::monotonic_ns(),
        &stop,
    )
    .unwrap();
    assert_eq!(sweep_nothing_expired.live, FLOWS as usize, "flows lost");
    let hours = 3 * 3600 * 1_000_000_000;
    let sweep_all_expired = gc::sweep(
        &mut state,
        &timeouts,
        &allowed,
        clock::monotonic_ns() + hours,
        &stop,
    )
    .unwrap();
    StateAtScale {
        new_flow: in_kernel / NEW_FLOWS,
        memory,
        fill,
        sweep_nothing_expired,
        sweep_all_expired,
    }
}
