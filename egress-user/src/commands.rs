//! `egress stats` and `egress flows`: what a running (or stopped) gateway's
//! pinned state says, printed as a table or JSON.

use std::{net::Ipv4Addr, path::PathBuf};

use serde::Serialize;

use crate::{
    clock::monotonic_ns,
    inspect::{FlowRow, Pinned},
    pinning::DEFAULT_STATE_DIR,
};

#[derive(clap::Args)]
pub struct StatsArgs {
    /// bpffs directory the gateway pins its state in.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct StatRow {
    reason: &'static str,
    verdict: &'static str,
    packets: u64,
}

/// Prints every reason counter with its verdict.
pub fn stats(args: &StatsArgs) -> anyhow::Result<()> {
    let rows: Vec<StatRow> = Pinned::open(&args.state_dir)?
        .stats()?
        .into_iter()
        .map(|(reason, packets)| StatRow {
            reason: reason.as_str(),
            verdict: reason.verdict().as_str(),
            packets,
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<20} {:<10} {:>14}", "REASON", "VERDICT", "PACKETS");
    for r in rows {
        println!("{:<20} {:<10} {:>14}", r.reason, r.verdict, r.packets);
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// Order of `egress flows`, largest first.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SortBy {
    Bytes,
    Packets,
    Age,
}

#[derive(clap::Args)]
pub struct FlowsArgs {
    /// bpffs directory the gateway pins its state in.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Only flows of this client address.
    #[arg(long)]
    client: Option<Ipv4Addr>,
    /// Only flows to this remote address.
    #[arg(long)]
    remote: Option<Ipv4Addr>,
    /// Only flows whose replies go to this tunnel peer.
    #[arg(long)]
    peer: Option<Ipv4Addr>,
    /// Only flows of this protocol.
    #[arg(long, value_enum)]
    proto: Option<Proto>,
    /// Order, largest first (both directions together).
    #[arg(long, value_enum, default_value = "bytes")]
    sort: SortBy,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Lists the live flows, like `conntrack -L`.
pub fn flows(args: &FlowsArgs) -> anyhow::Result<()> {
    let (conns, _) = Pinned::open(&args.state_dir)?.flows()?;
    let now = monotonic_ns();
    let proto = args.proto.map(|p| match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    });
    let mut rows: Vec<FlowRow> = conns
        .iter()
        .map(|c| c.row(now))
        .filter(|r| args.client.is_none_or(|a| *r.client.ip() == a))
        .filter(|r| args.remote.is_none_or(|a| *r.remote.ip() == a))
        .filter(|r| args.peer.is_none_or(|a| r.peer == a))
        .filter(|r| proto.is_none_or(|p| r.proto == p))
        .collect();
    let key = |r: &FlowRow| match args.sort {
        SortBy::Bytes => (r.out.bytes + r.back.bytes) as f64,
        SortBy::Packets => (r.out.packets + r.back.packets) as f64,
        SortBy::Age => r.age_seconds,
    };
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{}", FlowRow::HEADER);
    for r in &rows {
        println!("{}", r.line());
    }
    Ok(())
}
