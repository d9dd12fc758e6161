//! `cargo xtask build`.

use std::path::PathBuf;

use anyhow::Result;

use crate::{
    packages::{self, ensure_packages, ensure_python_packages},
    toolchain::ensure_bpf_linker,
    workspace::{Workspace, require_root, step},
};

pub fn build(ws: &mut Workspace, release: bool) -> Result<()> {
    ensure_bpf_linker(ws)?;
    build_bins(ws, release).map(drop)
}

/// What every command that loads the gateway needs first: root, the BPF
/// linker and the test tools. Root is checked first so a non-root run fails
/// before minutes of building.
pub fn prepare_privileged(ws: &mut Workspace, command: &str) -> Result<()> {
    require_root(command)?;
    ensure_bpf_linker(ws)?;
    ensure_packages(ws, packages::TEST)?;
    ensure_python_packages(ws)
}

/// Builds the default members' binaries; egress-user's build script compiles
/// egress-ebpf for BPF (its host build is an empty stub, so it is left out).
/// Returns the path of the gateway binary.
pub fn build_bins(ws: &Workspace, release: bool) -> Result<PathBuf> {
    let mut cargo = ws.cargo();
    cargo.args(["build", "--bins"]);
    if release {
        cargo.arg("--release");
    }
    step(
        if release { "build (release)" } else { "build" },
        &mut cargo,
    )?;
    ws.egress_bin(release)
}
