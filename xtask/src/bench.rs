//! `cargo xtask bench`: in-kernel timings against the release gateway.

use anyhow::Result;

use crate::{
    build::{build_bins, prepare_privileged},
    workspace::{Workspace, step},
};

pub fn bench(ws: &mut Workspace) -> Result<()> {
    prepare_privileged(ws, "bench")?;
    let egress = build_bins(ws, true)?;
    // Only the bench targets: the lib and bins have no benchmarks.
    step(
        "bench",
        ws.cargo()
            .args(["bench", "-p", "tests", "--bench", "*"])
            .env("EGRESS_BIN", egress),
    )
}
