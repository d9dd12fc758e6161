//! `cargo xtask build`.

use anyhow::Result;

use crate::{
    toolchain::ensure_bpf_linker,
    workspace::{Workspace, step},
};

pub fn build(ws: &mut Workspace, release: bool) -> Result<()> {
    ensure_bpf_linker(ws)?;
    build_bins(ws, release)
}

/// Builds the default members' binaries; egress-user's build script compiles
/// egress-ebpf for BPF (its host build is an empty stub, so it is left out).
pub fn build_bins(ws: &Workspace, release: bool) -> Result<()> {
    let mut cargo = ws.cargo();
    cargo.args(["build", "--bins"]);
    if release {
        cargo.arg("--release");
    }
    step(
        if release { "build (release)" } else { "build" },
        &mut cargo,
    )
}
