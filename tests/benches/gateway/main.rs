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
use report::{EndToEnd, Report};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn main() -> Result<()> {
    tests::require_root()?;
    let egress = tests::egress_bin()?;
    let json_path = std::env::var_os("BENCH_JSON")
        .map(PathBuf::from)
        .context("set BENCH_JSON (cargo xtask bench does) to where the JSON goes")?;
    let started = Instant::now();
    eprintln!("bench: in-kernel costs");
    let in_kernel = in_kernel::measure();
    eprintln!("bench: connection state at {} flows", state::FLOWS);
    let state = state::measure();
    let ebpf = end_to_end(Kind::Ebpf, &egress)?;
    let kernel = end_to_end(Kind::Kernel, &egress)?;
    let report = Report {
        in_kernel,
        state,
        ebpf,
        kernel,
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

/// Every end-to-end figure through a fresh topology with gateway `kind`.
fn end_to_end(kind: Kind, egress: &Path) -> Result<EndToEnd> {
    eprintln!("bench: end to end through the {} gateway", kind.name());
    let lab = BenchLab::new(kind, egress)?;
    let measure = || -> Result<EndToEnd> {
        let (rtts, lost) = traffic::rr_latency(&lab)?;
        let tcp_bps = traffic::tcp_throughput(&lab)?;
        // Last: the server's XDP sink would swallow the other tests' traffic.
        let udp = Fabric::ALL
            .into_iter()
            .map(|fabric| traffic::udp_rate(&lab, fabric))
            .collect::<Result<_>>()?;
        Ok(EndToEnd {
            udp,
            tcp_bps,
            rtts,
            lost,
        })
    };
    lab.topo.lab.keep_logs_on_err(measure())
}
