//! Network-namespace lab for end-to-end tests of the egress gateway: the
//! "client, router, gateway, Internet server" topology, helpers to run
//! commands, daemons and Rust code inside namespaces, and the RFC 2003
//! IP-in-IP framing used by the `ipip-peer` emulator (the machine has no
//! kernel ipip module).

pub mod addrs;
pub mod attached;
pub mod daemon;
pub mod echo;
pub mod ipip;
pub mod netns;
pub mod tap;
pub mod tiny_bpf;
pub mod topology;

pub use attached::Attachments;
pub use daemon::Daemon;
pub use netns::{Lab, exec, exec_output, ifindex, in_netns, ip_batch, sysctl};
pub use topology::{Attach, Stack, Topology};

use anyhow::{Result, bail};
use std::path::PathBuf;

/// Namespaces, veth and XDP need root; say so instead of failing obscurely.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root: the tests create network namespaces and attach XDP programs");
    }
    Ok(())
}

/// The gateway binary under test, from `EGRESS_BIN`.
pub fn egress_bin() -> Result<PathBuf> {
    let Some(path) = std::env::var_os("EGRESS_BIN") else {
        bail!("set EGRESS_BIN (cargo xtask test does) to the gateway binary's path");
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!("EGRESS_BIN={} is not a file", path.display());
    }
    Ok(path)
}
