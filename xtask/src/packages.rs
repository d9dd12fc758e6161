//! Debian packages that the privileged tests, the demo and the benchmark
//! shell out to.

use anyhow::Result;

use crate::workspace::{Workspace, step};

/// (command run, Debian 12 package providing it, pinned version)
type Package = (&'static str, &'static str, &'static str);

/// What the privileged tests and the demo run.
pub const TEST: &[Package] = &[
    ("ip", "iproute2", "6.1.0-3"),
    ("ping", "iputils-ping", "3:20221126-1+deb12u1"),
    ("tracepath", "iputils-tracepath", "3:20221126-1+deb12u1"),
    ("curl", "curl", "7.88.1-10+deb12u15"),
    ("ethtool", "ethtool", "1:6.1-1"),
];

/// What the benchmark adds: the classic kernel NAT it compares against.
pub const BENCH: &[Package] = &[("nft", "nftables", "1.0.6-2+deb12u2")];

/// What the Linux 6.1 VM runs in (the kernel and busybox are only
/// unpacked, see `oldest_kernel`).
pub const VM: &[Package] = &[(
    "qemu-system-x86_64",
    "qemu-system-x86",
    "1:7.2+dfsg-7+deb12u18+b3",
)];

/// (module the tests import, PyPI package providing it, pinned version)
const PYTHON_PACKAGES: &[(&str, &str, &str)] = &[
    // An independent Prometheus text-format parser for the metrics tests.
    ("prometheus_client", "prometheus-client", "0.26.0"),
];

/// Installs the Python packages whose module is missing, like
/// [`ensure_packages`].
pub fn ensure_python_packages(ws: &Workspace) -> Result<()> {
    let missing: Vec<String> = PYTHON_PACKAGES
        .iter()
        .filter(|(module, ..)| {
            !ws.command("python3")
                .args(["-c", &format!("import {module}")])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg, version)| format!("{pkg}=={version}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(
        &format!("pip install {}", missing.join(" ")),
        ws.command("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(&missing),
    )
}

/// Installs the packages whose command is missing; does nothing (and needs no
/// network) when all are present.
pub fn ensure_packages(ws: &Workspace, packages: &[Package]) -> Result<()> {
    let missing: Vec<_> = packages
        .iter()
        .filter(|(cmd, ..)| !ws.has_command(cmd))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        let mut cmd = ws.command("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    step("apt-get update", &mut apt(&["update"]))?;
    let pinned: Vec<String> = missing
        .iter()
        .map(|(_, pkg, version)| format!("{pkg}={version}"))
        .collect();
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    step(
        &format!("apt-get install {}", pinned.join(" ")),
        install.args(&pinned),
    )
}
