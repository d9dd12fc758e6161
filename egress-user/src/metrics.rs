//! Prometheus metrics of `egress run --metrics ADDR`: the pinned state is
//! read at scrape time (off the runtime's only thread), and served with a
//! minimal HTTP/1.1 responder on `/metrics` and `/healthz`.

use std::{
    collections::BTreeMap,
    fmt::{Display, Write as _},
    net::Ipv4Addr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use egress_common::flow::{FlowKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{
    gc::{SharedAllowed, Sweep, Unfinished},
    inspect::{Conn, Pinned, PortsInUse, proto_name},
    reorder,
    tunnel_errors::Kind,
    tunnel_relay,
};

/// Upper bounds of the RTT histogram buckets, in seconds.
const RTT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// A request head larger than this, or slower than `REQUEST_TIMEOUT`, is
/// dropped: only scrapers talk to this port.
const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A response the client has not taken within this is abandoned.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections answered at once; one more is closed unanswered. Scrapers
/// are few: this bounds what a flood of connections can hold (a task each,
/// and a copy of the metrics each while they are sent).
const MAX_CONNECTIONS: usize = 16;

/// Reads the state and keeps what must persist between scrapes.
pub struct Collector {
    pinned: Pinned,
    /// Flows exported one by one, the largest by bytes.
    top_flows: usize,
    /// Translation ports per address and protocol.
    port_capacity: u64,
    /// The policy as of now: each configured peer and translation address
    /// has its series, in use or not (idle shows 0, not a gap).
    allowed: SharedAllowed,
    seen: Mutex<Seen>,
    gc: Mutex<GcTotals>,
    /// Held fragments by [`reorder::Outcome`], in the order of its `ALL`.
    held: Mutex<[u64; reorder::Outcome::ALL.len()]>,
    /// Routers' errors about our tunnel packets to peers, by
    /// [`Kind::index`].
    tunnel_errors: [AtomicU64; Kind::NAMES.len()],
    /// Those errors passed on to the servers, or why not, by
    /// [`tunnel_relay::Outcome`], in the order of its `ALL`.
    relays: [AtomicU64; tunnel_relay::Outcome::ALL.len()],
}

/// What earlier scrapes observed, so each flow is counted once.
#[derive(Default)]
struct Seen {
    /// Flows by outbound key and creation time.
    flows: FxHashSet<(FlowKey, u64)>,
    created: u64,
    /// RTTs by outbound key, leg and handshake time stamp (a reopened
    /// connection has a new handshake and a new RTT).
    rtts: FxHashSet<(FlowKey, Leg, u64)>,
    tunnel: Histogram,
    internet: Histogram,
    /// Counts last exported per top flow (see [`Collector::top`]).
    exported: FxHashMap<(FlowKey, u64), Counts>,
}

impl Seen {
    /// Takes `conns` as the live flows; with `count`, counts those and
    /// the RTTs not seen before.
    fn update(&mut self, conns: &[Conn], count: bool) {
        let mut flows = FxHashSet::with_capacity_and_hasher(conns.len(), Default::default());
        let mut rtts = FxHashSet::default();
        for c in conns {
            let key = c.out.out_key();
            flows.insert((key, c.out.created_ns));
            for (leg, half, histogram) in [
                (Leg::Tunnel, &c.out, &mut self.tunnel),
                (Leg::Internet, &c.inb, &mut self.internet),
            ] {
                if half.rtt_ns == 0 {
                    continue;
                }
                let id = (key, leg, half.handshake_ns);
                if count && !self.rtts.contains(&id) {
                    histogram.observe(half.rtt_ns as f64 / 1e9);
                }
                rtts.insert(id);
            }
        }
        if count {
            self.created += flows.difference(&self.flows).count() as u64;
        }
        // Only live flows are remembered: the sets stay as big as the table.
        self.flows = flows;
        self.rtts = rtts;
    }
}

/// A flow's packets and bytes, outbound and return.
type Counts = [u64; 4];

fn counts(c: &Conn) -> Counts {
    [c.out.packets, c.out.bytes, c.inb.packets, c.inb.bytes]
}

/// Raises the counts of the first `top` of `conns` (every live flow) that
/// an earlier scrape exported higher to what it exported, and returns what
/// each live flow was last exported with.
///
/// A read can miss counts the data path moves from its cache to the table
/// meanwhile (see `inspect::counted_flows`), and a counter must never go
/// back: Prometheus would take it for a reset. A flow that drops out of
/// the top and comes back is held to what it last showed, too.
fn never_back(
    before: &FxHashMap<(FlowKey, u64), Counts>,
    conns: &mut [Conn],
    top: usize,
) -> FxHashMap<(FlowKey, u64), Counts> {
    let id = |c: &Conn| (c.out.out_key(), c.out.created_ns);
    let mut exported: FxHashMap<_, _> = conns
        .iter()
        .filter_map(|c| Some((id(c), *before.get(&id(c))?)))
        .collect();
    for c in conns.iter_mut().take(top) {
        let mut now = counts(c);
        if let Some(before) = exported.get(&id(c)) {
            for (n, b) in now.iter_mut().zip(before) {
                *n = (*n).max(*b);
            }
        }
        [c.out.packets, c.out.bytes, c.inb.packets, c.inb.bytes] = now;
        exported.insert(id(c), now);
    }
    exported
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Leg {
    Tunnel,
    Internet,
}

#[derive(Debug, Default, PartialEq)]
struct GcTotals {
    runs: u64,
    last: Duration,
    flows_expired: u64,
    flows_disallowed: u64,
    mappings_expired: u64,
}

impl GcTotals {
    /// Counts what a sweep removed, finished or not; and a finished one
    /// as a run, with its duration.
    fn record(&mut self, result: &Result<Sweep, Unfinished>) {
        let sweep = match result {
            Ok(sweep) => {
                self.runs += 1;
                self.last = sweep.took;
                sweep
            }
            Err(unfinished) => &unfinished.sweep,
        };
        self.flows_expired += sweep.expired as u64;
        self.flows_disallowed += sweep.disallowed as u64;
        self.mappings_expired += sweep.mappings_expired as u64;
    }
}

#[derive(Default)]
struct Histogram {
    /// Observations at or below each bucket's bound (cumulative).
    buckets: [u64; RTT_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (n, le) in self.buckets.iter_mut().zip(RTT_BUCKETS) {
            *n += u64::from(seconds <= le);
        }
        self.count += 1;
        self.sum += seconds;
    }
}

impl Collector {
    pub fn new(
        pinned: Pinned,
        top_flows: usize,
        port_capacity: u64,
        allowed: SharedAllowed,
    ) -> Self {
        // The flows a restarted daemon finds were counted (and their round
        // trips observed) by the daemon before it.
        let mut seen = Seen::default();
        match pinned.flows() {
            Ok((conns, _)) => seen.update(&conns, false),
            Err(e) => tracing::warn!("metrics: cannot read the flows already there: {e:#}"),
        }
        Self {
            pinned,
            top_flows,
            port_capacity,
            allowed,
            seen: Mutex::new(seen),
            gc: Mutex::default(),
            held: Mutex::default(),
            tunnel_errors: Default::default(),
            relays: Default::default(),
        }
    }

    /// Records a garbage-collection sweep.
    pub fn record_sweep(&self, result: &Result<Sweep, Unfinished>) {
        let mut gc = self.gc.lock().unwrap_or_else(PoisonError::into_inner);
        gc.record(result);
    }

    /// Records what became of a held fragment.
    pub fn record_held(&self, outcome: reorder::Outcome) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held[outcome as usize] += 1;
    }

    /// Records a router's error about our tunnel packets to a peer.
    pub fn record_tunnel_error(&self, kind: Kind) {
        self.tunnel_errors[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Records what became of a router's error relayed by its kind.
    pub fn record_relay(&self, outcome: tunnel_relay::Outcome) {
        self.relays[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The metrics in Prometheus text format (0.0.4).
    pub fn render(&self) -> anyhow::Result<String> {
        let mut t = Text::default();
        t.family(
            "egress_packets_total",
            "counter",
            "Packets by what the data path did with them.",
        );
        for (reason, packets) in self.pinned.stats()? {
            t.sample(
                "egress_packets_total",
                &[
                    ("reason", reason.as_str()),
                    ("verdict", reason.verdict().as_str()),
                ],
                packets,
            );
        }

        let (conns, flow_entries) = self.pinned.flows()?;
        self.observe(&conns, &mut t);
        t.single(
            "egress_flows_active",
            "gauge",
            "Flows in the table (both halves present).",
            conns.len(),
        );
        {
            let gc = self.gc.lock().unwrap_or_else(PoisonError::into_inner);
            t.single(
                "egress_flows_expired_total",
                "counter",
                "Flows removed idle by the garbage collector.",
                gc.flows_expired,
            );
            t.single(
                "egress_flows_disallowed_total",
                "counter",
                "Flows removed by the garbage collector because the policy no longer allows them.",
                gc.flows_disallowed,
            );
            t.single(
                "egress_mappings_expired_total",
                "counter",
                "Mappings removed by the garbage collector.",
                gc.mappings_expired,
            );
            t.single(
                "egress_gc_runs_total",
                "counter",
                "Garbage-collection sweeps completed.",
                gc.runs,
            );
            t.single(
                "egress_gc_last_duration_seconds",
                "gauge",
                "How long the last sweep took.",
                gc.last.as_secs_f64(),
            );
        }
        t.family(
            "egress_held_fragments_total",
            "counter",
            "Returning later fragments that came before their first, held by the daemon, \
             by what became of them.",
        );
        let held = *self.held.lock().unwrap_or_else(PoisonError::into_inner);
        for (outcome, n) in reorder::Outcome::ALL.into_iter().zip(held) {
            t.sample(
                "egress_held_fragments_total",
                &[("outcome", outcome.as_str())],
                n,
            );
        }

        let name = "egress_tunnel_errors_total";
        t.family(
            name,
            "counter",
            "ICMP errors from routers on the way to a peer about our tunnel packets, by \
             error: from \"fragmentation needed\" the kernel lowers its path MTU toward the \
             peer (`ip route get PEER` shows it); the others mean returning packets to the \
             peer are lost (the log says which peer and why).",
        );
        for (error, n) in Kind::NAMES.iter().zip(&self.tunnel_errors) {
            t.sample(name, &[("error", error)], n.load(Ordering::Relaxed));
        }
        let name = "egress_tunnel_error_relays_total";
        t.family(
            name,
            "counter",
            "Routers' unreachable and time exceeded errors about our tunnel packets, passed on \
             to the Internet host whose packet was lost as host unreachable (RFC 2003), by \
             outcome: relayed, or why not.",
        );
        for (outcome, n) in tunnel_relay::Outcome::ALL.iter().zip(&self.relays) {
            t.sample(
                name,
                &[("outcome", outcome.as_str())],
                n.load(Ordering::Relaxed),
            );
        }

        let (ports, mapping_entries) = self.pinned.ports_in_use()?;
        let occupancy = self.pinned.occupancy(flow_entries, mapping_entries)?;
        t.family(
            "egress_table_entries",
            "gauge",
            "Entries in each state map.",
        );
        for o in &occupancy {
            t.sample("egress_table_entries", &[("map", o.map)], o.entries);
        }
        t.family(
            "egress_table_entries_limit",
            "gauge",
            "Capacity of each state map.",
        );
        for o in &occupancy {
            t.sample("egress_table_entries_limit", &[("map", o.map)], o.capacity);
        }

        let (snat, peers) = {
            let allowed = self.allowed.read().unwrap_or_else(PoisonError::into_inner);
            let peers: Vec<[u8; 4]> = allowed.admission.peers.iter().map(|p| p.octets()).collect();
            (allowed.snat.clone(), peers)
        };
        nat_ports(&mut t, &snat, &ports, self.port_capacity);

        Self::per_address(&conns, &mut t, "client", |c| c.out.client_addr, &[]);
        // Which peer carries which flows: after a failover, the flows move.
        Self::per_address(&conns, &mut t, "peer", |c| c.out.peer_addr, &peers);
        self.top(conns, &mut t);
        Ok(t.0)
    }

    /// Counts flows and RTTs not seen before, and writes the totals.
    fn observe(&self, conns: &[Conn], t: &mut Text) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.update(conns, true);
        t.single(
            "egress_flows_created_total",
            "counter",
            "Flows created since this daemon started (first seen by it).",
            seen.created,
        );
        let name = "egress_tcp_handshake_rtt_seconds";
        t.family(name, "histogram", "TCP handshake round trips: tunnel leg (SYN-ACK to the client's ACK) and Internet leg (SYN to SYN-ACK).");
        for (leg, h) in [("tunnel", &seen.tunnel), ("internet", &seen.internet)] {
            for (le, n) in RTT_BUCKETS.iter().zip(h.buckets) {
                t.sample(
                    &format!("{name}_bucket"),
                    &[("leg", leg), ("le", &le.to_string())],
                    n,
                );
            }
            t.sample(
                &format!("{name}_bucket"),
                &[("leg", leg), ("le", "+Inf")],
                h.count,
            );
            t.sample(&format!("{name}_sum"), &[("leg", leg)], h.sum);
            t.sample(&format!("{name}_count"), &[("leg", leg)], h.count);
        }
    }

    /// Flows and bytes of live flows per address on one side: `label`
    /// (`client` or `peer`, which also names the families) and `addr`, the
    /// flow's address there; every one of `always` has series, 0 without
    /// flows.
    fn per_address(
        conns: &[Conn],
        t: &mut Text,
        label: &str,
        addr: fn(&Conn) -> [u8; 4],
        always: &[[u8; 4]],
    ) {
        let mut sums: FxHashMap<[u8; 4], (u64, u64, u64)> =
            always.iter().map(|a| (*a, (0, 0, 0))).collect();
        for c in conns {
            let e = sums.entry(addr(c)).or_default();
            *e = (e.0 + 1, e.1 + c.out.bytes, e.2 + c.inb.bytes);
        }
        let mut sums: Vec<_> = sums.into_iter().collect();
        sums.sort_unstable();
        let flows = format!("egress_{label}_flows");
        t.family(&flows, "gauge", &format!("Live flows per {label} address."));
        for (a, (n, _, _)) in &sums {
            let a = Ipv4Addr::from(*a).to_string();
            t.sample(&flows, &[(label, &a)], n);
        }
        let bytes = format!("egress_{label}_flow_bytes");
        let help = format!("Bytes (IP length) carried by each {label}'s live flows, by direction.");
        t.family(&bytes, "gauge", &help);
        for (a, (_, out, back)) in &sums {
            let a = Ipv4Addr::from(*a).to_string();
            for (direction, n) in [("out", out), ("in", back)] {
                t.sample(&bytes, &[(label, &a), ("direction", direction)], n);
            }
        }
    }

    /// Packets and bytes of the largest flows, one series each.
    fn top(&self, mut conns: Vec<Conn>, t: &mut Text) {
        conns.sort_unstable_by_key(|c| std::cmp::Reverse(c.bytes()));
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.exported = never_back(&seen.exported, &mut conns, self.top_flows);
        }
        conns.truncate(self.top_flows);
        for (name, help, value) in [
            (
                "egress_flow_packets_total",
                "Packets of the largest flows by bytes, by direction.",
                (|h: &egress_common::flow::Flow| h.packets) as fn(&_) -> u64,
            ),
            (
                "egress_flow_bytes_total",
                "Bytes (IP length) of the largest flows by bytes, by direction.",
                |h| h.bytes,
            ),
        ] {
            t.family(name, "counter", help);
            for c in &conns {
                let (client, translation, remote) = (
                    c.client().to_string(),
                    c.translation().to_string(),
                    c.remote().to_string(),
                );
                for (direction, half) in [("out", &c.out), ("in", &c.inb)] {
                    t.sample(
                        name,
                        &[
                            ("client", &client),
                            ("translation", &translation),
                            ("remote", &remote),
                            ("proto", c.proto()),
                            ("direction", direction),
                        ],
                        value(half),
                    );
                }
            }
        }
    }
}

/// Ports reserved (`in_use`) and available (`capacity` each) per
/// translation address and protocol: every address of `snat` has both
/// series for each protocol, 0 while idle, as do addresses with ports in
/// use (one no longer in `snat` until the sweep removes its mappings).
fn nat_ports(t: &mut Text, snat: &[Ipv4Addr], in_use: &[PortsInUse], capacity: u64) {
    let protos = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP].map(proto_name);
    let mut used: BTreeMap<(Ipv4Addr, &str), u64> = snat
        .iter()
        .flat_map(|&addr| protos.map(|proto| ((addr, proto), 0)))
        .collect();
    used.extend(in_use.iter().map(|&(addr, proto, n)| ((addr, proto), n)));
    for (name, help, limit) in [
        (
            "egress_nat_ports",
            "Translation ports (ICMP: identifiers) reserved.",
            None,
        ),
        (
            "egress_nat_ports_limit",
            "Translation ports available per address and protocol.",
            Some(capacity),
        ),
    ] {
        t.family(name, "gauge", help);
        for (&(addr, proto), &n) in &used {
            let labels = [("address", &*addr.to_string()), ("proto", proto)];
            t.sample(name, &labels, limit.unwrap_or(n));
        }
    }
}

/// Prometheus text exposition being written.
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// A family of one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    format!("{k}=\"{v}\"")
                })
                .collect();
            let _ = write!(self.0, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Answers scrapes on `listener` until the runtime stops.
pub async fn serve(
    listener: std::net::TcpListener,
    collector: Arc<Collector>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true).context("metrics listener")?;
    let listener = TcpListener::from_std(listener).context("metrics listener")?;
    // One render at a time: each reads the whole flow table, so scrapes
    // arriving together queue rather than multiply that work.
    let render = Arc::new(Semaphore::new(1));
    answer_each(listener, MAX_CONNECTIONS, move |stream| {
        let (collector, render) = (collector.clone(), render.clone());
        async move { respond(stream, collector, &render).await }
    })
    .await
}

/// Accepts connections on `listener` and answers each with `answer` on a
/// task of its own, at most `limit` at a time: a connection past the limit
/// is closed unanswered.
async fn answer_each<F, A>(listener: TcpListener, limit: usize, answer: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream) -> A,
    A: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let open = Arc::new(Semaphore::new(limit));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: {limit} connections open, closing one more");
            continue;
        };
        let answering = answer(stream);
        tokio::spawn(async move {
            if let Err(e) = answering.await {
                tracing::debug!(%peer, "metrics request failed: {e:#}");
            }
            drop(permit);
        });
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Page {
    Metrics,
    Health,
    NotFound,
    NotAllowed,
}

/// The page the request with head `head` asks for. A query string (a
/// scrape config's `params`) asks for the same page.
fn page(head: &str) -> Page {
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    match (method, path) {
        ("GET", "/metrics") => Page::Metrics,
        ("GET", "/healthz") => Page::Health,
        ("GET", _) => Page::NotFound,
        _ => Page::NotAllowed,
    }
}

async fn respond(
    mut stream: TcpStream,
    collector: Arc<Collector>,
    render: &Semaphore,
) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            anyhow::ensure!(head.len() < MAX_REQUEST, "request head too large");
            let n = stream.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "connection closed mid-request");
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await
    .context("request too slow")??;
    let (status, body) = match page(&String::from_utf8_lossy(&head)) {
        Page::Metrics => {
            // Dumping the maps takes a while at a million flows: off the
            // runtime's thread, which answers signals and interface changes.
            let _turn = render.acquire().await?;
            match tokio::task::spawn_blocking(move || collector.render()).await? {
                Ok(text) => ("200 OK", text),
                Err(e) => (
                    "500 Internal Server Error",
                    format!("cannot read the gateway state: {e:#}\n"),
                ),
            }
        }
        Page::Health => ("200 OK", "ok\n".to_owned()),
        Page::NotFound => (
            "404 Not Found",
            "not found: try /metrics or /healthz\n".to_owned(),
        ),
        Page::NotAllowed => ("405 Method Not Allowed", "only GET\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(RESPONSE_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .context("response not taken in time")??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection answered by a task that waits for a byte from the
    /// client, then sends "ok": the connection stays open until then.
    async fn ok_after_a_byte(mut stream: TcpStream) -> anyhow::Result<()> {
        stream.read_exact(&mut [0u8]).await?;
        stream.write_all(b"ok").await?;
        Ok(())
    }

    /// What the server sends on `stream` after `byte` (none: nothing).
    async fn answer(stream: &mut TcpStream, byte: Option<u8>) -> Vec<u8> {
        if let Some(b) = byte {
            stream.write_all(&[b]).await.unwrap();
        }
        let mut got = Vec::new();
        let read = stream.read_to_end(&mut got);
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the server answers or closes")
            .unwrap();
        got
    }

    #[test]
    fn requests_ask_for_pages_by_path_alone() {
        for (head, page_asked) in [
            ("GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n", Page::Metrics),
            ("GET /metrics?module=egress HTTP/1.1\r\n\r\n", Page::Metrics),
            ("GET /healthz? HTTP/1.0\r\n\r\n", Page::Health),
            ("GET /metricsx HTTP/1.1\r\n\r\n", Page::NotFound),
            ("GET /?/metrics HTTP/1.1\r\n\r\n", Page::NotFound),
            ("POST /metrics HTTP/1.1\r\n\r\n", Page::NotAllowed),
            ("\r\n\r\n", Page::NotAllowed),
        ] {
            assert_eq!(page(head), page_asked, "{head:?}");
        }
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_unanswered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(answer_each(listener, 2, ok_after_a_byte));
        let mut open = Vec::new();
        for _ in 0..2 {
            open.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert_eq!(answer(&mut third, None).await, b"");
        // Answered connections make room again.
        assert_eq!(answer(&mut open[0], Some(1)).await, b"ok");
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        assert_eq!(answer(&mut fourth, Some(1)).await, b"ok");
        assert_eq!(answer(&mut open[1], Some(1)).await, b"ok");
    }
    use egress_common::flow::Flow;

    fn conn(created_ns: u64, counts: Counts) -> Conn {
        let [out_packets, out_bytes, in_packets, in_bytes] = counts;
        let half = |packets, bytes| Flow {
            client_port: 40000u16.to_be_bytes(),
            created_ns,
            packets,
            bytes,
            ..Flow::default()
        };
        Conn {
            out: half(out_packets, out_bytes),
            inb: half(in_packets, in_bytes),
        }
    }

    fn exported(conns: &[Conn]) -> Vec<Counts> {
        conns.iter().map(counts).collect()
    }

    #[test]
    fn an_exported_count_never_goes_back() {
        let mut first = [conn(1, [5, 500, 4, 400])];
        let before = never_back(&FxHashMap::default(), &mut first, 1);
        assert_eq!(exported(&first), [[5, 500, 4, 400]]);

        // A read that missed counts in flight: held at the last export,
        // each count on its own.
        let mut second = [conn(1, [3, 300, 6, 600])];
        let before = never_back(&before, &mut second, 1);
        assert_eq!(exported(&second), [[5, 500, 6, 600]]);

        // Out of the top one behind a larger flow, then back with a read
        // that missed counts: held at what it showed two scrapes ago.
        let mut third = [conn(9, [9, 900, 9, 900]), conn(1, [5, 500, 6, 600])];
        let before = never_back(&before, &mut third, 1);
        let mut fourth = [conn(1, [4, 400, 6, 600]), conn(9, [1, 100, 1, 100])];
        let before = never_back(&before, &mut fourth, 1);
        assert_eq!(exported(&fourth[..1]), [[5, 500, 6, 600]]);

        // A new flow on the same tuple starts from its own counts.
        let mut fifth = [conn(2, [1, 100, 0, 0])];
        never_back(&before, &mut fifth, 1);
        assert_eq!(exported(&fifth), [[1, 100, 0, 0]]);
    }

    /// What a sweep that ended part way removed is counted, but not as a
    /// run, nor is its duration taken as the last sweep's.
    #[test]
    fn a_cut_short_sweep_counts_its_removals_but_not_as_a_run() {
        let sweep = |expired, mappings_expired, secs| Sweep {
            expired,
            disallowed: 1,
            mappings_expired,
            took: Duration::from_secs(secs),
            ..Sweep::default()
        };
        let mut totals = GcTotals::default();
        totals.record(&Ok(sweep(3, 2, 1)));
        totals.record(&Err(Unfinished {
            sweep: sweep(5, 0, 7),
            error: anyhow::anyhow!("Operation not permitted"),
        }));
        assert_eq!(
            totals,
            GcTotals {
                runs: 1,
                last: Duration::from_secs(1),
                flows_expired: 8,
                flows_disallowed: 2,
                mappings_expired: 2,
            }
        );
    }

    /// Every configured translation address has a series per protocol,
    /// 0 while idle (an idle address was a gap); one no longer configured
    /// keeps its series while it has ports in use.
    #[test]
    fn every_translation_address_has_its_port_series() {
        let (a, b, old) = (
            Ipv4Addr::new(10, 1, 1, 10),
            Ipv4Addr::new(10, 1, 1, 11),
            Ipv4Addr::new(10, 1, 1, 9),
        );
        let mut t = Text::default();
        nat_ports(&mut t, &[a, b], &[(a, "udp", 3), (old, "tcp", 1)], 100);
        let samples: Vec<&str> = t.0.lines().filter(|l| !l.starts_with('#')).collect();
        let series = |name: &str, values: [u64; 7]| {
            let old_tcp = [(old, "tcp")];
            let configured = [a, b].map(|addr| ["icmp", "tcp", "udp"].map(|proto| (addr, proto)));
            old_tcp
                .into_iter()
                .chain(configured.into_iter().flatten())
                .zip(values)
                .map(|((addr, proto), n)| {
                    format!("{name}{{address=\"{addr}\",proto=\"{proto}\"}} {n}")
                })
                .collect::<Vec<_>>()
        };
        let expected = [
            series("egress_nat_ports", [1, 0, 0, 3, 0, 0, 0]),
            series("egress_nat_ports_limit", [100; 7]),
        ]
        .concat();
        assert_eq!(samples, expected);
    }

    #[test]
    fn flows_found_at_start_are_not_counted_again() {
        let with_rtt = |created_ns| {
            let mut c = conn(created_ns, [1, 100, 1, 100]);
            c.out.rtt_ns = 2_000_000;
            c.out.handshake_ns = created_ns;
            c
        };
        let mut seen = Seen::default();
        seen.update(&[with_rtt(1)], false);
        seen.update(&[with_rtt(1)], true);
        assert_eq!((seen.created, seen.tunnel.count), (0, 0));
        // A flow created since, on the same tuple.
        seen.update(&[with_rtt(2)], true);
        assert_eq!((seen.created, seen.tunnel.count), (1, 1));
    }
}
