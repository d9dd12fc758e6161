//! `cargo xtask test`: everything CI checks.

use anyhow::Result;

use crate::{
    build::{build_bins, prepare_privileged},
    oldest_kernel::{self, Scope},
    workspace::{Workspace, step},
};

pub fn test(ws: &mut Workspace, oldest_kernel: bool) -> Result<()> {
    prepare_privileged(ws, "test")?;
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
    let egress = build_bins(ws, false)?;
    step(
        "packet and namespace tests",
        ws.cargo()
            .args(["test", "-p", "tests", "--", "--test-threads=1"])
            .env("EGRESS_BIN", egress),
    )?;
    if oldest_kernel {
        oldest_kernel::test(ws, Scope::Subset)?;
    }
    Ok(())
}

/// `cargo xtask oldest-kernel`: the Linux 6.1 step alone.
pub fn oldest_kernel(ws: &mut Workspace, all: bool) -> Result<()> {
    prepare_privileged(ws, "oldest-kernel")?;
    build_bins(ws, false)?;
    oldest_kernel::test(ws, if all { Scope::All } else { Scope::Subset })
}
