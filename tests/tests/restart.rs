//! The gateway's daemon stopped (SIGTERM) or killed (SIGKILL) under a TCP
//! connection carrying data: its data path stays attached and translating
//! on the pinned state while no daemon runs, and the next start takes it
//! over; the connection never stalls nor meets a reset. A restart (an
//! upgrade) carries an established connection over in every attach mode,
//! and a reload (SIGHUP) too. `egress down` then detaches the data path
//! and leaves the host as the first start found it; it is refused beside
//! a running daemon. A second gateway is refused the state, or the
//! interface, of a running one.
//! Needs root.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{Array, Map, MapData};
use egress_common::state_format::STATE_FORMAT;
use nix::sys::signal::Signal;
use tests::{
    Attach, Attachments, Stack, Topology,
    addrs::{
        CLIENT_TUN_IP, CLIENT_UNDERLAY_IP, GATEWAY_IP, HOST_IFACE, ROUTER_GATEWAY_IP, SERVER_IP,
    },
    attached::gateway_link,
    echo::{udp_request, udp_server},
    egress_bin, exec, exec_output, in_netns, require_root,
};

/// A module `$name` of one `#[test]` per attach mode, each `$scenario`
/// in that mode.
macro_rules! in_every_mode {
    ($name:ident, $scenario:ident) => {
        mod $name {
            #[test]
            fn native() -> anyhow::Result<()> {
                super::$scenario(tests::Attach::Native)
            }

            #[test]
            fn generic() -> anyhow::Result<()> {
                super::$scenario(tests::Attach::Generic)
            }

            #[test]
            fn tc() -> anyhow::Result<()> {
                super::$scenario(tests::Attach::Tc)
            }
        }
    };
}

const PORT: u16 = 9100;
const UDP_PORT: u16 = 9101;
const WAIT: Duration = Duration::from_secs(10);
/// How long the daemon stays down while the connection carries data.
const DOWN: Duration = Duration::from_secs(2);

/// One round: the client sends `msg`, the server reads it whole and sends
/// it back, the client reads the echo.
fn round(client: &mut TcpStream, server: &mut TcpStream, msg: &[u8]) -> Result<()> {
    client.write_all(msg)?;
    let mut got = vec![0; msg.len()];
    server.read_exact(&mut got)?;
    ensure!(got == msg, "server got other bytes");
    server.write_all(&got)?;
    client.read_exact(&mut got)?;
    ensure!(got == msg, "client got other bytes");
    Ok(())
}

/// A TCP connection from the client to the server through the gateway:
/// the client's end, then the server's.
fn connected(stack: &Stack) -> Result<(TcpStream, TcpStream)> {
    let addr = SocketAddr::from((SERVER_IP, PORT));
    let listener = in_netns(&stack.topo.server, || TcpListener::bind(addr))??;
    let client = in_netns(&stack.topo.client, || {
        TcpStream::connect_timeout(&addr, WAIT)
    })??;
    let (server, seen) = listener.accept()?;
    for s in [&client, &server] {
        s.set_read_timeout(Some(WAIT))?;
    }
    ensure!(seen.ip() == GATEWAY_IP, "server saw {seen}");
    Ok((client, server))
}

in_every_mode!(
    established_tcp_connection_survives_a_gateway_restart,
    survives_restart
);

fn survives_restart(attach: Attach) -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let mut stack = Stack::start(&bin, Path::new(env!("CARGO_BIN_EXE_ipip-peer")), attach)?;
    let result = (|| {
        let (mut client, mut server) = connected(&stack)?;
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        round(&mut client, &mut server, &data)?;

        stack.restart_gateway(&bin)?;
        let log = stack.gateway.log();
        ensure!(
            log.contains("resuming the connection state") && log.contains("took over the"),
            "the restarted gateway did not pick up the pinned state and link:\n{log}"
        );
        // Without the old flow the client's next segment would leave from a
        // new translated port, and the server would answer with a reset.
        for _ in 0..3 {
            round(&mut client, &mut server, &data)?;
        }
        Ok(())
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// A TCP connection carries data without pause while the gateway's daemon
/// stops (SIGTERM, as `systemctl stop` does) or is killed (SIGKILL, a
/// crash or the OOM killer), stays down a while and starts again: the
/// data path it left attached goes on translating on the pinned state, so
/// the rounds go on while no daemon runs, and no segment meets the gateway
/// host's own stack, which would answer with a reset. The next daemon
/// takes the data path over; `egress down` then leaves the host as the
/// first start found it, from the record the killed daemon left.
mod a_busy_tcp_connection_flows_while_the_daemon_is_down {
    use super::*;

    #[test]
    fn stopped_native() -> Result<()> {
        flows_while_down("", Attach::Native, Signal::SIGTERM)
    }

    #[test]
    fn killed_native() -> Result<()> {
        flows_while_down("", Attach::Native, Signal::SIGKILL)
    }

    #[test]
    fn stopped_tc() -> Result<()> {
        flows_while_down("", Attach::Tc, Signal::SIGTERM)
    }

    #[test]
    fn killed_tc() -> Result<()> {
        flows_while_down("", Attach::Tc, Signal::SIGKILL)
    }

    /// A clsact filter, as on a kernel without TCX.
    #[test]
    fn stopped_tc_without_tcx() -> Result<()> {
        flows_while_down(env!("CARGO_BIN_EXE_no-tcx"), Attach::Tc, Signal::SIGTERM)
    }
}

/// Echo rounds over one TCP connection through the gateway, without
/// pause, on a thread of their own, counted.
struct Echo {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Echo {
    fn start(stack: &Stack) -> Result<Self> {
        let (mut client, mut server) = connected(stack)?;
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            std::thread::spawn(move || -> Result<()> {
                let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
                while !stop.load(Ordering::Relaxed) {
                    round(&mut client, &mut server, &data)?;
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        };
        Ok(Self {
            stop,
            rounds,
            thread,
        })
    }

    fn rounds(&self) -> usize {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Waits (a while at most) for 50 rounds more than `since`.
    fn going_on(&self, since: usize) -> Result<()> {
        for _ in 0..200 {
            if self.rounds() > since + 50 || self.thread.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        ensure!(
            self.rounds() > since + 50,
            "the connection is not echoing ({} rounds)",
            self.rounds()
        );
        Ok(())
    }

    /// Stops the rounds; the connection's own error (a reset, a stall),
    /// if it broke.
    fn finish(self) -> Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let rounds = self.rounds();
        self.thread
            .join()
            .expect("the echo thread panicked")
            .context("the connection broke")?;
        Ok(rounds)
    }
}

/// [`a_busy_tcp_connection_flows_while_the_daemon_is_down`] with the
/// gateway run by `launcher` in `attach` mode, its daemon ended by
/// `signal`.
fn flows_while_down(launcher: &str, attach: Attach, signal: Signal) -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let ipip_peer = Path::new(env!("CARGO_BIN_EXE_ipip-peer"));
    let mut stack = Stack::start_under(launcher, &bin, ipip_peer, attach, "")?;
    let result = (|| {
        let gw = stack.topo.gateway.clone();
        let found = sysctls_before(&stack.gateway.log());
        let neighbours = || exec(&gw, &format!("ip neigh show dev {HOST_IFACE}"));
        ensure!(
            neighbours()?.contains("managed"),
            "no managed next hop: {}",
            neighbours()?
        );
        let link = gateway_link(&gw, HOST_IFACE)?;
        let echo = Echo::start(&stack)?;
        let outcome = (|| {
            echo.going_on(0)?;
            stack.gateway.signal(signal)?;
            let status = stack.gateway.wait_exit(WAIT)?;
            let at_exit = echo.rounds();
            std::thread::sleep(DOWN);
            echo.going_on(at_exit)
                .context("no traffic while the daemon was down")?;
            if signal == Signal::SIGTERM {
                let log = stack.gateway.log();
                ensure!(
                    status.success() && log.contains("stopped: the data path stays attached"),
                    "no clean stop ({status}):\n{log}"
                );
            }
            ensure!(
                gateway_link(&gw, HOST_IFACE)? == link,
                "the data path changed while no daemon ran"
            );
            let check = exec_output(
                &gw,
                &format!(
                    "{} check --iface {HOST_IFACE} --peer {CLIENT_UNDERLAY_IP} \
                     --client-cidr {CLIENT_TUN_IP}/32 --state-dir {}",
                    bin.display(),
                    stack.topo.lab.state_dir()?.display()
                ),
            )?;
            let report = String::from_utf8_lossy(&check.stdout);
            ensure!(
                check.status.success()
                    && report.contains("info     the data path of a stopped `egress run`"),
                "egress check does not tell of the data path left running:\n{report}"
            );

            let at_start = echo.rounds();
            stack.gateway = stack.topo.start_gateway_under(launcher, &bin, attach, "")?;
            let log = stack.gateway.log();
            ensure!(
                log.contains("took over the") && log.contains("resuming the connection state"),
                "the new daemon did not take the data path over:\n{log}"
            );
            echo.going_on(at_start.max(echo.rounds()))
        })();
        let rounds = echo.finish()?;
        outcome?;
        let seen = Attachments::of(&gw, HOST_IFACE)?;
        ensure!(
            seen.gateway_tc() + usize::from(seen.xdp.is_some()) == 1,
            "expected the gateway attached once after {rounds} rounds: {seen:?}"
        );

        stack.gateway.stop();
        down_leaves_as_found(&stack.topo, &bin, &found, &stack.gateway.log())?;
        ensure!(
            !neighbours()?.contains("managed"),
            "managed neighbour entries left: {}",
            neighbours()?
        );
        Ok(())
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// A reload from the version before the data path outlived the daemon:
/// that image pinned its link as `handover-HOOK-IFINDEX` (the name kept)
/// and passed what it would restore in `EGRESS_HANDOVER`, with no record
/// in the state directory. Played here by a killed gateway whose record is
/// removed, and a new one started with that variable: it must take the
/// link over and record the list, so that `egress down` restores the host
/// as the first gateway found it.
#[test]
fn a_handover_from_the_previous_version_is_taken_over_and_recorded() -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let ipip_peer = Path::new(env!("CARGO_BIN_EXE_ipip-peer"));
    let mut stack = Stack::start(&bin, ipip_peer, Attach::Native)?;
    let result = (|| {
        let gw = stack.topo.gateway.clone();
        let found = sysctls_before(&stack.gateway.log());
        let link = gateway_link(&gw, HOST_IFACE)?;
        stack.gateway.kill()?;
        let state = stack.topo.lab.state_dir()?;
        std::fs::remove_file(state.join("HOST_CHANGES"))?;
        let ifindex: u32 = exec(&gw, &format!("cat /sys/class/net/{HOST_IFACE}/ifindex"))?
            .trim()
            .parse()?;
        let conf = format!("/proc/sys/net/ipv4/conf/{HOST_IFACE}");
        let handover = serde_json::json!({
            "state_dir": state,
            "sysctls": SYSCTLS.iter().zip(&found)
                .map(|(key, was)| (format!("{conf}/{key}"), was))
                .collect::<Vec<_>>(),
            "next_hops": [[ifindex, ROUTER_GATEWAY_IP, true]],
            "clsact": null,
        });
        stack.gateway = stack.topo.start_gateway_under(
            &format!("env EGRESS_HANDOVER={handover}"),
            &bin,
            Attach::Native,
            "",
        )?;
        let log = stack.gateway.log();
        ensure!(
            log.contains("recorded the host changes the previous daemon handed over")
                && log.contains("took over the native XDP link"),
            "the handover was not taken:\n{log}"
        );
        let taken = gateway_link(&gw, HOST_IFACE)?;
        ensure!(
            taken.1 == link.1,
            "not the same link: {link:?}, then {taken:?}"
        );
        stack.gateway.stop();
        down_leaves_as_found(&stack.topo, &bin, &found, &stack.gateway.log())?;
        ensure!(
            !exec(&gw, &format!("ip neigh show dev {HOST_IFACE}"))?.contains("managed"),
            "the handed-over next hop is still managed"
        );
        Ok(())
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// `egress down` beside a running daemon is refused, saying why, and
/// leaves the gateway translating; once the daemon has stopped it takes
/// the gateway down, and again finds nothing to do; `--reset-state` takes
/// the connection state too.
#[test]
fn egress_down_waits_for_the_daemon_and_repeats_harmlessly() -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let ipip_peer = Path::new(env!("CARGO_BIN_EXE_ipip-peer"));
    let mut stack = Stack::start(&bin, ipip_peer, Attach::Native)?;
    let result = (|| {
        let server = SocketAddr::from((SERVER_IP, UDP_PORT));
        let _udp = udp_server(&stack.topo.server, server)?;
        let topo = &stack.topo;
        topo.udp_translated(server)?;
        let refused = topo.egress_down(&bin, "")?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        ensure!(
            !refused.status.success() && stderr.contains("is running on the state in"),
            "egress down beside the daemon: {}\n{stderr}",
            refused.status
        );
        topo.udp_translated(server)
            .context("the refused egress down touched the gateway")?;

        stack.gateway.stop();
        let first = stack.topo.take_down(&bin)?;
        ensure!(
            first.contains("gateway down: its data path is detached"),
            "{first}"
        );
        let again = stack.topo.take_down(&bin)?;
        ensure!(
            again.contains("nothing attached: the gateway is down; its connection state stays in"),
            "{again}"
        );
        let state = stack.topo.lab.state_dir()?;
        let out = stack.topo.egress_down(&bin, "--reset-state")?;
        ensure!(
            out.status.success() && !state.exists(),
            "egress down --reset-state left {}: {}",
            state.display(),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(())
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

in_every_mode!(a_busy_tcp_connection_survives_a_reload, survives_reload);

/// The same in TC mode as on a kernel without TCX (the `no-tcx`
/// launcher): the clsact filter stays across the exec and the new image
/// swaps its program into it.
#[test]
fn a_busy_tcp_connection_survives_a_reload_without_tcx() -> Result<()> {
    survives_reload_under(env!("CARGO_BIN_EXE_no-tcx"), Attach::Tc)
}

/// The interface sysctls the gateway sets.
const SYSCTLS: [&str; 2] = ["forwarding", "accept_local"];

/// The values of [`SYSCTLS`] on the gateway's interface, in namespace `ns`.
fn sysctls_of(ns: &str) -> Result<Vec<String>> {
    SYSCTLS
        .iter()
        .map(|key| {
            let value = exec(ns, &format!("sysctl -n net.ipv4.conf.{HOST_IFACE}.{key}"))?;
            Ok(value.trim().to_owned())
        })
        .collect()
}

/// Checks that the gateway in namespace `ns` left nothing attached and the
/// interface's sysctls as `found` before it; `log` (its log) explains.
fn left_as_found(ns: &str, found: &[String], log: &str) -> Result<()> {
    let left = Attachments::of(ns, HOST_IFACE)?;
    ensure!(
        left.is_empty() && !left.clsact_qdisc,
        "the gateway left {left:?}\n{log}"
    );
    let now = sysctls_of(ns)?;
    ensure!(
        now == found,
        "the interface's {SYSCTLS:?} were {found:?} before the gateway, {now:?} after\n{log}"
    );
    Ok(())
}

/// Takes the gateway down (`egress down`) once its daemon has exited, and
/// checks it left the host as `found` (see [`left_as_found`]); `log` (the
/// daemon's) explains.
fn down_leaves_as_found(topo: &Topology, bin: &Path, found: &[String], log: &str) -> Result<()> {
    let down = topo.take_down(bin)?;
    left_as_found(&topo.gateway, found, &format!("{log}{down}"))
}

/// The values of [`SYSCTLS`] before the gateway set them, from its log
/// (one it found set already is not logged).
fn sysctls_before(log: &str) -> Vec<String> {
    SYSCTLS
        .iter()
        .map(|key| {
            let set = format!("set net.ipv4.conf.{HOST_IFACE}.{key}=1 (was ");
            log.split_once(&set)
                .and_then(|(_, rest)| rest.split_once(')'))
                .map_or("1", |(was, _)| was)
                .to_owned()
        })
        .collect()
}

/// SIGHUP (`systemctl reload egress`) while the client and server echo
/// rounds without pause: the new image of the daemon takes the data path
/// over without detaching it, so no segment meets the gateway host's own
/// stack, which would answer with a reset (as it does in a restart's gap).
/// Then the new image's program runs in the first image's link, and its
/// stop leaves the interface's sysctls as the first image found them.
fn survives_reload(attach: Attach) -> Result<()> {
    survives_reload_under("", attach)
}

/// [`survives_reload`] with the gateway run by `launcher`.
fn survives_reload_under(launcher: &str, attach: Attach) -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let link_of = |stack: &Stack| gateway_link(&stack.topo.gateway, HOST_IFACE);
    let ipip_peer = Path::new(env!("CARGO_BIN_EXE_ipip-peer"));
    let mut stack = Stack::start_under(launcher, &bin, ipip_peer, attach, "")?;
    let result = (|| {
        let before = link_of(&stack)?;
        let found = sysctls_before(&stack.gateway.log());
        let echo = Echo::start(&stack)?;
        let outcome = (|| {
            echo.going_on(0)?;
            stack.gateway.signal(Signal::SIGHUP)?;
            let at_signal = echo.rounds();
            // The new image's readiness (same process, same log).
            stack.gateway.wait_for_times("gateway ready", 2, WAIT)?;
            echo.going_on(echo.rounds())?;
            ensure!(echo.rounds() > at_signal, "no round during the reload");
            Ok(())
        })();
        // The echo's own error says more than that it stopped.
        echo.finish().map_err(|e| e.context("during the reload"))?;
        outcome?;
        let log = stack.gateway.log();
        ensure!(
            log.matches("gateway ready").count() == 2
                && log.matches("resuming the connection state").count() == 1
                && log.contains("took over the"),
            "the new image did not take over the pinned state and link:\n{log}"
        );
        let after = link_of(&stack)?;
        let seen = Attachments::of(&stack.topo.gateway, HOST_IFACE)?;
        ensure!(
            seen.gateway_tc() + usize::from(seen.xdp.is_some()) == 1,
            "expected the gateway attached once: {seen:?}"
        );
        ensure!(
            after.0 != before.0 && after.1 == before.1,
            "expected another program in the same link after the reload: (program, link) \
             {before:?}, then {after:?}"
        );

        // The data path stays after the daemon; whatever the first image
        // set, `egress down` restores.
        stack.gateway.terminate(WAIT)?;
        ensure!(
            link_of(&stack)? == after,
            "the data path did not stay after the daemon"
        );
        down_leaves_as_found(&stack.topo, &bin, &found, "")
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// A reload whose settings do not parse, move the state directory, or do
/// not fit the pinned state (a `max-flows` below the flows it holds, which
/// the new image could not resize it to) is refused, and the gateway goes
/// on as it was.
#[test]
fn a_refused_reload_leaves_the_gateway_running() -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let topo = tests::Topology::new()?;
    let result = (|| {
        let _peer = topo.start_ipip_peer(Path::new(env!("CARGO_BIN_EXE_ipip-peer")))?;
        let config = topo.lab.dir().join("gateway.toml");
        let state = topo.lab.state_dir()?;
        let settings = |state: &Path, max_flows: &str| {
            std::fs::write(
                &config,
                format!(
                    "state-dir = \"{}\"\nmax-flows = {max_flows}\n",
                    state.display()
                ),
            )
        };
        settings(&state, "65536")?;
        let mut gateway = topo.start_gateway_configured(&bin, Attach::Native, &config)?;
        let server = SocketAddr::from((SERVER_IP, UDP_PORT));
        let _udp = udp_server(&topo.server, server)?;
        let translated = || topo.udp_translated(server);
        translated()?;

        // Each `translated` is a flow of its own: 3 by the last reload.
        let unfit = format!(
            "the connection state in {} holds 3 flows, more than max-flows 2 holds (it was \
             made with max-flows 65536): nothing was changed",
            state.display()
        );
        for (state, max_flows, refusal) in [
            (&state, "\"many\"", "config file"),
            (
                &state.with_file_name("elsewhere"),
                "65536",
                "state-dir changed",
            ),
            (&state, "2", &unfit),
        ] {
            settings(state, max_flows)?;
            gateway.signal(Signal::SIGHUP)?;
            gateway.wait_for(&format!("SIGHUP: not reloading: {refusal}"), WAIT)?;
            translated()?;
            ensure!(
                gateway.log().matches("gateway ready").count() == 1,
                "a refused reload started a new image:\n{}",
                gateway.log()
            );
        }
        Ok(())
    })();
    topo.lab.keep_logs_on_err(result)
}

/// SIGKILL (or a crash) gives the daemon no chance to clean up, and needs
/// none: in TC mode its program runs from a TCX link pinned in the state
/// directory, which stays attached and translating, and the next gateway
/// takes that link over, so the program runs exactly once (never an old
/// one beside the new). Seen through `ip`, `tc` and the kernel's TCX
/// query, not through the gateway.
#[test]
fn a_killed_tc_gateways_link_is_taken_over() -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let mut stack = Stack::start(&bin, Path::new(env!("CARGO_BIN_EXE_ipip-peer")), Attach::Tc)?;
    let result = (|| {
        let server = SocketAddr::from((SERVER_IP, UDP_PORT));
        let _udp = udp_server(&stack.topo.server, server)?;
        let translated = |stack: &Stack| -> Result<()> {
            let reply = udp_request(&stack.topo.client, CLIENT_TUN_IP, server, b"hello")?;
            ensure!(reply.seen.ip() == GATEWAY_IP, "server saw {}", reply.seen);
            Ok(())
        };
        let attached_once = |stack: &Stack| -> Result<()> {
            let seen = Attachments::of(&stack.topo.gateway, HOST_IFACE)?;
            ensure!(
                seen.tcx == ["egress_tc"] && seen.clsact.is_empty() && seen.xdp.is_none(),
                "expected the TC program once, on TCX ingress: {seen:?}"
            );
            // TCX needs no qdisc, so none is added.
            ensure!(!seen.clsact_qdisc, "a clsact qdisc was added: {seen:?}");
            Ok(())
        };
        attached_once(&stack)?;
        ensure!(
            stack
                .gateway
                .log()
                .contains("attach tc: TCX link on eth0 ingress"),
            "the gateway did not say how it attached:\n{}",
            stack.gateway.log()
        );
        translated(&stack)?;
        let link = gateway_link(&stack.topo.gateway, HOST_IFACE)?;

        stack.gateway.kill()?;
        attached_once(&stack)?;
        translated(&stack)?;

        stack.gateway = stack.topo.start_gateway(&bin, Attach::Tc)?;
        attached_once(&stack)?;
        let taken = gateway_link(&stack.topo.gateway, HOST_IFACE)?;
        ensure!(
            taken.1 == link.1 && taken.0 != link.0,
            "expected the new program in the killed gateway's link: (program, link) {link:?}, \
             then {taken:?}"
        );
        translated(&stack)
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// A second `egress run` on the state of a running one (an operator
/// starting it by hand beside the service) is refused with a message that
/// says so, before it loads, resets or attaches anything: even with
/// `--reset-state` the running gateway's flows stay, and it goes on
/// translating from the same port.
#[test]
fn a_second_gateway_is_refused_the_state_of_a_running_one() -> Result<()> {
    refuses_a_second_gateway(
        "",
        Attach::Native,
        "--attach generic --reset-state",
        None,
        "another `egress run` is using the state in",
    )
}

/// A second `egress run` with a state directory of its own on the
/// interface a gateway runs on is refused before it attaches: native XDP
/// in front of a TC gateway, or TC behind an XDP one, would take packets
/// of the running gateway's flows, with flows of its own.
mod a_second_gateway_is_refused_the_interface_of_a_running_one {
    use super::*;

    const REFUSAL: &str = "another egress gateway runs on";

    #[test]
    fn native_in_front_of_tc() -> Result<()> {
        refuses_a_second_gateway("", Attach::Tc, "--attach auto", Some("second"), REFUSAL)
    }

    #[test]
    fn tc_behind_native() -> Result<()> {
        refuses_a_second_gateway("", Attach::Native, "--attach tc", Some("second"), REFUSAL)
    }

    /// Both in TC mode without TCX: the second would take over the first's
    /// clsact filter as a killed gateway's.
    #[test]
    fn tc_in_place_of_tc_without_tcx() -> Result<()> {
        let no_tcx = env!("CARGO_BIN_EXE_no-tcx");
        refuses_a_second_gateway(no_tcx, Attach::Tc, "--attach tc", Some("second"), REFUSAL)
    }
}

/// Starts a gateway in `first` mode with a UDP flow through it, then a
/// second one with `args` on the state directory `state` (beside the
/// first's; `None`: the first's), which must fail, saying `refusal`. The
/// first gateway's flow must go on as it was. Both run under `launcher`
/// (see `Topology::start_gateway_under`).
fn refuses_a_second_gateway(
    launcher: &str,
    first: Attach,
    args: &str,
    state: Option<&str>,
    refusal: &str,
) -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let ipip_peer = Path::new(env!("CARGO_BIN_EXE_ipip-peer"));
    let stack = Stack::start_under(launcher, &bin, ipip_peer, first, "")?;
    let result = (|| {
        let server = SocketAddr::from((SERVER_IP, UDP_PORT));
        let _udp = udp_server(&stack.topo.server, server)?;
        let client = tests::echo::UdpClient::bind(&stack.topo.client, CLIENT_TUN_IP)?;
        let before = client.request(server, b"one")?.seen;
        ensure!(before.ip() == GATEWAY_IP, "server saw {before}");

        let first_state = stack.topo.lab.state_dir()?;
        let state_dir = match state {
            Some(name) => first_state.with_file_name(name),
            None => first_state,
        };
        // Stopped should it run: a refusal comes at once.
        let second = exec_output(
            &stack.topo.gateway,
            &format!(
                "timeout 20 {launcher} {} run --iface {HOST_IFACE} --peer {CLIENT_UNDERLAY_IP} \
                 --client-cidr {CLIENT_TUN_IP}/32 --state-dir {} {args}",
                bin.display(),
                state_dir.display()
            ),
        )?;
        let stderr = String::from_utf8_lossy(&second.stderr);
        ensure!(!second.status.success(), "the second gateway ran: {stderr}");
        ensure!(
            stderr.contains(refusal),
            "the refusal does not say why: {stderr}"
        );

        let after = client.request(server, b"two")?.seen;
        ensure!(
            after == before,
            "the running gateway's flow was lost: {before} became {after}"
        );
        Ok(())
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// A reload to a binary that fails before it takes the data path over (an
/// upgrade that no longer accepts the arguments, or the settings, the
/// running one was started with, or whose data path does not fit the
/// pinned state) exits as a stop would: the first image's data path stays
/// attached and translating, and `egress down` leaves the host as found.
mod a_new_image_that_refuses_its_settings_leaves_the_data_path_running {
    use super::*;

    #[test]
    fn arguments() -> Result<()> {
        refused_reload("--no-such-option", "unexpected argument")
    }

    #[test]
    fn settings() -> Result<()> {
        refused_reload("--mss 10", "mss: 10 is below")
    }

    /// Past the running image's check of the settings it reads (its own
    /// arguments), as an upgrade with another state format would be: a
    /// `max-flows` below the 2 flows the state holds.
    #[test]
    fn state() -> Result<()> {
        refused_reload(
            "--max-flows 1",
            "holds 2 flows, more than max-flows 1 holds",
        )
    }
}

/// The state records its format. State of another format (a newer
/// version's, found after a rollback) is refused by a start and named by
/// `egress check`, rather than read as garbage, and the data path left
/// running goes on translating; a start with `--reset-state` begins anew,
/// in this version's format.
#[test]
fn state_of_another_format_is_refused() -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let topo = Topology::new()?;
    let result = (|| {
        let _peer = topo.start_ipip_peer(Path::new(env!("CARGO_BIN_EXE_ipip-peer")))?;
        let state = topo.lab.state_dir()?;
        let mut gateway = topo.start_gateway(&bin, Attach::Native)?;
        let server = SocketAddr::from((SERVER_IP, UDP_PORT));
        let _udp = udp_server(&topo.server, server)?;
        topo.udp_translated(server)?;
        gateway.terminate(WAIT)?;
        ensure!(
            recorded_format(&state)? == STATE_FORMAT,
            "the start recorded no format {STATE_FORMAT}"
        );

        let newer = STATE_FORMAT + 1;
        std::fs::remove_file(state.join("STATE_FORMAT"))?;
        let mut record = Array::<MapData, u32>::create(1, 0)?;
        record.set(0, &newer, 0)?;
        record.pin(state.join("STATE_FORMAT"))?;
        let why = format!(
            "the connection state in {} is in format {newer}, written by a newer version of \
             egress (this one reads format {STATE_FORMAT}); run the version that wrote it, or \
             start over with --reset-state",
            state.display()
        );
        let (status, log) = topo.run_gateway_refused(&bin, WAIT)?;
        ensure!(
            !status.success() && log.contains(&why),
            "the start was not refused saying {why:?} ({status}):\n{log}"
        );
        let check = exec_output(
            &topo.gateway,
            &format!(
                "{} check --iface {HOST_IFACE} --peer {CLIENT_UNDERLAY_IP} --client-cidr \
                 10.0.0.0/16 --state-dir {}",
                bin.display(),
                state.display()
            ),
        )?;
        let report = String::from_utf8_lossy(&check.stdout);
        let named = format!("is in format {newer}, written by a newer version of egress");
        ensure!(
            !check.status.success()
                && report
                    .lines()
                    .any(|l| l.starts_with("PROBLEM") && l.contains(&named)),
            "check did not name the format:\n{report}"
        );
        ensure!(
            recorded_format(&state)? == newer,
            "the refused start changed the record"
        );
        topo.udp_translated(server)
            .context("the data path left running stopped translating")?;

        let mut gateway = topo.start_gateway_with(&bin, Attach::Native, "--reset-state")?;
        topo.udp_translated(server)?;
        gateway.terminate(WAIT)?;
        ensure!(
            recorded_format(&state)? == STATE_FORMAT,
            "the reset state is not in format {STATE_FORMAT}"
        );
        topo.take_down(&bin)?;
        Ok(())
    })();
    topo.lab.keep_logs_on_err(result)
}

/// The state format recorded in `state`.
fn recorded_format(state: &Path) -> Result<u32> {
    let pin = MapData::from_pin(state.join("STATE_FORMAT"))?;
    Ok(Array::<_, u32>::try_from(Map::from_map_data(pin)?)?.get(&0, 0)?)
}

/// Starts the gateway from a copy of the binary, puts in its place a
/// wrapper that runs it with `extra` arguments, and sends SIGHUP: the new
/// image must fail, saying `why`.
fn refused_reload(extra: &str, why: &str) -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let topo = Topology::new()?;
    let result = (|| {
        let copy = topo.lab.dir().join("egress");
        std::fs::copy(&bin, &copy)?;
        let _peer = topo.start_ipip_peer(Path::new(env!("CARGO_BIN_EXE_ipip-peer")))?;
        let mut gateway = topo.start_gateway(&copy, Attach::Native)?;
        let found = sysctls_before(&gateway.log());
        let server = SocketAddr::from((SERVER_IP, UDP_PORT));
        let _udp = udp_server(&topo.server, server)?;
        // Two flows (a socket each).
        topo.udp_translated(server)?;
        topo.udp_translated(server)?;
        // Renamed into place, as a package manager upgrades.
        let wrapper = topo.lab.dir().join("egress.new");
        std::fs::write(
            &wrapper,
            format!("#!/bin/sh\nexec {} \"$@\" {extra}\n", bin.display()),
        )?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&wrapper, &copy)?;

        gateway.signal(Signal::SIGHUP)?;
        let status = gateway.wait_exit(WAIT)?;
        let log = gateway.log();
        ensure!(!status.success(), "the refusing image ran: {status}\n{log}");
        ensure!(
            log.contains(why),
            "the new image did not say {why:?}:\n{log}"
        );
        topo.udp_translated(server)
            .with_context(|| format!("the data path went with the image:\n{log}"))?;
        down_leaves_as_found(&topo, &bin, &found, &log)?;
        let pins: Vec<_> = std::fs::read_dir(topo.lab.state_dir()?)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("handover-") || n == "HOST_CHANGES")
            .collect();
        ensure!(pins.is_empty(), "left pinned: {pins:?}");
        Ok(())
    })();
    topo.lab.keep_logs_on_err(result)
}

/// A stop requested with a reload (`systemctl reload` just before `systemctl
/// stop`) stops the gateway whichever of the two it sees first: the stop
/// is not lost with the image that handed over; `egress down` then leaves
/// the host as found. Both signals reach the stopped daemon, so they are
/// pending together.
#[test]
fn a_stop_requested_with_a_reload_stops() -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let mut stack = Stack::start(
        &bin,
        Path::new(env!("CARGO_BIN_EXE_ipip-peer")),
        Attach::Native,
    )?;
    let result = (|| {
        let found = sysctls_before(&stack.gateway.log());
        for signal in [
            Signal::SIGSTOP,
            Signal::SIGHUP,
            Signal::SIGTERM,
            Signal::SIGCONT,
        ] {
            stack.gateway.signal(signal)?;
        }
        let status = stack.gateway.wait_exit(WAIT);
        let log = stack.gateway.log();
        let status = status.with_context(|| format!("the stop was lost:\n{log}"))?;
        ensure!(status.success(), "the gateway exited {status}:\n{log}");
        down_leaves_as_found(&stack.topo, &bin, &found, &log)
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// The state directory removed under a running gateway (`rm -r`, meaning
/// to start over, or a clean-up script) does not take its flows with it:
/// the gateway pins its state there again, so that a restart (once it has,
/// within its 10 s) or a reload (at once) picks it up, and an established
/// connection goes on. `--reset-state` is the way to start over.
mod a_state_removed_under_a_running_gateway_is_pinned_again {
    use super::*;

    #[test]
    fn for_a_restart() -> Result<()> {
        state_removed_then(|stack, bin| {
            stack
                .gateway
                .wait_for("pinned its own again", Duration::from_secs(30))?;
            stack.restart_gateway(bin)
        })
    }

    #[test]
    fn for_a_reload() -> Result<()> {
        state_removed_then(|stack, _| {
            stack.gateway.signal(Signal::SIGHUP)?;
            stack.gateway.wait_for_times("gateway ready", 2, WAIT)
        })
    }
}

/// A TCP connection through a gateway whose state directory is then
/// removed; `then` restarts or reloads the gateway, and the connection must
/// go on through the new one, which resumed the state.
fn state_removed_then(then: impl FnOnce(&mut Stack, &Path) -> Result<()>) -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let ipip_peer = Path::new(env!("CARGO_BIN_EXE_ipip-peer"));
    let mut stack = Stack::start(&bin, ipip_peer, Attach::Native)?;
    let result = (|| {
        let (mut client, mut server) = connected(&stack)?;
        let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
        round(&mut client, &mut server, &data)?;
        std::fs::remove_dir_all(stack.topo.lab.state_dir()?)?;
        then(&mut stack, &bin)?;
        let log = stack.gateway.log();
        ensure!(
            log.contains("resuming the connection state"),
            "the new gateway did not find the state:\n{log}"
        );
        for _ in 0..3 {
            round(&mut client, &mut server, &data)?;
        }
        Ok(())
    })();
    stack.topo.lab.keep_logs_on_err(result)
}
