//! `cargo xtask run`: the interactive demo.

use anyhow::Result;

use crate::{
    build::{build_bins, prepare_privileged},
    workspace::{Workspace, step},
};

pub fn run(ws: &mut Workspace) -> Result<()> {
    prepare_privileged(ws, "run")?;
    let egress = build_bins(ws, false)?;
    let demo = ws.profile_dir(false).join("demo");
    // Ctrl-C reaches the whole foreground process group, so the demo gets it
    // directly; we only have to survive it and wait for the demo to clean up.
    ignore_sigint();
    step("demo", ws.command(&demo).env("EGRESS_BIN", egress))
}

extern "C" fn on_sigint(_: libc::c_int) {}

/// A no-op handler rather than SIG_IGN: handlers reset to default across exec,
/// ignored signals would stay ignored in the demo.
fn ignore_sigint() {
    // SAFETY: the handler is async-signal-safe (it does nothing).
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
}
