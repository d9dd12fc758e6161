//! What packaging/egress.service promises, checked without systemd: the
//! gateway works with only the capabilities the unit grants (run as uid 0
//! with that bounding set, as the unit does), and tells the notify socket
//! `READY=1` once attached and `STOPPING=1` on the way out; its reload
//! (`egress check`, then SIGHUP) passes beside the running gateway and
//! says `RELOADING=1`, then `READY=1` from the new image, which keeps
//! the capabilities. A stop leaves the data path translating, and a start
//! takes it over, with those capabilities too. Needs root.

use std::{net::SocketAddr, os::unix::net::UnixDatagram, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use tests::{
    Attach, Topology, addrs::SERVER_IP, echo::udp_server, egress_bin, exec_output, require_root,
};

const UNIT: &str = include_str!("../../packaging/egress.service");
const PORT: u16 = 9400;
/// The gateway was already ready (it logged so) when this is waited on.
const NOTIFY_WAIT: Duration = Duration::from_secs(10);

/// The value of `key=` in the unit.
fn directive(key: &str) -> Result<&'static str> {
    UNIT.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .with_context(|| format!("no {key}= in the unit"))
}

/// `CAP_NET_ADMIN` → its bit (linux/capability.h).
fn cap_bit(name: &str) -> Result<u32> {
    Ok(match name {
        "CAP_NET_ADMIN" => 12,
        "CAP_NET_RAW" => 13,
        "CAP_SYS_ADMIN" => 21,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => bail!("unexpected capability {other} in the unit"),
    })
}

#[test]
fn unit_restarts_on_failure_and_keeps_state() -> Result<()> {
    ensure!(directive("Type")? == "notify");
    ensure!(directive("Restart")? == "on-failure");
    let exec = directive("ExecStart")?;
    ensure!(!exec.contains("--reset-state"), "{exec}");
    let reloads: Vec<&str> = UNIT
        .lines()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .collect();
    ensure!(
        reloads.len() == 2
            && reloads[0] == exec.replacen(" run ", " check ", 1)
            && reloads[1] == "/bin/kill -HUP $MAINPID",
        "the reload must check the settings ExecStart runs with, then send SIGHUP: {reloads:?}"
    );
    ensure!(
        directive("CapabilityBoundingSet")? == directive("AmbientCapabilities")?,
        "the ambient set must be the bounding set"
    );
    Ok(())
}

mod gateway_runs_with_the_units_capabilities_and_reports_readiness {
    use super::*;

    #[test]
    fn native() -> Result<()> {
        with_the_units_capabilities(Attach::Native, "native XDP")
    }

    /// A TCX link, and the look for a killed gateway's clsact filter.
    #[test]
    fn tc() -> Result<()> {
        with_the_units_capabilities(Attach::Tc, "TC (TCX ingress)")
    }
}

fn with_the_units_capabilities(attach: Attach, hook: &str) -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let caps: Vec<&str> = directive("CapabilityBoundingSet")?
        .split_whitespace()
        .collect();
    let topo = Topology::new()?;
    let result = (|| {
        let _peer = topo.start_ipip_peer(Path::new(env!("CARGO_BIN_EXE_ipip-peer")))?;
        let socket_path = topo.lab.dir().join("notify");
        let notify = UnixDatagram::bind(&socket_path)?;
        notify.set_read_timeout(Some(NOTIFY_WAIT))?;
        let setpriv_caps: Vec<String> = caps
            .iter()
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        let launcher = format!(
            "env NOTIFY_SOCKET={} setpriv --bounding-set -all,{} --inh-caps -all --",
            socket_path.display(),
            setpriv_caps.join(",")
        );
        let mut gateway = topo.start_gateway_under(&launcher, &egress, attach, "")?;

        let want: u64 = caps
            .iter()
            .map(|c| Ok(1 << cap_bit(c)?))
            .sum::<Result<u64>>()?;
        let capabilities_kept = |gateway: &tests::Daemon| -> Result<()> {
            let status = std::fs::read_to_string(format!("/proc/{}/status", gateway.pid()))?;
            let effective = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .context("no CapEff")?;
            ensure!(
                effective == want,
                "the gateway runs with capabilities {effective:#x}, the unit grants {want:#x}"
            );
            Ok(())
        };
        capabilities_kept(&gateway)?;

        let mut buf = [0u8; 512];
        let ready = || -> Result<()> {
            let mut buf = [0u8; 512];
            let n = notify.recv(&mut buf).context("no readiness notification")?;
            let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
            ensure!(
                ready == format!("READY=1\nSTATUS=attached to eth0 as {hook}"),
                "{ready:?}"
            );
            Ok(())
        };
        ready()?;

        let server = SocketAddr::from((SERVER_IP, PORT));
        let _udp = udp_server(&topo.server, server)?;
        let translated = || topo.udp_translated(server);
        translated()?;

        // The unit's reload: `egress check` with the gateway's own
        // arguments first, beside the running gateway, then SIGHUP.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", gateway.pid()))?;
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .skip(1)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).replacen("run", "check", 1))
            .collect();
        let check = exec_output(
            &topo.gateway,
            &format!("{} {}", egress.display(), args.join(" ")),
        )?;
        ensure!(
            check.status.success(),
            "egress check fails beside the running gateway, so the unit would not reload:\n{}",
            String::from_utf8_lossy(&check.stdout)
        );
        gateway.signal(nix::sys::signal::Signal::SIGHUP)?;
        let n = notify.recv(&mut buf).context("no reloading notification")?;
        let reloading = String::from_utf8_lossy(&buf[..n]).into_owned();
        ensure!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading:?}"
        );
        ready()?;
        capabilities_kept(&gateway)?;
        translated()?;

        gateway.stop();
        let n = notify.recv(&mut buf).context("no stopping notification")?;
        ensure!(
            &buf[..n] == b"STOPPING=1",
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        let log = gateway.log();
        ensure!(
            log.contains("stopped: the data path stays attached"),
            "no clean exit:\n{log}"
        );
        translated().context("the data path went with the daemon")?;

        // `systemctl start` again: the new daemon takes the data path over
        // with the same capabilities (it tells its own program from
        // another gateway's without CAP_SYS_ADMIN).
        gateway = topo.start_gateway_under(&launcher, &egress, attach, "")?;
        ready()?;
        capabilities_kept(&gateway)?;
        translated()?;
        let log = gateway.log();
        ensure!(log.contains("took over the"), "no takeover:\n{log}");
        gateway.stop();
        topo.take_down(&egress)?;
        Ok(())
    })();
    topo.lab.keep_logs_on_err(result)
}
