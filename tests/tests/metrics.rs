//! Observability through the real gateway (`EGRESS_BIN`): after UDP
//! exchanges of known sizes and a TCP connection, `/metrics` (parsed by the
//! independent `prometheus_client` Python parser) and `egress flows --json`
//! must report exactly that traffic. Needs root.

use anyhow::{Context as _, Result, ensure};
use std::net::SocketAddr;
use std::path::Path;
use tests::addrs::{CLIENT_TUN_IP, CLIENT_UNDERLAY_IP, SERVER_IP};
use tests::echo::{tcp_request, tcp_server, udp_request, udp_server};
use tests::topology::Attach;
use tests::{Stack, egress_bin, exec, require_root};

const METRICS: &str = "127.0.0.1:9464";
const UDP_PORT: u16 = 9000;
const TCP_PORT: u16 = 9001;
/// UDP request payloads: one flow each.
const UDP_SIZES: [usize; 3] = [100, 400, 1000];
const IP_UDP_HEADERS: u64 = 28;
/// A second configured peer that sends nothing.
const IDLE_PEER: &str = "10.0.1.99";

/// Prints the families of a Prometheus text exposition on stdin as JSON:
/// `[{"name", "type", "samples": [{"name", "labels", "value"}]}]`.
const PARSE_PY: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
print(json.dumps([
    {"name": f.name, "type": f.type,
     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
]))
"#;

struct Family {
    name: String,
    kind: String,
    samples: Vec<Sample>,
}

struct Sample {
    name: String,
    labels: serde_json::Map<String, serde_json::Value>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> &str {
        self.labels.get(key).and_then(|v| v.as_str()).unwrap_or("")
    }
}

fn scrape(stack: &Stack) -> Result<Vec<Family>> {
    let text = exec(
        &stack.topo.gateway,
        &format!("curl -sS --max-time 10 http://{METRICS}/metrics"),
    )?;
    let script = stack.topo.lab.dir().join("parse_metrics.py");
    std::fs::write(&script, PARSE_PY)?;
    let exposition = stack.topo.lab.dir().join("metrics.txt");
    std::fs::write(&exposition, &text)?;
    let out = std::process::Command::new("python3")
        .arg(&script)
        .stdin(std::fs::File::open(&exposition)?)
        .output()?;
    ensure!(
        out.status.success(),
        "prometheus_client rejected the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(families
        .iter()
        .map(|f| Family {
            name: f["name"].as_str().unwrap_or_default().to_owned(),
            kind: f["type"].as_str().unwrap_or_default().to_owned(),
            samples: f["samples"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| Sample {
                    name: s["name"].as_str().unwrap_or_default().to_owned(),
                    labels: s["labels"].as_object().cloned().unwrap_or_default(),
                    value: s["value"].as_f64().unwrap_or(f64::NAN),
                })
                .collect(),
        })
        .collect())
}

fn samples<'a>(families: &'a [Family], name: &str) -> impl Iterator<Item = &'a Sample> {
    families
        .iter()
        .flat_map(|f| &f.samples)
        .filter(move |s| s.name == name)
}

/// Runs UDP exchanges of `UDP_SIZES` and one TCP connection through a
/// gateway serving metrics; returns the UDP (request, reply) IP lengths.
fn traffic(stack: &Stack) -> Result<Vec<(u64, u64)>> {
    let udp = SocketAddr::from((SERVER_IP, UDP_PORT));
    let tcp = SocketAddr::from((SERVER_IP, TCP_PORT));
    let _udp_server = udp_server(&stack.topo.server, udp)?;
    let _tcp_server = tcp_server(&stack.topo.server, tcp)?;
    let mut lengths = Vec::new();
    for size in UDP_SIZES {
        let reply = udp_request(&stack.topo.client, CLIENT_TUN_IP, udp, &vec![b'x'; size])?;
        // The echo reply is "<seen address>\n<request>".
        let reply_len = reply.seen.to_string().len() + 1 + size;
        lengths.push((
            size as u64 + IP_UDP_HEADERS,
            reply_len as u64 + IP_UDP_HEADERS,
        ));
    }
    tcp_request(&stack.topo.client, CLIENT_TUN_IP, tcp, b"hello")?;
    Ok(lengths)
}

#[test]
fn metrics_and_flows_match_the_traffic() -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let stack = Stack::start_with(
        &egress,
        Path::new(env!("CARGO_BIN_EXE_ipip-peer")),
        Attach::Native,
        &format!("--metrics {METRICS} --peer {IDLE_PEER}"),
    )?;
    stack.topo.lab.keep_logs_on_err((|| {
        let udp = traffic(&stack)?;
        let families = scrape(&stack)?;
        let value = |name: &str| samples(&families, name).map(|s| s.value).sum::<f64>();

        // Per-flow series: every flow is among the top 10.
        ensure!(value("egress_flows_active") == 4.0, "flows active");
        let mut udp_flows: Vec<(u64, u64)> = samples(&families, "egress_flow_bytes_total")
            .filter(|s| s.label("proto") == "udp" && s.label("direction") == "out")
            .map(|s| {
                let back = samples(&families, "egress_flow_bytes_total")
                    .find(|b| {
                        b.label("client") == s.label("client") && b.label("direction") == "in"
                    })
                    .map_or(0.0, |b| b.value);
                (s.value as u64, back as u64)
            })
            .collect();
        udp_flows.sort_unstable();
        ensure!(
            udp_flows == udp,
            "UDP flow bytes {udp_flows:?}, sent {udp:?}"
        );
        for s in
            samples(&families, "egress_flow_packets_total").filter(|s| s.label("proto") == "udp")
        {
            ensure!(
                s.value == 1.0,
                "UDP flow packets {} {:?}",
                s.value,
                s.labels
            );
        }

        // Every forwarded packet belongs to one of the flows.
        let flow_packets = value("egress_flow_packets_total");
        let forwarded: f64 = samples(&families, "egress_packets_total")
            .filter(|s| {
                matches!(
                    s.label("reason"),
                    "translated" | "new_flow" | "reverse_hit" | "no_neighbour"
                )
            })
            .map(|s| s.value)
            .sum();
        ensure!(
            forwarded == flow_packets,
            "{forwarded} packets forwarded, flows carried {flow_packets}"
        );
        let client_bytes = value("egress_client_flow_bytes");
        ensure!(
            client_bytes == value("egress_flow_bytes_total"),
            "client bytes {client_bytes}"
        );
        // All of them through the one peer; the idle one shows 0, each
        // direction of its bytes too.
        let peer = CLIENT_UNDERLAY_IP.to_string();
        let idle = IDLE_PEER.to_string();
        for (name, total, series) in [
            ("egress_peer_flows", "egress_flows_active", 1),
            ("egress_peer_flow_bytes", "egress_flow_bytes_total", 2),
        ] {
            let of = |p: &str| -> Vec<f64> {
                samples(&families, name)
                    .filter(|s| s.label("peer") == p)
                    .map(|s| s.value)
                    .collect()
            };
            ensure!(
                of(&peer).iter().sum::<f64>() == value(total)
                    && of(&idle) == vec![0.0; series]
                    && samples(&families, name).count() == 2 * series,
                "{name}: {:?}",
                samples(&families, name)
                    .map(|s| (&s.labels, s.value))
                    .collect::<Vec<_>>()
            );
        }

        // Two entries per flow, and per mapping (one per client socket);
        // one client address; the mappings' ports, by protocol.
        let labelled = |name: &str, label: &str, value: &str| {
            samples(&families, name)
                .filter(|s| s.label(label) == value)
                .map(|s| s.value)
                .collect::<Vec<_>>()
        };
        for (map, entries) in [("flows", 8.0), ("mappings", 8.0), ("client_flows", 1.0)] {
            let got = labelled("egress_table_entries", "map", map);
            ensure!(got == [entries], "{map} entries {got:?}, not {entries}");
        }
        // One translation address: a series per protocol, 0 for the idle
        // one (not a gap).
        for (proto, ports) in [("udp", 3.0), ("tcp", 1.0), ("icmp", 0.0)] {
            let got = labelled("egress_nat_ports", "proto", proto);
            ensure!(
                got == [ports],
                "{proto} ports in use {got:?}, not [{ports}]"
            );
            let limit = labelled("egress_nat_ports_limit", "proto", proto);
            ensure!(limit == [31744.0], "{proto} ports available {limit:?}");
        }

        for leg in ["tunnel", "internet"] {
            let count = samples(&families, "egress_tcp_handshake_rtt_seconds_count")
                .find(|s| s.label("leg") == leg)
                .map_or(0.0, |s| s.value);
            ensure!(count == 1.0, "{count} {leg} RTT observations");
        }
        // A second scrape counts nothing twice.
        let again = scrape(&stack)?;
        let created = |f: &[Family]| {
            samples(f, "egress_flows_created_total")
                .map(|s| s.value)
                .sum::<f64>()
        };
        ensure!(
            created(&families) == 4.0 && created(&again) == 4.0,
            "flows created"
        );
        let rtts = samples(&again, "egress_tcp_handshake_rtt_seconds_count")
            .map(|s| s.value)
            .sum::<f64>();
        ensure!(rtts == 2.0, "{rtts} RTT observations after a second scrape");

        lint(&families)?;
        documented(&families)?;
        flows_json(&stack, &egress, &udp)
    })())
}

/// `egress flows --json` lists exactly the live flows with their counters.
fn flows_json(stack: &Stack, egress: &Path, udp: &[(u64, u64)]) -> Result<()> {
    let out = stack.egress_cli(egress, "flows --json")?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).context("flows --json")?;
    ensure!(rows.len() == 4, "{} flows listed:\n{out}", rows.len());
    let mut listed: Vec<(u64, u64)> = rows
        .iter()
        .filter(|r| r["proto"] == "udp")
        .map(|r| {
            (
                r["out"]["bytes"].as_u64().unwrap_or(0),
                r["in"]["bytes"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    listed.sort_unstable();
    ensure!(listed == udp, "listed UDP bytes {listed:?}, sent {udp:?}");
    let tcp = rows
        .iter()
        .find(|r| r["proto"] == "tcp")
        .context("no TCP flow")?;
    ensure!(
        tcp["state"] != serde_json::Value::Null,
        "TCP state missing: {tcp}"
    );
    for leg in ["rtt_tunnel_seconds", "rtt_internet_seconds"] {
        ensure!(
            tcp[leg].as_f64().is_some_and(|s| s > 0.0),
            "{leg} missing: {tcp}"
        );
    }
    let filtered = stack.egress_cli(egress, "flows --json --proto tcp")?;
    let filtered: Vec<serde_json::Value> = serde_json::from_str(&filtered)?;
    ensure!(filtered.len() == 1, "--proto tcp listed {}", filtered.len());
    // Every flow's replies go to the one peer that carried it, none to the
    // idle one; the table says so too.
    let peer = CLIENT_UNDERLAY_IP.to_string();
    ensure!(
        rows.iter().all(|r| r["peer"] == peer.as_str()),
        "peers listed:\n{out}"
    );
    for (filter, want) in [(peer.as_str(), 4), (IDLE_PEER, 0)] {
        let listed = stack.egress_cli(egress, &format!("flows --json --peer {filter}"))?;
        let listed: Vec<serde_json::Value> = serde_json::from_str(&listed)?;
        ensure!(
            listed.len() == want,
            "--peer {filter} listed {}",
            listed.len()
        );
    }
    let table = stack.egress_cli(egress, "flows")?;
    let column = |line: &str| line.split_whitespace().nth(3).map(str::to_owned);
    let mut lines = table.lines();
    ensure!(
        lines.next().and_then(column).as_deref() == Some("PEER")
            && lines.all(|l| column(l).as_deref() == Some(peer.as_str())),
        "flows table:\n{table}"
    );

    // A daemon from before the flow cache pins none: its flows are listed
    // from the table alone, which counted every packet then.
    std::fs::remove_file(stack.topo.lab.state_dir()?.join("FLOW_CACHE"))?;
    let out = stack.egress_cli(egress, "flows --json")?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).context("flows --json")?;
    ensure!(
        rows.len() == 4,
        "{} flows listed without a cache",
        rows.len()
    );
    Ok(())
}

/// A row of the README's metrics table for one metric: its type and the
/// cell that names its labels.
struct Documented {
    kind: String,
    labels: String,
}

/// The README's metrics table by metric: a row's first column names one or
/// more metrics, its second their types (one for all, or one each).
fn readme_metrics() -> std::collections::BTreeMap<String, Documented> {
    let readme = include_str!("../../README.md");
    let mut table = std::collections::BTreeMap::new();
    for row in readme.lines().filter(|l| l.starts_with("| `egress_")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let types: Vec<&str> = cells[2].split(", ").collect();
        for (i, name) in cells[1].split(", ").enumerate() {
            let kind = types.get(i).or(types.first()).copied().unwrap_or("");
            let labels = cells[3].to_owned();
            table.insert(
                name.trim_matches('`').to_owned(),
                Documented {
                    kind: kind.to_owned(),
                    labels,
                },
            );
        }
    }
    table
}

/// Every metric exported is in the README's table, with its type and
/// labels, and the table names none that is not exported.
fn documented(families: &[Family]) -> Result<()> {
    let readme = readme_metrics();
    let mut exported = Vec::new();
    for f in families {
        // The parser strips a counter's `_total` from its family name.
        let suffix = if f.kind == "counter" { "_total" } else { "" };
        let name = format!("{}{suffix}", f.name);
        let doc = readme
            .get(&name)
            .with_context(|| format!("{name} is not in the README's metrics table"))?;
        ensure!(
            doc.kind == f.kind,
            "{name} is a {}, the README says {}",
            f.kind,
            doc.kind
        );
        for s in &f.samples {
            for key in s.labels.keys().filter(|k| *k != "le") {
                ensure!(
                    doc.labels.contains(&format!("`{key}`")),
                    "{name}'s label {key} is not in the README's metrics table"
                );
            }
        }
        exported.push(name);
    }
    let stale: Vec<&String> = readme.keys().filter(|n| !exported.contains(n)).collect();
    ensure!(
        stale.is_empty(),
        "the README's metrics table names unexported {stale:?}"
    );
    Ok(())
}

/// Naming conventions, checked on the parsed families: one prefix,
/// snake_case, counters ending in `_total` (the parser strips it from the
/// family name), base units only.
fn lint(families: &[Family]) -> Result<()> {
    ensure!(!families.is_empty(), "no metrics");
    for f in families {
        let n = &f.name;
        ensure!(n.starts_with("egress_"), "{n}: no egress_ prefix");
        ensure!(
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{n}: not snake_case"
        );
        for unit in [
            "_ms",
            "_ns",
            "_us",
            "milliseconds",
            "_kb",
            "_mb",
            "_minutes",
        ] {
            ensure!(!n.contains(unit), "{n}: not a base unit");
        }
        if n.contains("duration") || n.contains("rtt") {
            ensure!(
                n.ends_with("_seconds"),
                "{n}: a time in seconds must say so"
            );
        }
        if n.contains("bytes") {
            ensure!(n.ends_with("_bytes"), "{n}: bytes must end in _bytes");
        }
        for s in &f.samples {
            match f.kind.as_str() {
                "counter" => ensure!(
                    s.name.ends_with("_total") || s.name.ends_with("_created"),
                    "counter sample {} must end in _total",
                    s.name
                ),
                "gauge" => ensure!(
                    !s.name.ends_with("_total"),
                    "gauge {} ends in _total",
                    s.name
                ),
                _ => {}
            }
        }
    }
    Ok(())
}
