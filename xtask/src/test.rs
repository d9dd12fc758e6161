//! `cargo xtask test`: everything CI checks.

use anyhow::Result;

use crate::{
    build::build_bins,
    packages::ensure_packages,
    toolchain::ensure_bpf_linker,
    workspace::{Workspace, require_root, step},
};

pub fn test(ws: &mut Workspace) -> Result<()> {
    // Checked first so a non-root run fails before minutes of building.
    require_root("test")?;
    ensure_bpf_linker(ws)?;
    ensure_packages(ws)?;
    step("fmt", ws.cargo().args(["fmt", "--all", "--", "--check"]))?;
    step(
        "clippy",
        ws.cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // The eBPF crate is only compiled for the BPF target inside egress-user's
    // build script, which clippy does not lint.
    step(
        "clippy (eBPF, bpfel-unknown-none)",
        ws.cargo()
            .args([
                "clippy",
                "-p",
                "egress-ebpf",
                "--target",
                "bpfel-unknown-none",
            ])
            .args(["-Z", "build-std=core", "--", "-D", "warnings"]),
    )?;
    step(
        "unit tests",
        ws.cargo()
            .args(["test", "--workspace", "--exclude", "tests"]),
    )?;
    // Built after the unit tests so nothing they build can replace target/debug/egress.
    build_bins(ws, false)?;
    let egress = ws.egress_bin(false)?;
    step(
        "packet and namespace tests",
        ws.cargo()
            .args(["test", "-p", "tests", "--", "--test-threads=1"])
            .env("EGRESS_BIN", egress),
    )
}
