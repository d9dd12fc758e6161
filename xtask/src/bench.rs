//! `cargo xtask bench`: in-kernel, state-at-scale and end-to-end figures
//! for the release gateway, printed as tables and written to
//! target/bench/latest.json.

use anyhow::Result;

use crate::{
    build::{build_bins, prepare_privileged},
    packages::{self, ensure_packages},
    workspace::{Workspace, step},
};

pub fn bench(ws: &mut Workspace) -> Result<()> {
    prepare_privileged(ws, "bench")?;
    ensure_packages(ws, packages::BENCH)?;
    let egress = build_bins(ws, true)?;
    let json = ws.target_dir.join("bench").join("latest.json");
    // Only the bench targets: the lib and bins have no benchmarks.
    step(
        "bench",
        ws.cargo()
            .args(["bench", "-p", "tests", "--bench", "*"])
            .env("EGRESS_BIN", egress)
            .env("BENCH_JSON", json),
    )
}
