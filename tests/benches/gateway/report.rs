//! The figures as a table for people and JSON for machines.

use crate::fabric::Fabric;
use crate::in_kernel::{
    BLOCK, CENTRAL_SHARE, InKernel, MANY_FLOWS, NEW_FLOWS_PER_RUN, PER_RUN, RUNS, WARM_REPEAT,
    WARM_TURNS,
};
use crate::state::{FLOWS, NEW_FLOWS, StateAtScale};
use crate::traffic::{RATE_INTERVAL, RR_ROUNDS, Rate, TCP_INTERVAL, TRIALS};
use serde_json::{Value, json};
use std::time::Duration;

/// What generates the end-to-end traffic; also in the README.
pub const GENERATOR: &str = "UDP: BPF_PROG_TEST_RUN in XDP live-frames mode on the client's \
    eth0, one thread pinned to each core, each transmitting one pre-built frame (a flow of its own) with \
    XDP_TX; offered: what the client's eth0 sent or dropped (its peer's ring full), delivered: \
    the server's eth0 rx counter while an XDP program there drops them. \
    TCP and request/response: the client's own stack, encapsulated for the eBPF gateway by a \
    tcx program and decapsulated by an XDP program (kernel speed, no userspace peer).";
/// What carries the UDP rate's packets; also in the README.
pub const FABRIC_NOTE: &str = "The UDP rate is measured through two fabrics, the same for both \
    gateways. Kernel router: the router namespace forwards with the kernel's IP stack, as in the \
    tests, twice per packet (client to gateway, gateway to server) on the same two cores; that \
    figure is mostly the router's cost (and the kernel gateway's router also does a policy-routing \
    lookup). XDP fabric: the router forwards by XDP, MAC addresses rewritten and redirected by \
    ingress interface, standing in for the VPC fabric, which costs the gateway host nothing: that \
    figure shows the gateways.";
pub const BASELINE_NOTE: &str = "The kernel NAT baseline carries the client's traffic \
    unencapsulated (this kernel has no ipip module): it is spared the decapsulation and \
    encapsulation the eBPF gateway does, which flatters it.";
/// What the second floor is; also in the README.
pub const LOOKUP_FLOOR_NOTE: &str = "MAC swap + one flow lookup: the floor program plus one \
    bpf_map_lookup_elem of a 16-byte key in a hash map as large as the gateway's flow table: \
    the least a translator with per-flow state does per packet.";
/// What the many-flows row is; also in the README.
pub const MANY_FLOWS_NOTE: &str = "established outbound, 4,096 flows in turn: a packet of each \
    of 4,096 flows (to as many servers) in turn, four times the slots of a CPU's flow cache, so \
    that every packet misses the cache and takes the flow table, as under more busy flows than \
    the cache holds. Its routes are all remembered.";
const _: () = assert!(MANY_FLOWS == 4096, "the many-flows note and row say 4,096");
/// What the harness row is and what "net" means; also in the README.
pub const HARNESS_NOTE: &str = "The empty program times the timing itself: BPF_PROG_TEST_RUN \
    reads the kernel's clock before and after each run, and the loop around the program. It is \
    in every figure, the floor's included. Net: a figure minus the empty program's in the same \
    run, what the program itself costs. The targets are checked on the figures as measured.";
/// What the warm table measures and how; also in the README.
pub const WARM_NOTE: &str = "The kernel's repeat runs a program over one packet, caches warm \
    as under a stream of packets, and times the loop (the empty program's row: the kernel's own \
    per-repeat cost, in every row). The gateway rewrites packets in place and moves their head, \
    so each path's packet is put back before every repeat by a program that restores the frame \
    and tail-calls the gateway. What that costs is timed on the floor (restore + tail call + \
    floor, less the floor) and taken off, run by run: ns/pkt is the path as the repeat alone \
    would time it, \"timed\" the figure before. Net: less the empty program. Every repeat is \
    checked to count its path's reason, and the last to leave the frame a single run leaves.";
/// How the end-to-end figures are taken; also in the README.
pub const TURNS_NOTE: &str = "The two gateways run side by side in topologies of their own \
    and take turns at every figure (ABBA), so that a slow spell of the shared host falls on \
    both: each figure is the median of a gateway's turns, each ratio the median of the ratios of \
    adjacent turns, and the latency percentiles pool all turns' requests.";
const TARGET_IN_KERNEL: &str = "<= 2x floor and < 100 ns";
const TARGET_RATE: &str = ">= 3x kernel";
const RATE_TARGET_RATIO: f64 = 3.0;
const TARGET_P99: &str = "lower than kernel";

/// One in-kernel figure: each run's ns/packet.
#[derive(Default, Clone)]
pub struct Series(Vec<f64>);

impl Series {
    pub fn push(&mut self, ns: f64) {
        self.0.push(ns);
    }

    pub fn median(&self) -> f64 {
        median(self.0.clone())
    }

    /// The median over runs of this series' figure less `base`'s in the
    /// same run.
    pub fn median_less(&self, base: &Series) -> f64 {
        self.less(base).median()
    }

    /// This series less `base`, run by run.
    fn less(&self, base: &Series) -> Series {
        Series(self.0.iter().zip(&base.0).map(|(s, b)| s - b).collect())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds to a tenth, as printed and stored.
fn tenths(ns: f64) -> f64 {
    (ns * 10.0).round() / 10.0
}

/// Everything measured end to end through one gateway, turn by turn.
#[derive(Default)]
pub struct EndToEnd {
    /// Each turn's small-packet UDP rate through each of `Fabric::ALL`, in
    /// order.
    pub udp: [Vec<Rate>; Fabric::ALL.len()],
    /// Each turn's TCP throughput.
    pub tcp_bps: Vec<f64>,
    /// Round-trip times of all turns, sorted.
    pub rtts: Vec<Duration>,
    pub lost: usize,
}

/// One end-to-end figure of both gateways, a value per turn.
struct Paired {
    ebpf: Vec<f64>,
    kernel: Vec<f64>,
}

impl Paired {
    fn of(ebpf: impl Iterator<Item = f64>, kernel: impl Iterator<Item = f64>) -> Self {
        Self {
            ebpf: ebpf.collect(),
            kernel: kernel.collect(),
        }
    }

    fn ebpf(&self) -> f64 {
        median(self.ebpf.clone())
    }

    fn kernel(&self) -> f64 {
        median(self.kernel.clone())
    }

    /// The median of eBPF/kernel over pairs of adjacent turns, which share
    /// the host's condition at the time.
    fn ratio(&self) -> f64 {
        median(
            self.ebpf
                .iter()
                .zip(&self.kernel)
                .map(|(e, k)| e / k)
                .collect(),
        )
    }

    fn json(&self, unit: &str) -> Value {
        json!({
            format!("ebpf_{unit}"): self.ebpf(),
            format!("kernel_{unit}"): self.kernel(),
            "ratio_ebpf_to_kernel": self.ratio(),
            format!("turns_ebpf_{unit}"): self.ebpf,
            format!("turns_kernel_{unit}"): self.kernel,
        })
    }
}

impl EndToEnd {
    fn percentile_us(&self, q: f64) -> f64 {
        let rank = ((q * self.rtts.len() as f64).ceil() as usize).clamp(1, self.rtts.len());
        self.rtts[rank - 1].as_secs_f64() * 1e6
    }
}

const PERCENTILES: [(&str, f64); 3] = [("p50", 0.50), ("p99", 0.99), ("p99_9", 0.999)];

/// A bench run: the parts it measured, each a table and a JSON section.
pub struct Report {
    pub in_kernel: Option<InKernel>,
    pub state: Option<StateAtScale>,
    pub end_to_end: Option<Gateways>,
    pub elapsed: Duration,
}

impl Report {
    pub fn print(&self) {
        if let Some(k) = &self.in_kernel {
            println!();
            k.print();
        }
        if let Some(g) = &self.end_to_end {
            println!();
            g.print();
        }
        if let Some(s) = &self.state {
            println!();
            s.print();
        }
        println!();
        println!("Bench run took {:.0} s", self.elapsed.as_secs_f64());
    }

    pub fn json(&self) -> Value {
        let mut v = json!({
            "schema": 5,
            "machine": { "kernel": kernel_release(), "cpus": cpus() },
            "bench_seconds": self.elapsed.as_secs_f64(),
        });
        if let Some(k) = &self.in_kernel {
            v["in_kernel"] = k.json();
        }
        if let Some(g) = &self.end_to_end {
            v["end_to_end"] = g.json();
        }
        if let Some(s) = &self.state {
            v["state_at_scale"] = s.json();
        }
        v
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// One table of in-kernel figures, each row a series of the same runs as
/// the table's floor and harness.
struct Costs {
    floor: Series,
    harness: Series,
    rows: Vec<Row>,
}

struct Row {
    /// JSON key.
    key: &'static str,
    name: &'static str,
    ns: Series,
    /// Whether `TARGET_IN_KERNEL` applies.
    targeted: bool,
    /// The figures as timed, when `ns` is derived from them.
    timed: Option<Series>,
}

impl Row {
    fn new(key: &'static str, name: &'static str, ns: &Series, targeted: bool) -> Self {
        Self {
            key,
            name,
            ns: ns.clone(),
            targeted,
            timed: None,
        }
    }
}

const OUTBOUND: (&str, &str) = (
    "established_outbound",
    "established outbound (decap+SNAT+FIB)",
);
const RETURN: (&str, &str) = (
    "established_return",
    "established return (un-NAT+encap+FIB)",
);
const ICMP_ERROR: (&str, &str) = (
    "icmp_error_return",
    "ICMP error relayed (un-NAT quote+encap+FIB)",
);
const FLOOR: (&str, &str) = ("mac_swap_floor", "MAC swap + XDP_TX (floor)");

impl Costs {
    /// Whether a path meets the in-kernel target's two parts: at most 2x
    /// the floor, under 100 ns.
    fn met(&self, s: &Series) -> [bool; 2] {
        let ns = s.median();
        [ns <= 2.0 * self.floor.median(), ns < 100.0]
    }

    fn print(&self) {
        println!(
            "{:<44} {:>7} {:>8} {:>7} {:>8}  {:<36} target",
            "path", "ns/pkt", "x floor", "net ns", "timed", "runs (ns)"
        );
        for row in &self.rows {
            let s = &row.ns;
            let runs: Vec<String> = s.0.iter().map(|ns| format!("{ns:.1}")).collect();
            let target = if row.targeted {
                let [floor, ns] = self.met(s);
                format!("<= 2x floor: {}; < 100 ns: {}", met(floor), met(ns))
            } else {
                String::new()
            };
            let timed = row
                .timed
                .as_ref()
                .map_or(String::new(), |t| format!("{:.1}", t.median()));
            println!(
                "{:<44} {:>7.1} {:>8.2} {:>7.1} {timed:>8}  {:<36} {target}",
                row.name,
                s.median(),
                s.median() / self.floor.median(),
                s.median_less(&self.harness),
                runs.join(" "),
            );
        }
    }

    /// The rows, by key.
    fn json(&self) -> Value {
        let mut v = json!({});
        for row in &self.rows {
            let s = &row.ns;
            v[row.key] = json!({
                "ns_per_packet": tenths(s.median()),
                "net_ns_per_packet": tenths(s.median_less(&self.harness)),
                "runs_ns": s.0.iter().copied().map(tenths).collect::<Vec<_>>(),
                "ratio_to_floor": s.median() / self.floor.median(),
            });
            if let Some(t) = &row.timed {
                v[row.key]["timed_ns_per_packet"] = tenths(t.median()).into();
            }
            if row.targeted {
                let [floor, ns] = self.met(s);
                v[row.key]["target_met"] = (floor && ns).into();
                v[row.key]["within_2x_floor"] = floor.into();
                v[row.key]["under_100_ns"] = ns.into();
            }
        }
        v
    }
}

impl InKernel {
    fn single_runs(&self) -> Costs {
        Costs {
            floor: self.mac_swap_floor.clone(),
            harness: self.harness.clone(),
            rows: vec![
                Row::new(
                    "harness",
                    "empty program (timing harness)",
                    &self.harness,
                    false,
                ),
                Row::new(FLOOR.0, FLOOR.1, &self.mac_swap_floor, false),
                Row::new(
                    "flow_lookup_floor",
                    "MAC swap + one flow lookup",
                    &self.flow_lookup_floor,
                    false,
                ),
                Row::new(OUTBOUND.0, OUTBOUND.1, &self.outbound, true),
                Row::new(
                    "established_outbound_many_flows",
                    "established outbound, 4,096 flows in turn",
                    &self.outbound_many,
                    false,
                ),
                Row::new(RETURN.0, RETURN.1, &self.inbound, true),
                Row::new(
                    "new_flow_outbound",
                    "new flow outbound (creates state)",
                    &self.new_flow,
                    false,
                ),
                Row::new(ICMP_ERROR.0, ICMP_ERROR.1, &self.icmp_error, false),
            ],
        }
    }

    fn warm(&self) -> Costs {
        let w = &self.warm;
        // What restoring the frame and the tail call cost, run by run.
        let restore = w.restore_floor.less(&w.floor);
        let restored = |(key, name), s: &Series, targeted| Row {
            timed: Some(s.clone()),
            ..Row::new(key, name, &s.less(&restore), targeted)
        };
        Costs {
            floor: w.floor.clone(),
            harness: w.harness.clone(),
            rows: vec![
                Row::new(
                    "harness",
                    "empty program (the repeat loop)",
                    &w.harness,
                    false,
                ),
                Row::new(FLOOR.0, FLOOR.1, &w.floor, false),
                Row::new(
                    "restore_floor",
                    "restore + tail call + floor",
                    &w.restore_floor,
                    false,
                ),
                restored(OUTBOUND, &w.outbound, true),
                restored(RETURN, &w.inbound, true),
                restored(ICMP_ERROR, &w.icmp_error, false),
            ],
        }
    }

    fn print(&self) {
        println!(
            "In kernel, single runs (BPF_PROG_TEST_RUN): median of {RUNS} runs x {PER_RUN} single \
             runs on fresh frames ({NEW_FLOWS_PER_RUN} new flows), {BLOCK} of a path in a row in \
             turn; a run's figure is the mean of its middle {:.0}%",
            CENTRAL_SHARE * 100.0
        );
        self.single_runs().print();
        println!("Harness: {HARNESS_NOTE}");
        println!("Note: {LOOKUP_FLOOR_NOTE}");
        println!("Note: {MANY_FLOWS_NOTE}");
        println!();
        println!(
            "In kernel, warm (BPF_PROG_TEST_RUN's repeat): median of {RUNS} runs; a run's figure \
             is the mean of {WARM_TURNS} test runs of {WARM_REPEAT} repeats of every series in turn"
        );
        self.warm().print();
        println!("Warm: {WARM_NOTE}");
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "method": format!("BPF_PROG_TEST_RUN, median of {RUNS} runs; a run times {PER_RUN} \
                single runs on fresh frames (kernel-timed) of every series, {BLOCK} in a row in \
                turn, and its figure is the mean of the middle {:.0}%", CENTRAL_SHARE * 100.0),
            "runs": RUNS,
            "packets_per_run": PER_RUN,
            "new_flows_per_run": NEW_FLOWS_PER_RUN,
            "target": TARGET_IN_KERNEL,
            "lookup_floor_note": LOOKUP_FLOOR_NOTE,
            "many_flows_note": MANY_FLOWS_NOTE,
            "harness_note": HARNESS_NOTE,
        });
        let Value::Object(rows) = self.single_runs().json() else {
            unreachable!("rows by key");
        };
        v.as_object_mut().expect("an object").extend(rows);
        v["warm"] = self.warm().json();
        v["warm"]["method"] = format!(
            "BPF_PROG_TEST_RUN's repeat, median of {RUNS} runs; a run's figure is the mean of \
             {WARM_TURNS} test runs of {WARM_REPEAT} repeats of every series in turn"
        )
        .into();
        v["warm"]["note"] = WARM_NOTE.into();
        v
    }
}

/// The end-to-end figures of both gateways.
pub struct Gateways {
    pub ebpf: EndToEnd,
    pub kernel: EndToEnd,
}

impl Gateways {
    /// Each fabric with both gateways' UDP rates through it: delivered,
    /// offered.
    fn udp_rates(&self) -> impl Iterator<Item = (Fabric, Paired, Paired)> {
        let pair = |rates: [&Vec<Rate>; 2], figure: fn(&Rate) -> f64| {
            Paired::of(rates[0].iter().map(figure), rates[1].iter().map(figure))
        };
        Fabric::ALL.into_iter().enumerate().map(move |(f, fabric)| {
            let rates = [&self.ebpf.udp[f], &self.kernel.udp[f]];
            (
                fabric,
                pair(rates, |r| r.delivered_pps),
                pair(rates, |r| r.offered_pps),
            )
        })
    }

    fn tcp(&self) -> Paired {
        Paired::of(
            self.ebpf.tcp_bps.iter().copied(),
            self.kernel.tcp_bps.iter().copied(),
        )
    }

    fn p99_lower(&self) -> bool {
        self.ebpf.percentile_us(0.99) < self.kernel.percentile_us(0.99)
    }

    fn print(&self) {
        println!("End to end: client -> router -> gateway -> server, in network namespaces");
        println!("{TURNS_NOTE}");
        println!(
            "{:<36} {:>12} {:>12} {:>12}  target",
            "figure", "eBPF", "kernel NAT", "eBPF/kernel"
        );
        let row = |name: &str, ebpf: f64, kernel: f64, ratio: Option<f64>, target: String| {
            let ratio = ratio.map_or(String::new(), |r| format!("{r:.2}"));
            println!("{name:<36} {ebpf:>12.3} {kernel:>12.3} {ratio:>12}  {target}");
        };
        let paired = |name: &str, p: &Paired, unit: f64, target: Option<String>| {
            let ratio = target.is_some().then(|| p.ratio());
            row(
                name,
                p.ebpf() / unit,
                p.kernel() / unit,
                ratio,
                target.unwrap_or_default(),
            );
            let turns = |v: &[f64]| -> String {
                v.iter()
                    .map(|x| format!("{:.2}", x / unit))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            println!(
                "  turns: eBPF {}; kernel {}",
                turns(&p.ebpf),
                turns(&p.kernel)
            );
        };
        for (fabric, delivered, offered) in self.udp_rates() {
            paired(
                &format!("UDP 64-byte, {} (Mpps)", fabric.name()),
                &delivered,
                1e6,
                Some(format!(
                    "{TARGET_RATE}: {}",
                    met(delivered.ratio() >= RATE_TARGET_RATIO)
                )),
            );
            paired("  offered by the generator (Mpps)", &offered, 1e6, None);
        }
        paired(
            "TCP, 1 stream (Gbit/s)",
            &self.tcp(),
            1e9,
            Some(String::new()),
        );
        for (key, q) in PERCENTILES {
            let target = if key == "p99" {
                format!("{TARGET_P99}: {}", met(self.p99_lower()))
            } else {
                String::new()
            };
            let (ebpf, kernel) = (self.ebpf.percentile_us(q), self.kernel.percentile_us(q));
            row(
                &format!("UDP request/response {key} (us)"),
                ebpf,
                kernel,
                Some(ebpf / kernel),
                target,
            );
        }
        println!(
            "  ({RR_ROUNDS} requests each; lost: eBPF {}, kernel {})",
            self.ebpf.lost, self.kernel.lost
        );
        println!("Fabrics: {FABRIC_NOTE}");
        println!("Generator: {GENERATOR}");
        println!("Note: {BASELINE_NOTE}");
    }

    fn json(&self) -> Value {
        let latency = |e: &EndToEnd| -> Value {
            let mut v = json!({ "requests": e.rtts.len(), "lost": e.lost });
            for (key, q) in PERCENTILES {
                v[key] = e.percentile_us(q).into();
            }
            v
        };
        let mut latency_ratio = json!({});
        for (key, q) in PERCENTILES {
            latency_ratio[key] = (self.ebpf.percentile_us(q) / self.kernel.percentile_us(q)).into();
        }
        let mut udp = json!({
            "turns": TRIALS,
            "interval_s": RATE_INTERVAL.as_secs_f64(),
            "fabric_note": FABRIC_NOTE,
            "target": TARGET_RATE,
        });
        for (fabric, delivered, offered) in self.udp_rates() {
            let mut v = delivered.json("pps");
            v["offered"] = offered.json("pps");
            v["target_met"] = (delivered.ratio() >= RATE_TARGET_RATIO).into();
            udp[fabric.key()] = v;
        }
        let mut tcp = self.tcp().json("bps");
        tcp["streams"] = 1.into();
        tcp["turns"] = TRIALS.into();
        tcp["interval_s"] = TCP_INTERVAL.as_secs_f64().into();
        json!({
            "method": TURNS_NOTE,
            "generator": GENERATOR,
            "baseline_note": BASELINE_NOTE,
            "udp_small_packet_rate": udp,
            "tcp_throughput": tcp,
            "rr_latency_us": {
                "requests": RR_ROUNDS,
                "ebpf": latency(&self.ebpf),
                "kernel": latency(&self.kernel),
                "ratio_ebpf_to_kernel": latency_ratio,
                "target_p99": TARGET_P99,
                "target_p99_met": self.p99_lower(),
            },
        })
    }
}

impl StateAtScale {
    fn print(&self) {
        println!("Connection state at {FLOWS} flows (UDP, one mapping each)");
        println!(
            "{:<36} {:.0}/s ({} ns each; in-kernel time of BPF_PROG_TEST_RUN, {NEW_FLOWS} flows)",
            "new flows through the data path",
            self.new_flows_per_s(),
            self.new_flow.as_nanos()
        );
        for (map, bytes) in self.memory {
            println!(
                "{:<36} {:.1} MiB",
                format!("memory of {map}"),
                bytes as f64 / f64::from(1 << 20)
            );
        }
        let (keep, expire) = (&self.sweep_nothing_expired, &self.sweep_all_expired);
        println!(
            "{:<36} {:.2?} ({} live)",
            "GC sweep, nothing expired", keep.took, keep.live
        );
        println!(
            "{:<36} {:.2?} ({} flows, {} mappings removed)",
            "GC sweep, all expired", expire.took, expire.expired, expire.mappings_expired
        );
        println!(
            "  (filling the table from userspace took {:.1?})",
            self.fill
        );
    }

    fn json(&self) -> Value {
        let mut memory = json!({});
        for (map, bytes) in self.memory {
            memory[map] = bytes.into();
        }
        json!({
            "flows": FLOWS,
            "new_flows_per_s": self.new_flows_per_s(),
            "new_flows_measured": NEW_FLOWS,
            "memory_bytes": memory,
            "gc_sweep_s": {
                "nothing_expired": self.sweep_nothing_expired.took.as_secs_f64(),
                "all_expired": self.sweep_all_expired.took.as_secs_f64(),
            },
        })
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}
