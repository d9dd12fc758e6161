//! `cargo xtask bench`: in-kernel timings against the release gateway.

use anyhow::Result;

use crate::{
    build::build_bins,
    packages::ensure_packages,
    toolchain::ensure_bpf_linker,
    workspace::{Workspace, require_root, step},
};

pub fn bench(ws: &mut Workspace) -> Result<()> {
    require_root("bench")?;
    ensure_bpf_linker(ws)?;
    ensure_packages(ws)?;
    build_bins(ws, true)?;
    let egress = ws.egress_bin(true)?;
    // Only the bench targets: the lib and bins have no benchmarks.
    step(
        "bench",
        ws.cargo()
            .args(["bench", "-p", "tests", "--bench", "*"])
            .env("EGRESS_BIN", egress),
    )
}
