//! A gateway's daemon loads (has the kernel verify) only the program it
//! attaches, the verifier taking most of a second over each: in native
//! XDP and TC mode, and in auto mode on an interface with native XDP (a
//! veth), its process holds that one program after a start and after a
//! reload (SIGHUP), whose new image takes the data path over. In auto mode
//! on an interface without native XDP (a bridge) it loads the TC program
//! once the XDP attach is refused, and attaches that; its reload takes
//! over the TC link, loading the TC program alone. Needs root.

use std::time::Duration;

use anyhow::{Result, ensure};
use nix::sys::signal::Signal;
use tests::{Lab, egress_bin, ip_batch, require_root};

/// Loading and verifying a program can take a while on a busy machine.
const READY: Duration = Duration::from_secs(60);
const XDP: &str = "egress_xdp";
const TC: &str = "egress_tc";

#[test]
fn native_loads_the_xdp_program_alone() -> Result<()> {
    holds("veth", "native", "native XDP", [&[XDP], &[XDP]])
}

#[test]
fn tc_loads_the_tc_program_alone() -> Result<()> {
    holds("veth", "tc", "TC (TCX ingress)", [&[TC], &[TC]])
}

#[test]
fn auto_with_native_xdp_loads_the_xdp_program_alone() -> Result<()> {
    holds("veth", "auto", "native XDP", [&[XDP], &[XDP]])
}

/// The XDP program, loaded for the native attach that the bridge refuses,
/// stays loaded beside the TC one until the reload.
#[test]
fn auto_without_native_xdp_loads_the_tc_program_then() -> Result<()> {
    holds("bridge", "auto", "TC (TCX ingress)", [&[TC, XDP], &[TC]])
}

/// Runs a gateway on an interface of `kind` with `--attach mode` and
/// checks that it attaches as `hook` holding the programs `held` (sorted)
/// after its start, and after a reload.
fn holds(kind: &str, mode: &str, hook: &str, held: [&[&str]; 2]) -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let mut lab = Lab::new()?;
    let ns = lab.add_ns("gw")?;
    let link = match kind {
        "veth" => "link add eth0 type veth peer name p0\nlink set p0 up",
        _ => "link add eth0 type bridge",
    };
    let mut setup: Vec<String> = link.lines().map(str::to_owned).collect();
    setup.extend(
        [
            "link set eth0 up",
            "addr add 10.9.0.1/24 dev eth0",
            "route add default via 10.9.0.254",
        ]
        .map(str::to_owned),
    );
    ip_batch(&ns, &setup)?;
    let args = format!(
        "run --iface eth0 --peer 10.9.0.2 --client-cidr 192.168.250.0/24 --attach {mode} \
         --state-dir {}",
        lab.state_dir()?.display()
    );
    let result = (|| {
        let mut gateway = lab.spawn(&ns, "gateway", &egress, &args)?;
        let ready = format!("hook=\"{hook}\"");
        for (round, what, held) in [(1, "start", held[0]), (2, "reload", held[1])] {
            if round > 1 {
                gateway.signal(Signal::SIGHUP)?;
            }
            gateway.wait_for_times(&ready, round, READY)?;
            let programs = gateway.bpf_programs()?;
            ensure!(
                programs == held,
                "after its {what}, attached as {hook}, the gateway holds {programs:?}, not \
                 {held:?}; its log:\n{}",
                gateway.log()
            );
        }
        Ok(())
    })();
    lab.keep_logs_on_err(result)
}
