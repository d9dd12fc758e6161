//! The gateway follows its interface over netlink: deleted and created
//! again (a new index), it attaches again in the same mode; its address
//! changed, it loads the data path again with the new defaulted address;
//! its next hop's MAC address changed, the data path's remembered routes
//! give way to the new one. Either way the pinned connection state carries
//! the existing flow over: the same client socket keeps its translation,
//! and the flow's counters continue. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use egress_user::clsact;
use nix::sys::signal::Signal;
use tests::{
    Attach, Attachments, Stack, Topology,
    addrs::{
        CLIENT_TUN_IP, CLIENT_UNDERLAY_IP, GATEWAY_IP, HOST_IFACE, LINK_PREFIX,
        ROUTER_GATEWAY_IFACE, ROUTER_GATEWAY_IP, SERVER_IP,
    },
    attached::gateway_link,
    echo::{UdpClient, udp_server},
    egress_bin, exec, require_root,
    topology::start_ipip_peer,
};

const PORT: u16 = 9300;
/// Netlink notifications arrive at once; loading the programs again can
/// take a while on a busy machine.
const FOLLOW: Duration = Duration::from_secs(60);
/// The gateway's new address in the address-change scenario.
const NEW_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 20);
/// The router's new MAC address in the next-hop scenario.
const NEW_ROUTER_MAC: &str = "02:00:00:00:01:99";

mod survives_its_interface_deleted_and_created_again {
    use super::*;

    #[test]
    fn native() -> Result<()> {
        interface_recreated(Attach::Native)
    }

    #[test]
    fn generic() -> Result<()> {
        interface_recreated(Attach::Generic)
    }

    #[test]
    fn tc() -> Result<()> {
        interface_recreated(Attach::Tc)
    }
}

const IPIP_PEER: &str = env!("CARGO_BIN_EXE_ipip-peer");
/// Runs the gateway as on a kernel without TCX (see its source).
const NO_TCX: &str = env!("CARGO_BIN_EXE_no-tcx");

/// The topology with the gateway attached as `attach` and the client's
/// tunnel endpoint.
fn stack(egress: &Path, attach: Attach) -> Result<Stack> {
    Stack::start(egress, Path::new(IPIP_PEER), attach)
}

/// A client socket exchanging UDP with the server through the gateway.
struct Exchange {
    client: UdpClient,
    server: SocketAddr,
}

/// A client's flow as `egress flows --json` lists it.
#[derive(Debug)]
struct FlowSeen {
    translation: String,
    packets_out: u64,
    packets_in: u64,
}

impl Exchange {
    /// One request and reply; returns the source the server saw.
    fn round(&self, n: u8) -> Result<SocketAddr> {
        let reply = self.client.request(self.server, &[n; 100])?;
        ensure!(reply.body == [n; 100], "the echo came back altered");
        Ok(reply.seen)
    }

    fn flow(&self, stack: &Stack, egress: &Path) -> Result<FlowSeen> {
        let client = self.client.local_addr()?.to_string();
        let out = stack.egress_cli(egress, "flows --json --proto udp")?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).context("flows --json")?;
        let row = rows
            .iter()
            .find(|r| r["client"] == client.as_str())
            .with_context(|| format!("no flow of {client} in the state:\n{out}"))?;
        let packets = |dir: &str| row[dir]["packets"].as_u64().unwrap_or(0);
        Ok(FlowSeen {
            translation: row["translation"].as_str().unwrap_or("").to_owned(),
            packets_out: packets("out"),
            packets_in: packets("in"),
        })
    }
}

/// Runs `scenario` between two exchanges of one client socket, and checks
/// that the second left from the same translation on the same flow, whose
/// counters went on from where they were.
fn across(
    stack: &mut Stack,
    egress: &Path,
    scenario: impl FnOnce(&mut Stack) -> Result<()>,
) -> Result<()> {
    let server = SocketAddr::from((SERVER_IP, PORT));
    let _udp = udp_server(&stack.topo.server, server)?;
    let x = Exchange {
        client: UdpClient::bind(&stack.topo.client, CLIENT_TUN_IP)?,
        server,
    };
    let seen = x.round(1)?;
    ensure!(seen.ip() == GATEWAY_IP, "server saw {seen}");
    let before = x.flow(stack, egress)?;
    ensure!(before.translation == seen.to_string(), "{before:?}");

    scenario(stack)?;

    let again = x.round(2)?;
    ensure!(
        again == seen,
        "the client's translation changed from {seen} to {again}: the flow was lost"
    );
    let after = x.flow(stack, egress)?;
    ensure!(
        after.translation == before.translation
            && after.packets_out > before.packets_out
            && after.packets_in > before.packets_in,
        "the flow did not carry over: before {before:?}, after {after:?}"
    );
    Ok(())
}

fn interface_recreated(attach: Attach) -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let mut stack = stack(&egress, attach)?;
    let result = across(&mut stack, &egress, |stack| {
        stack.topo.unlink_gateway()?;
        stack.gateway.wait_for("the interface is gone", FOLLOW)?;
        stack.topo.relink_gateway()?;
        stack.gateway.wait_for("re-attached", FOLLOW)?;
        let log = stack.gateway.log();
        ensure!(
            log.contains(&format!(
                "re-attached: attached to {HOST_IFACE} as {}",
                hook(attach)
            )),
            "not attached again in the same mode:\n{log}"
        );
        Ok(())
    })
    .and_then(|()| {
        let out = exec(&stack.topo.client, &format!("ping -c 1 -W 5 {SERVER_IP}"))?;
        ensure!(out.contains("1 received"), "{out}");
        Ok(())
    });
    stack.topo.lab.keep_logs_on_err(result)
}

/// A reload (SIGHUP) asked for while the interface is gone waits until a
/// new image of the daemon could start: the interface back, with the
/// address its tunnel address defaults from.
#[test]
fn a_reload_waits_for_its_interface() -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let mut stack = stack(&egress, Attach::Native)?;
    let result = across(&mut stack, &egress, |stack| {
        stack.topo.unlink_gateway()?;
        stack.gateway.wait_for("the interface is gone", FOLLOW)?;
        stack.gateway.signal(Signal::SIGHUP)?;
        stack
            .gateway
            .wait_for("reloading once a new image can start", FOLLOW)?;
        ensure!(
            stack.gateway.log().matches("gateway ready").count() == 1,
            "reloaded without the interface:\n{}",
            stack.gateway.log()
        );
        stack.topo.relink_gateway()?;
        stack.gateway.wait_for_times("gateway ready", 2, FOLLOW)?;
        Ok(())
    });
    stack.topo.lab.keep_logs_on_err(result)
}

/// On a kernel without TCX (emulated), the address changes while another
/// tool's filter sits at the gateway's place on clsact ingress (its own
/// was removed and replaced under it): loaded again, the programs cannot
/// take the place, and the old ones go on in the filter handed over. Then
/// that filter is gone, and a reload's new image attaches. The clsact
/// qdisc the first image added must still go with `egress down`.
#[test]
fn without_tcx_a_reload_after_a_failed_follow_removes_the_qdisc_it_added() -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let topo = Topology::new()?;
    let result = (|| {
        let gw = &topo.gateway;
        let untouched = Attachments::of(gw, HOST_IFACE)?;
        ensure!(!untouched.clsact_qdisc, "{untouched:?}");
        let mut gateway = topo.start_gateway_under(NO_TCX, &egress, Attach::Tc, "")?;
        let seen = Attachments::of(gw, HOST_IFACE)?;
        ensure!(seen.clsact_qdisc && seen.gateway_tc() == 1, "{seen:?}");
        let other = topo.lab.dir().join("other.bpf");
        std::fs::write(&other, "1,6 0 0 0,")?;
        let place = format!(
            "protocol all pref {} handle {:#x} bpf",
            clsact::PRIORITY,
            u32::from(clsact::HANDLE)
        );
        exec(
            gw,
            &format!("tc filter del dev {HOST_IFACE} ingress {place}"),
        )?;
        exec(
            gw,
            &format!(
                "tc filter add dev {HOST_IFACE} ingress {place} bytecode-file {}",
                other.display()
            ),
        )?;
        for cmd in [
            format!("ip addr del {GATEWAY_IP}/{LINK_PREFIX} dev {HOST_IFACE}"),
            format!("ip addr add {NEW_IP}/{LINK_PREFIX} dev {HOST_IFACE}"),
        ] {
            exec(gw, &cmd)?;
        }
        gateway.wait_for("trying again at the interface's next change", FOLLOW)?;
        exec(
            gw,
            &format!("tc filter del dev {HOST_IFACE} ingress {place}"),
        )?;
        gateway.signal(Signal::SIGHUP)?;
        gateway.wait_for_times("gateway ready", 2, FOLLOW)?;
        let seen = Attachments::of(gw, HOST_IFACE)?;
        ensure!(seen.gateway_tc() == 1, "after the reload: {seen:?}");
        gateway.terminate(FOLLOW)?;
        let down = topo.take_down(&egress)?;
        let left = Attachments::of(gw, HOST_IFACE)?;
        ensure!(
            left == untouched,
            "the gateway left {left:?}\n{}{down}",
            gateway.log()
        );
        Ok(())
    })();
    topo.lab.keep_logs_on_err(result)
}

/// How the gateway names the hook of `attach`.
fn hook(attach: Attach) -> &'static str {
    match attach {
        Attach::Native => "native XDP",
        Attach::Generic => "generic XDP",
        Attach::Tc => "TC",
    }
}

/// The interface's first address changes under a gateway whose tunnel
/// address was defaulted from it (the topology gives `--snat`, so that
/// stays). The peer is pointed at the new address; the old one stays as a
/// secondary for the translation.
#[test]
fn follows_a_new_address_of_its_interface() -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let mut stack = stack(&egress, Attach::Native)?;
    let result = across(&mut stack, &egress, |stack| {
        let gw = &stack.topo.gateway;
        let before = gateway_link(gw, HOST_IFACE)?;
        for cmd in [
            format!("ip addr del {GATEWAY_IP}/{LINK_PREFIX} dev {HOST_IFACE}"),
            format!("ip addr add {NEW_IP}/{LINK_PREFIX} dev {HOST_IFACE}"),
            format!("ip addr add {GATEWAY_IP}/{LINK_PREFIX} dev {HOST_IFACE}"),
            format!("ip route add default via {ROUTER_GATEWAY_IP}"),
        ] {
            exec(gw, &cmd)?;
        }
        stack
            .gateway
            .wait_for("loading the data path again", FOLLOW)?;
        stack.gateway.wait_for("re-attached", FOLLOW)?;
        ensure!(
            stack
                .gateway
                .log()
                .contains(&format!("tunnel_local={NEW_IP}")),
            "the tunnel address did not follow:\n{}",
            stack.gateway.log()
        );
        // The new programs took the old ones' place without a gap.
        let after = gateway_link(&stack.topo.gateway, HOST_IFACE)?;
        ensure!(
            after.0 != before.0 && after.1 == before.1,
            "expected the new program in the old one's link: (program, link) {before:?}, \
             then {after:?}"
        );
        stack.peer.stop();
        stack.peer = start_ipip_peer(
            &stack.topo.lab,
            &stack.topo.client,
            Path::new(IPIP_PEER),
            CLIENT_UNDERLAY_IP,
            NEW_IP,
        )?;
        Ok(())
    });
    stack.topo.lab.keep_logs_on_err(result)
}

/// The router's interface toward the gateway gets a new MAC address, and
/// the gateway's neighbour entry learns it (as a gratuitous ARP would teach
/// it). Frames still sent to the old address would be dropped by the
/// router: the flow only goes on if the data path gave up the next hop it
/// remembered for both directions (the server behind the router, the
/// client's peer behind it too).
#[test]
fn follows_a_new_mac_address_of_its_next_hop() -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let mut stack = stack(&egress, Attach::Native)?;
    let result = across(&mut stack, &egress, new_next_hop_mac);
    stack.topo.lab.keep_logs_on_err(result)
}

/// As [`follows_a_new_mac_address_of_its_next_hop`], the daemon stopped
/// first (its data path left attached): with no daemon to hear of the
/// change, the data path must answer from the FIB, not from the next hops
/// it remembered.
#[test]
fn follows_a_new_mac_address_of_its_next_hop_while_no_daemon_runs() -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let mut stack = stack(&egress, Attach::Native)?;
    let result = across(&mut stack, &egress, |stack| {
        stack.gateway.stop();
        new_next_hop_mac(stack)
    });
    stack.topo.lab.keep_logs_on_err(result)
}

/// Gives the router's interface toward the gateway a new MAC address, and
/// teaches it to the gateway's neighbour entry.
fn new_next_hop_mac(stack: &mut Stack) -> Result<()> {
    exec(
        &stack.topo.router,
        &format!("ip link set dev {ROUTER_GATEWAY_IFACE} address {NEW_ROUTER_MAC}"),
    )?;
    exec(
        &stack.topo.gateway,
        &format!("ip neigh replace {ROUTER_GATEWAY_IP} lladdr {NEW_ROUTER_MAC} dev {HOST_IFACE}"),
    )?;
    Ok(())
}

/// The gateway's neighbour entry for the router, with its flags.
fn next_hop_entry(gateway: &str) -> Result<String> {
    exec(
        gateway,
        &format!("ip -d neigh show {ROUTER_GATEWAY_IP} dev {HOST_IFACE}"),
    )
}

/// The router's interface toward the gateway gets a new MAC address and
/// says nothing (no gratuitous ARP). The gateway's kernel finds out by
/// itself, probing the next hop's neighbour entry the daemon marked
/// managed, and the flow goes on. Unmanaged, the entry would go STALE with
/// the old address, which the data path would go on using.
#[test]
fn finds_out_a_new_mac_address_of_its_next_hop_by_itself() -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let topo = Topology::new()?;
    // Quick reachability checks, set before the entry is first resolved,
    // so this takes seconds, not a minute.
    for (knob, value) in [
        ("base_reachable_time_ms", 500),
        ("delay_first_probe_time", 1),
        ("retrans_time_ms", 100),
    ] {
        exec(
            &topo.gateway,
            &format!("sysctl -qw net.ipv4.neigh.{HOST_IFACE}.{knob}={value}"),
        )?;
    }
    let attach = Attach::Native;
    let mut stack = Stack {
        peer: topo.start_ipip_peer(Path::new(IPIP_PEER))?,
        gateway: topo.start_gateway(&egress, attach)?,
        topo,
        attach,
    };
    let result = across(&mut stack, &egress, |stack| {
        let entry = || next_hop_entry(&stack.topo.gateway);
        let now = entry()?;
        ensure!(
            now.contains("managed"),
            "the next hop is not managed: {now}"
        );
        exec(
            &stack.topo.router,
            &format!("ip link set dev {ROUTER_GATEWAY_IFACE} address {NEW_ROUTER_MAC}"),
        )?;
        // A hang guard only.
        let deadline = Instant::now() + FOLLOW;
        while !entry()?.contains(NEW_ROUTER_MAC) {
            ensure!(
                Instant::now() < deadline,
                "the new MAC address was never learnt: {}",
                entry()?
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    });
    stack.topo.lab.keep_logs_on_err(result)
}

/// A next hop whose neighbour entry the operator made static is left as it
/// is: not made managed while the gateway runs, not removed when it stops.
#[test]
fn leaves_a_static_next_hop_entry_alone() -> Result<()> {
    require_root()?;
    let egress = egress_bin()?;
    let topo = Topology::new()?;
    let result = (|| {
        let mac = exec(
            &topo.router,
            &format!("cat /sys/class/net/{ROUTER_GATEWAY_IFACE}/address"),
        )?;
        let entry = || next_hop_entry(&topo.gateway);
        exec(
            &topo.gateway,
            &format!(
                "ip neigh replace {ROUTER_GATEWAY_IP} lladdr {} dev {HOST_IFACE} nud permanent",
                mac.trim()
            ),
        )?;
        let before = entry()?;
        let mut gw = topo.start_gateway(&egress, Attach::Native)?;
        gw.wait_for("is static: left as it is", FOLLOW)?;
        ensure!(entry()? == before, "while running: {}", entry()?);
        gw.stop();
        ensure!(entry()? == before, "after it stopped: {}", entry()?);
        Ok(())
    })();
    topo.lab.keep_logs_on_err(result)
}
