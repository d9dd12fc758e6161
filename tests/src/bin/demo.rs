//! `cargo xtask run`: builds the client/router/gateway/server topology, starts
//! the gateway (`EGRESS_BIN`), fetches a page from the "Internet" through it,
//! explains how to look around, and cleans up on Ctrl-C (`egress down`,
//! then the namespaces).

use anyhow::{Result, ensure};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tests::addrs::*;
use tests::{Attach, Stack, Topology, egress_bin, exec, require_root};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM only set a flag, so that drops run and clean up.
fn catch_stop_signals() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(())
}

/// `ipip-peer` is built next to this binary.
fn ipip_peer_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("ipip-peer");
    ensure!(
        bin.is_file(),
        "{} missing: cargo build -p tests",
        bin.display()
    );
    Ok(bin)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    catch_stop_signals()?;
    println!("building the topology and starting the gateway...");
    let mut stack = Stack::start(&egress, &ipip_peer_bin()?, Attach::Native)?;
    let topo = &stack.topo;
    let www = topo.lab.dir().join("www");
    std::fs::create_dir(&www)?;
    std::fs::write(
        www.join("hello.txt"),
        format!("Hello from the Internet server {SERVER_IP}!\n"),
    )?;
    let mut http = topo.start_http_server(&www)?;

    let url = format!("http://{SERVER_IP}:{HTTP_PORT}/hello.txt");
    println!("\n$ ip netns exec {} curl {url}", topo.client);
    match exec(&topo.client, &format!("curl -sS --max-time 10 {url}")) {
        Ok(body) => {
            print!("{body}");
            let seen = format!("{GATEWAY_IP} - - ");
            if http.wait_for(&seen, Duration::from_secs(2)).is_ok() {
                println!(
                    "(the server saw the request come from {GATEWAY_IP}, the gateway's translation address)"
                );
            }
        }
        Err(e) => println!(
            "FAILED: {e:#}\ngateway log: {}",
            stack.gateway.log_path().display()
        ),
    }
    explain(topo, &egress)?;

    while !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    // The daemon's data path outlives it: `egress down` removes it, as an
    // operator would, before the namespaces go.
    println!("\ncleaning up: stopping the gateway, then egress down...");
    print!("{}", stack.take_down(&egress)?);
    Ok(())
}

fn explain(topo: &Topology, egress: &Path) -> Result<()> {
    let extra = CLIENT_EXTRA_IPS.map(|ip| ip.to_string()).join(", ");
    let logs = topo.lab.dir().display();
    let inspect = format!(
        "{} flows --state-dir {}",
        egress.display(),
        topo.lab.state_dir()?.display()
    );
    let Topology {
        router,
        gateway,
        client,
        server,
        ..
    } = topo;
    println!(
        r#"
Topology (network namespaces):
  {client}  the IP-in-IP peer host: {HOST_IFACE} {CLIENT_UNDERLAY_IP} (underlay),
      {TUN_IFACE} {CLIENT_TUN_IP}/{CLIENT_TUN_PREFIX} and {extra} (inner addresses);
      {INTERNET_CIDR} is routed into {TUN_IFACE}, where ipip-peer encapsulates to {GATEWAY_IP}
  {router}  router: {ROUTER_CLIENT_IP} (client), {ROUTER_GATEWAY_IP} (gateway), {ROUTER_SERVER_IP} (Internet)
  {gateway}  the gateway: {HOST_IFACE} {GATEWAY_IP}; XDP decapsulates, SNATs to {GATEWAY_IP},
      and reverse-translates and re-encapsulates replies
  {server}  Internet server {SERVER_IP}, HTTP on port {HTTP_PORT}

Look around from another terminal:
  ip netns exec {client} curl http://{SERVER_IP}:{HTTP_PORT}/hello.txt
  ip netns exec {client} ping {SERVER_IP}
  ip netns exec {gateway} ip -d link show {HOST_IFACE}      # the attached XDP program
  {inspect}   # the gateway's flows (`stats` for its counters)
  ip netns exec {router} tcpdump -ni {ROUTER_GATEWAY_IFACE} # IP-in-IP on the wire (apt install tcpdump)
Logs (gateway, ipip-peer, http): {logs}

Ctrl-C stops the gateway (and `egress down` removes its data path, which
outlives the daemon) and removes the namespaces."#
    );
    Ok(())
}
