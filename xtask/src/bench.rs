//! `cargo xtask bench`: in-kernel, state-at-scale and end-to-end figures
//! for the release gateway, printed as tables and written to
//! target/bench/latest.json.

use anyhow::Result;
use clap::ValueEnum;

use crate::{
    build::{build_bins, prepare_privileged},
    packages::{self, ensure_packages},
    workspace::{Workspace, step},
};

/// A part of the bench run: a table and a section of the JSON. Its
/// value name (`in-kernel`, `state`, `end-to-end`) is the bench binary's
/// `BENCH_PARTS` name.
#[derive(Clone, Copy, ValueEnum)]
pub enum Part {
    InKernel,
    State,
    EndToEnd,
}

/// Runs the benchmarks: every part, or only `only`.
pub fn bench(ws: &mut Workspace, only: &[Part]) -> Result<()> {
    prepare_privileged(ws, "bench")?;
    ensure_packages(ws, packages::BENCH)?;
    let egress = build_bins(ws, true)?;
    let name = if only.is_empty() {
        "latest.json"
    } else {
        "partial.json"
    };
    let json = ws.target_dir.join("bench").join(name);
    // Only the bench targets: the lib and bins have no benchmarks.
    let mut cargo = ws.cargo();
    cargo
        .args(["bench", "-p", "tests", "--bench", "*"])
        .env("EGRESS_BIN", egress)
        .env("BENCH_JSON", json);
    if !only.is_empty() {
        let parts: Vec<String> = only
            .iter()
            .filter_map(|p| p.to_possible_value())
            .map(|v| v.get_name().to_owned())
            .collect();
        cargo.env("BENCH_PARTS", parts.join(","));
    }
    step("bench", &mut cargo)
}
