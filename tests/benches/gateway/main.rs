//! `cargo xtask bench`: what the fast path costs, in the kernel and end to
//! end against the classic kernel NAT, and what connection state costs at
//! a million flows, in one run. Prints a table and
//! writes JSON to `BENCH_JSON`. Benchmarks print figures; they never fail
//! on timing (only on a broken setup). Needs root.

mod fabric;
#[path = "../../tests/packets/frames.rs"]
#[allow(dead_code)]
mod frames;
#[path = "../../tests/packets/gateway.rs"]
#[allow(dead_code)]
mod gateway;
mod in_kernel;
mod lab;
mod report;
mod state;
#[path = "../../tests/packets/table.rs"]
mod table;
mod traffic;

use anyhow::{Context, Result};
use fabric::Fabric;
use lab::{BenchLab, Kind};
use report::{EndToEnd, Gateways, Report};
use std::path::PathBuf;
use std::time::Instant;
use traffic::{RR_ROUNDS, TRIALS};

/// The parts of a run, as `BENCH_PARTS` names them (comma-separated; all
/// when unset): each is a table and a section of the JSON.
const PARTS: [&str; 3] = ["in-kernel", "state", "end-to-end"];

fn main() -> Result<()> {
    tests::require_root()?;
    let egress = tests::egress_bin()?;
    let json_path = std::env::var_os("BENCH_JSON")
        .map(PathBuf::from)
        .context("set BENCH_JSON (cargo xtask bench does) to where the JSON goes")?;
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| PARTS.join(","));
    let parts: Vec<&str> = parts.split(',').collect();
    if let Some(unknown) = parts.iter().find(|p| !PARTS.contains(p)) {
        anyhow::bail!(
            "BENCH_PARTS: no part {unknown:?} (parts: {})",
            PARTS.join(", ")
        );
    }
    let started = Instant::now();
    let in_kernel = parts.contains(&"in-kernel").then(|| {
        eprintln!("bench: in-kernel costs");
        in_kernel::measure()
    });
    let state = parts.contains(&"state").then(|| {
        eprintln!("bench: connection state at {} flows", state::FLOWS);
        state::measure()
    });
    let end_to_end = if parts.contains(&"end-to-end") {
        eprintln!("bench: end to end, the eBPF and the kernel gateway in turn");
        let ebpf_lab = BenchLab::new(Kind::Ebpf, &egress)?;
        let kernel_lab = BenchLab::new(Kind::Kernel, &egress)?;
        let labs = [&ebpf_lab, &kernel_lab];
        let [ebpf, kernel] = keep_logs_on_err(&labs, end_to_end(&labs))?;
        Some(Gateways { ebpf, kernel })
    } else {
        None
    };
    let report = Report {
        in_kernel,
        state,
        end_to_end,
        elapsed: started.elapsed(),
    };
    report.print();
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report.json())? + "\n",
    )
    .with_context(|| format!("write {}", json_path.display()))?;
    println!("JSON: {}", json_path.display());
    Ok(())
}

/// Every end-to-end figure through each of `labs`, measured in `TRIALS`
/// turns that alternate between the gateways (ABBA), so that a slow spell
/// of the shared host falls on both alike rather than on whichever gateway
/// happened to be measured then.
fn end_to_end(labs: &[&BenchLab; 2]) -> Result<[EndToEnd; 2]> {
    let mut figures = [EndToEnd::default(), EndToEnd::default()];
    let turns = |trial: usize| -> [usize; 2] {
        if trial.is_multiple_of(2) {
            [0, 1]
        } else {
            [1, 0]
        }
    };
    for trial in 0..TRIALS {
        for i in turns(trial) {
            let (rtts, lost) = traffic::rr_latency(labs[i], RR_ROUNDS / TRIALS)?;
            figures[i].rtts.extend(rtts);
            figures[i].lost += lost;
            figures[i].tcp_bps.push(traffic::tcp_throughput(labs[i])?);
        }
    }
    // Last: the server's XDP sink would swallow the other figures' traffic.
    for (f, fabric) in Fabric::ALL.into_iter().enumerate() {
        eprintln!("bench: UDP rate through the {}", fabric.name());
        for trial in 0..TRIALS {
            for i in turns(trial) {
                figures[i].udp[f].push(traffic::udp_rate(labs[i], fabric)?);
            }
        }
    }
    for e in &mut figures {
        e.rtts.sort_unstable();
    }
    Ok(figures)
}

/// `result`, with every lab's logs kept if it is an error.
fn keep_logs_on_err<T>(labs: &[&BenchLab; 2], result: Result<T>) -> Result<T> {
    labs.iter()
        .fold(result, |r, lab| lab.topo.lab.keep_logs_on_err(r))
}
