//! A gateway started (or reloaded) with another `max-flows` than its
//! pinned connection state was made with resizes the state, keeping every
//! flow: the same translations, data both ways, the counters `egress
//! flows` shows, and a table of the new size. A shrink below the flows
//! the state holds is refused before anything changes. Needs root.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, ensure};
use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData};
use egress_common::{
    flow::{Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Mapping, PortKey},
    tcp::{ACK, FIN, SYN},
};
use egress_user::{pinning, resize, state_fit};
use nix::sys::signal::Signal;
use tests::{
    Attach, Lab, Stack, Topology,
    addrs::{CLIENT_CIDRS, CLIENT_TUN_IP, CLIENT_UNDERLAY_IP, GATEWAY_IP, HOST_IFACE, SERVER_IP},
    echo::{UdpClient, udp_server},
    egress_bin, exec_output, in_netns, require_root,
};

const IPIP_PEER: &str = env!("CARGO_BIN_EXE_ipip-peer");
const TCP_PORT: u16 = 9500;
const UDP_PORT: u16 = 9501;
const WAIT: Duration = Duration::from_secs(10);
/// Longer than Linux's largest delayed-ACK timeout (200 ms): a restart's
/// gap then meets no segment, which the host's own stack would answer
/// with a reset (see README, "Restarts").
const QUIET: Duration = Duration::from_secs(1);
/// `BPF_F_NO_PREALLOC`, as the client counts are made.
const BPF_F_NO_PREALLOC: u32 = 1;

fn udp_server_addr() -> SocketAddr {
    SocketAddr::from((SERVER_IP, UDP_PORT))
}

/// A TCP connection through the gateway, both of its ends.
struct Tcp {
    client: TcpStream,
    server: TcpStream,
}

impl Tcp {
    /// Connects the client to `listener` (on the server); returns the
    /// connection and the translated address the server saw.
    fn open(stack: &Stack, listener: &TcpListener) -> Result<(Self, SocketAddr)> {
        let to = listener.local_addr()?;
        let client = in_netns(&stack.topo.client, || TcpStream::connect_timeout(&to, WAIT))??;
        let (server, seen) = listener.accept()?;
        client.set_read_timeout(Some(WAIT))?;
        server.set_read_timeout(Some(WAIT))?;
        Ok((Self { client, server }, seen))
    }

    /// Sends a block of `fill` each way at once, and checks both arrive.
    fn exchange(&mut self, fill: u8) -> Result<()> {
        let (up, down) = (vec![fill; 16 * 1024], vec![!fill; 16 * 1024]);
        self.client.write_all(&up)?;
        self.server.write_all(&down)?;
        let mut got = vec![0; up.len()];
        self.server
            .read_exact(&mut got)
            .context("client to server")?;
        ensure!(got == up, "the server got other bytes");
        self.client
            .read_exact(&mut got)
            .context("server to client")?;
        ensure!(got == down, "the client got other bytes");
        Ok(())
    }
}

/// A new UDP flow: a client socket, answered, and the translated address
/// the server saw it from.
fn udp_flow(client_ns: &str) -> Result<(UdpClient, SocketAddr)> {
    let client = UdpClient::bind(client_ns, CLIENT_TUN_IP)?;
    let seen = client.request(udp_server_addr(), b"new")?.seen;
    ensure!(seen.ip() == GATEWAY_IP, "the server saw {seen}");
    Ok((client, seen))
}

/// Each client's next request leaves from the translation it had.
fn same_translations(flows: &[(UdpClient, SocketAddr)]) -> Result<()> {
    for (client, before) in flows {
        let now = client.request(udp_server_addr(), b"again")?.seen;
        ensure!(
            now == *before,
            "a UDP flow lost its translation: {before}, now {now}"
        );
    }
    Ok(())
}

/// The flows `egress flows` lists, by translation: protocol, packets out
/// and in.
fn listed(stack: &Stack, bin: &Path) -> Result<BTreeMap<String, (String, u64, u64)>> {
    let out = stack.egress_cli(bin, "flows --json")?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).context("flows --json")?;
    let count = |row: &serde_json::Value, leg: &str| row[leg]["packets"].as_u64().unwrap_or(0);
    Ok(rows
        .iter()
        .map(|r| {
            (
                r["translation"].as_str().unwrap_or_default().to_owned(),
                (
                    r["proto"].as_str().unwrap_or_default().to_owned(),
                    count(r, "out"),
                    count(r, "in"),
                ),
            )
        })
        .collect())
}

fn state_dir(stack: &Stack) -> Result<PathBuf> {
    stack.topo.lab.state_dir()
}

/// Whether the maps sized from `max-flows` pinned in `dir` have the size
/// of `max_flows`, and no resize left pins there.
fn sized_for(dir: &Path, max_flows: u32) -> Result<()> {
    for (name, per_flow) in resize::SIZED {
        let size = MapData::from_pin(dir.join(name))?.info()?.max_entries();
        ensure!(
            size == max_flows * per_flow,
            "{name} has {size} entries, not those of max-flows {max_flows}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("resize-"))
        .collect();
    ensure!(left.is_empty(), "pins left: {left:?}");
    Ok(())
}

/// Whether the gateway said it resized its state from `from` to `to`
/// `max-flows`, and caught it up once attached, and the state is so.
fn resized(stack: &Stack, from: u32, to: u32) -> Result<()> {
    let log = stack.gateway.log();
    ensure!(
        log.contains(&format!(
            "resized the connection state from max-flows {from} to {to}"
        )) && log.contains("caught up the resized connection state after the attach"),
        "the gateway did not resize its state:\n{log}"
    );
    sized_for(&state_dir(stack)?, to)
}

/// `egress VERB` with the gateway's settings and `extra` in its namespace:
/// whether it succeeded, and what it printed.
fn egress(stack: &Stack, bin: &Path, verb: &str, extra: &str) -> Result<(bool, String)> {
    let cidrs: Vec<String> = CLIENT_CIDRS
        .iter()
        .map(|c| format!("--client-cidr {c}"))
        .collect();
    let out = exec_output(
        &stack.topo.gateway,
        &format!(
            "timeout 60 {} {verb} --iface {HOST_IFACE} --peer {CLIENT_UNDERLAY_IP} {} \
             --snat {GATEWAY_IP} --attach {} --state-dir {} {extra}",
            bin.display(),
            cidrs.join(" "),
            stack.attach.flag(),
            state_dir(stack)?.display()
        ),
    )?;
    let printed = [out.stdout, out.stderr].concat();
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&printed).into(),
    ))
}

/// Packets counted under `reason` (`egress stats`).
fn counted(stack: &Stack, bin: &Path, reason: &str) -> Result<u64> {
    let out = stack.egress_cli(bin, "stats --json")?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    rows.iter()
        .find(|r| r["reason"] == reason)
        .and_then(|r| r["packets"].as_u64())
        .with_context(|| format!("no {reason} in {out}"))
}

/// Whether a new UDP flow is refused for lack of room.
fn refused(stack: &Stack, bin: &Path) -> Result<()> {
    let before = counted(stack, bin, "table_full")?;
    ensure!(
        udp_flow(&stack.topo.client).is_err(),
        "a new flow got through a full table"
    );
    ensure!(
        counted(stack, bin, "table_full")? > before,
        "the new flow was not refused as table_full"
    );
    Ok(())
}

mod a_larger_max_flows_keeps_every_flow {
    #[test]
    fn native() -> anyhow::Result<()> {
        super::grows(tests::Attach::Native)
    }

    #[test]
    fn tc() -> anyhow::Result<()> {
        super::grows(tests::Attach::Tc)
    }
}

/// A gateway with a table of 3 flows, full (a TCP connection and two UDP
/// flows; a fourth is refused), is stopped and started with `max-flows`
/// 8: its flows go on with their translations and counters, and 5 more
/// fit.
fn grows(attach: Attach) -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let mut stack = Stack::start_with(&bin, Path::new(IPIP_PEER), attach, "--max-flows 3")?;
    let result = (|| {
        let _udp = udp_server(&stack.topo.server, udp_server_addr())?;
        let listener = in_netns(&stack.topo.server, || {
            TcpListener::bind((SERVER_IP, TCP_PORT))
        })??;
        let (mut tcp, tcp_seen) = Tcp::open(&stack, &listener)?;
        tcp.exchange(1)?;
        let mut udp = vec![udp_flow(&stack.topo.client)?, udp_flow(&stack.topo.client)?];
        refused(&stack, &bin)?;
        let before = listed(&stack, &bin)?;
        ensure!(
            before.len() == 3 && before.contains_key(&tcp_seen.to_string()),
            "expected the 3 flows listed: {before:?}"
        );

        std::thread::sleep(QUIET);
        stack.gateway.stop();
        stack.gateway = stack
            .topo
            .start_gateway_with(&bin, attach, "--max-flows 8")?;
        resized(&stack, 3, 8)?;

        // Without its flow the client's next segment would leave from
        // another port, and the server answer with a reset.
        tcp.exchange(2)?;
        same_translations(&udp)?;
        let after = listed(&stack, &bin)?;
        for (translation, (proto, out, back)) in &before {
            let now = after.get(translation);
            ensure!(
                now.is_some_and(|(p, o, b)| p == proto && o > out && b > back),
                "{proto} flow {translation} ({out} packets out, {back} in) is now {now:?}"
            );
        }
        // Room for 8: five more, then no more.
        for _ in 0..5 {
            udp.push(udp_flow(&stack.topo.client)?);
        }
        refused(&stack, &bin)?;
        ensure!(listed(&stack, &bin)?.len() == 8, "expected 8 flows listed");
        tcp.exchange(3)?;
        same_translations(&udp)
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// A gateway with 4 flows in a table of 8, stopped: `max-flows` 2 is
/// refused (by `egress check` and by `egress run`, which changes
/// nothing), with the smallest that holds them; `max-flows` 4 resizes the
/// table, full, with every flow.
#[test]
fn a_shrink_below_the_flows_is_refused_and_one_that_holds_them_works() -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let mut stack = Stack::start_with(&bin, Path::new(IPIP_PEER), Attach::Native, "--max-flows 8")?;
    let result = (|| {
        let _udp = udp_server(&stack.topo.server, udp_server_addr())?;
        let udp = (0..4)
            .map(|_| udp_flow(&stack.topo.client))
            .collect::<Result<Vec<_>>>()?;
        stack.gateway.stop();
        let before = listed(&stack, &bin)?;
        let dir = state_dir(&stack)?.display().to_string();

        let refusal = format!(
            "the connection state in {dir} holds 4 flows, more than max-flows 2 holds (it \
             was made with max-flows 8): nothing was changed"
        );
        let fix = "run with max-flows 4 or more (the smallest that holds them";
        let (passed, report) = egress(&stack, &bin, "check", "--max-flows 2")?;
        ensure!(
            !passed && report.contains(&format!("PROBLEM  {refusal}")) && report.contains(fix),
            "check did not refuse the shrink:\n{report}"
        );
        let (ran, out) = egress(&stack, &bin, "run", "--max-flows 2")?;
        ensure!(
            !ran && out.contains(&refusal) && out.contains(fix),
            "run did not refuse the shrink:\n{out}"
        );
        sized_for(&state_dir(&stack)?, 8)?;
        ensure!(
            listed(&stack, &bin)? == before,
            "the refused start changed the flows"
        );

        let (_, report) = egress(&stack, &bin, "check", "--max-flows 4")?;
        let info = format!(
            "info     the connection state in {dir} was made with max-flows 8: a start \
             resizes it to max-flows 4, copying its 4 flows"
        );
        ensure!(report.contains(&info), "no {info:?} in:\n{report}");
        stack.gateway = stack
            .topo
            .start_gateway_with(&bin, Attach::Native, "--max-flows 4")?;
        resized(&stack, 8, 4)?;
        same_translations(&udp)?;
        refused(&stack, &bin)?;
        ensure!(listed(&stack, &bin)?.len() == 4, "expected 4 flows listed");
        Ok(())
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// How the gateway takes its new settings.
#[derive(Clone, Copy)]
enum Change {
    /// SIGHUP: a new image of the daemon, the old one's programs attached
    /// until it takes their place.
    Reload,
    /// The daemon stopped, its data path left attached, and started again.
    Restart,
}

mod flows_made_during_a_resize_are_kept {
    #[test]
    fn by_a_reload() -> anyhow::Result<()> {
        super::made_during(super::Change::Reload)
    }

    #[test]
    fn by_a_restart() -> anyhow::Result<()> {
        super::made_during(super::Change::Restart)
    }
}

/// The gateway takes a larger `max-flows` (`change`) while a client opens
/// new UDP flows one after another: the starting daemon resizes the state
/// while the old programs still translate on the old tables, then copies
/// what they made until it took their place. Every flow keeps its
/// translation.
fn made_during(change: Change) -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let topo = Topology::new()?;
    let config = topo.lab.dir().join("gateway.toml");
    let state = topo.lab.state_dir()?;
    let configure = |max_flows: u32| {
        let settings = format!(
            "state-dir = \"{}\"\nmax-flows = {max_flows}\n",
            state.display()
        );
        std::fs::write(&config, settings).context("cannot write the settings")
    };
    configure(1024)?;
    let peer = topo.start_ipip_peer(Path::new(IPIP_PEER))?;
    let gateway = topo.start_gateway_configured(&bin, Attach::Native, &config)?;
    let mut stack = Stack {
        gateway,
        peer,
        topo,
        attach: Attach::Native,
    };
    let result = (|| {
        let _udp = udp_server(&stack.topo.server, udp_server_addr())?;
        let (stop, opened) = (AtomicBool::new(false), Mutex::new(Vec::new()));
        let client = stack.topo.client.clone();
        let opened_now = || opened.lock().map_or(0, |o| o.len());
        std::thread::scope(|scope| {
            let opener = scope.spawn(|| -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    let flow = udp_flow(&client)?;
                    opened.lock().map_err(|_| anyhow!("poisoned"))?.push(flow);
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(())
            });
            let mut resize = || -> Result<()> {
                let more_than = |n: usize| -> Result<()> {
                    for _ in 0..1000 {
                        if opened_now() > n || opener.is_finished() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    ensure!(opened_now() > n, "no new flows are opened");
                    Ok(())
                };
                more_than(5)?;
                configure(4096)?;
                match change {
                    Change::Reload => {
                        stack.gateway.signal(Signal::SIGHUP)?;
                        stack.gateway.wait_for_times(
                            "gateway ready",
                            2,
                            Duration::from_secs(60),
                        )?;
                    }
                    Change::Restart => {
                        stack.gateway.stop();
                        more_than(opened_now() + 5)?;
                        stack.gateway =
                            stack
                                .topo
                                .start_gateway_configured(&bin, Attach::Native, &config)?;
                    }
                }
                more_than(opened_now() + 5)
            };
            let resized = resize();
            stop.store(true, Ordering::Relaxed);
            let opening = opener.join().map_err(|_| anyhow!("the opener panicked"))?;
            opening.context("a new flow failed")?;
            resized
        })?;
        resized(&stack, 1024, 4096)?;
        let opened = opened.into_inner().map_err(|_| anyhow!("poisoned"))?;
        same_translations(&opened)?;
        let flows = listed(&stack, &bin)?;
        ensure!(
            flows.len() == opened.len(),
            "{} flows opened, {} listed",
            opened.len(),
            flows.len()
        );
        Ok(())
    })();
    stack.topo.lab.keep_logs_on_err(result)
}

/// A resize interrupted part way (the daemon killed between its steps) is
/// finished by the next start. Here the flow table was replaced by its
/// copy, made before the old data path added flow `b`, and the mapping
/// table's copy was pinned aside but not moved into place: every entry
/// ends in maps of the new size, `b` copied from the old table, and no
/// pin of the resize is left. A leftover pin of a state started over
/// (`--reset-state`) just goes, and removing the state takes them all.
#[test]
fn an_interrupted_resize_is_finished_by_the_next_start() -> Result<()> {
    require_root()?;
    let lab = Lab::new()?;
    let result = (|| {
        let dir = lab.state_dir()?;
        std::fs::create_dir_all(&dir)?;
        let flow = |port: u16| Flow {
            client_addr: CLIENT_TUN_IP.octets(),
            nat_addr: GATEWAY_IP.octets(),
            remote_addr: SERVER_IP.octets(),
            peer_addr: CLIENT_UNDERLAY_IP.octets(),
            client_port: port.to_be_bytes(),
            nat_port: (port - 20000).to_be_bytes(),
            remote_port: UDP_PORT.to_be_bytes(),
            proto: IPPROTO_UDP,
            packets: u64::from(port),
            ..Flow::default()
        };
        let (a, b) = (flow(40000), flow(40001));
        let halves = |f: Flow| [(f.in_key(), f), (f.out_key(), f)];
        let pin = |map: &MapData, name: &str| map.pin(dir.join(name));
        // The state of max-flows 8.
        let mut flows = BpfHashMap::<MapData, FlowKey, Flow>::create(16, 0)?;
        let mut mappings = BpfHashMap::<MapData, PortKey, Mapping>::create(16, 0)?;
        let mut clients = BpfHashMap::<MapData, [u8; 4], u64>::create(8, BPF_F_NO_PREALLOC)?;
        for f in [a, b] {
            for (key, half) in halves(f) {
                flows.insert(&key, &half, 0)?;
            }
            let pair = Mapping::pair(
                f.proto,
                (f.client_addr, f.client_port),
                (f.nat_addr, f.nat_port),
                0,
            );
            for (key, mapping) in pair {
                mappings.insert(&key, &mapping, 0)?;
            }
        }
        clients.insert(&CLIENT_TUN_IP.octets(), &2, 0)?;
        for (map, name) in [
            (flows.map(), "FLOWS"),
            (mappings.map(), "MAPPINGS"),
            (clients.map(), "CLIENT_FLOWS"),
        ] {
            pin(map, name)?;
        }
        let old = |map: &MapData, name: &str| -> Result<()> {
            Ok(pin(
                map,
                &format!("resize-old-{name}-{}", map.info()?.id()),
            )?)
        };
        // Killed part way to max-flows 16.
        let mut copied = BpfHashMap::<MapData, FlowKey, Flow>::create(32, 0)?;
        for (key, half) in halves(a) {
            copied.insert(&key, &half, 0)?;
        }
        old(flows.map(), "FLOWS")?;
        pin(copied.map(), "resize-new-FLOWS")?;
        std::fs::rename(dir.join("resize-new-FLOWS"), dir.join("FLOWS"))?;
        let aside = BpfHashMap::<MapData, PortKey, Mapping>::create(32, 0)?;
        old(mappings.map(), "MAPPINGS")?;
        pin(aside.map(), "resize-new-MAPPINGS")?;
        drop((flows, mappings, clients, copied, aside));

        let fit = state_fit::judge(&dir, 16)?;
        ensure!(fit.refusal(&dir).is_none(), "refused: {fit:?}");
        let pending = resize::apply(&dir, &fit.resize)?.context("nothing to finish")?;
        pending.finish();
        sized_for(&dir, 16)?;
        let open = |name: &str| -> Result<MapData> { Ok(MapData::from_pin(dir.join(name))?) };
        let flows = BpfHashMap::<MapData, FlowKey, Flow>::try_from(aya::maps::Map::from_map_data(
            open("FLOWS")?,
        )?)?;
        for f in [a, b] {
            for (key, half) in halves(f) {
                let now = flows.get(&key, 0).ok();
                ensure!(now == Some(half), "{key:?} was {half:?}, is {now:?}");
            }
        }
        let mappings = BpfHashMap::<MapData, PortKey, Mapping>::try_from(
            aya::maps::Map::from_map_data(open("MAPPINGS")?)?,
        )?;
        ensure!(
            mappings.keys().count() == 4,
            "the mappings were not all copied"
        );
        let clients = BpfHashMap::<MapData, [u8; 4], u64>::try_from(
            aya::maps::Map::from_map_data(open("CLIENT_FLOWS")?)?,
        )?;
        ensure!(
            clients.get(&CLIENT_TUN_IP.octets(), 0)? == 2,
            "the client count changed"
        );

        // Started over: nothing to catch up into.
        std::fs::remove_file(dir.join("FLOWS"))?;
        pin(mappings.map(), "resize-old-FLOWS-1")?;
        ensure!(
            resize::apply(&dir, &resize::Plan::Keep)?.is_none(),
            "a reset state was caught up"
        );
        sized_for(&dir, 16).err().context("the FLOWS pin is back")?;
        ensure!(
            !dir.join("resize-old-FLOWS-1").exists(),
            "the leftover pin stayed"
        );
        // `egress down --reset-state` (or a start with it) takes a resize's
        // pins with the state.
        pin(mappings.map(), "resize-old-MAPPINGS-1")?;
        pin(mappings.map(), "resize-new-CLIENT_FLOWS")?;
        pinning::remove(&dir)?;
        let left: Vec<_> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        ensure!(left.is_empty(), "left in the state directory: {left:?}");
        Ok(())
    })();
    lab.keep_logs_on_err(result)
}

/// What the old data path changes in entries already copied, between the
/// copy and the takeover, reaches the new maps, merged with what the new
/// data path records once it runs: here a FIN on each half of a TCP flow
/// (one before the first catch-up, one after it), the later use of its
/// mapping, and the flows its client opened meanwhile, added to the one
/// the new data path counts. The maps are written by hand as each data
/// path would, between the resize's steps.
#[test]
fn changes_to_copied_entries_reach_the_resized_state() -> Result<()> {
    require_root()?;
    let lab = Lab::new()?;
    let result = (|| {
        let dir = lab.state_dir()?;
        std::fs::create_dir_all(&dir)?;
        let client = CLIENT_TUN_IP.octets();
        let established = Flow {
            client_addr: client,
            nat_addr: GATEWAY_IP.octets(),
            remote_addr: SERVER_IP.octets(),
            peer_addr: CLIENT_UNDERLAY_IP.octets(),
            client_port: 40000u16.to_be_bytes(),
            nat_port: 20000u16.to_be_bytes(),
            remote_port: TCP_PORT.to_be_bytes(),
            proto: IPPROTO_TCP,
            tcp_flags: SYN | ACK,
            created_ns: 50,
            last_seen_ns: 100,
            packets: 10,
            bytes: 1000,
            handshake_ns: 60,
            ..Flow::default()
        };
        let (out, inb) = (established.out_key(), established.in_key());
        let [(client_side, used), reservation] = Mapping::pair(
            IPPROTO_TCP,
            (client, established.client_port),
            (established.nat_addr, established.nat_port),
            100,
        );
        // The state of max-flows 8: one flow, its client counted once.
        let mut old_flows = BpfHashMap::<MapData, FlowKey, Flow>::create(16, 0)?;
        let mut old_mappings = BpfHashMap::<MapData, PortKey, Mapping>::create(16, 0)?;
        let mut old_clients = BpfHashMap::<MapData, [u8; 4], u64>::create(8, BPF_F_NO_PREALLOC)?;
        old_flows.insert(&inb, &established, 0)?;
        old_flows.insert(&out, &established, 0)?;
        for (key, mapping) in [(client_side, used), reservation] {
            old_mappings.insert(&key, &mapping, 0)?;
        }
        old_clients.insert(&client, &1, 0)?;
        for (map, name) in [
            (old_flows.map(), "FLOWS"),
            (old_mappings.map(), "MAPPINGS"),
            (old_clients.map(), "CLIENT_FLOWS"),
        ] {
            map.pin(dir.join(name))?;
        }

        let fit = state_fit::judge(&dir, 16)?;
        let mut pending = resize::apply(&dir, &fit.resize)?.context("nothing resized")?;
        let open = |name: &str| MapData::from_pin(dir.join(name));
        let mut new_flows = BpfHashMap::<MapData, FlowKey, Flow>::try_from(
            aya::maps::Map::from_map_data(open("FLOWS")?)?,
        )?;
        let mut new_clients = BpfHashMap::<MapData, [u8; 4], u64>::try_from(
            aya::maps::Map::from_map_data(open("CLIENT_FLOWS")?)?,
        )?;
        let fin = |f: Flow, at: u64| Flow {
            tcp_flags: f.tcp_flags | FIN,
            last_seen_ns: at,
            packets: f.packets + 1,
            bytes: f.bytes + 40,
            ..f
        };
        // The old data path: the client's FIN, and a second flow counted.
        let out_fin = fin(established, 200);
        old_flows.insert(&out, &out_fin, 0)?;
        old_clients.insert(&client, &2, 0)?;
        pending.catch_up("before the attach");
        // Still the old one: the server's FIN, the mapping used again for a
        // third flow.
        let inb_fin = fin(established, 250);
        old_flows.insert(&inb, &inb_fin, 0)?;
        old_mappings.insert(
            &client_side,
            &Mapping {
                used_ns: 250,
                ..used
            },
            0,
        )?;
        old_clients.insert(&client, &3, 0)?;
        // Taken over, the new data path: the server's next segment (its
        // copy of the return half without the FIN), a fourth flow counted.
        let inb_new = Flow {
            last_seen_ns: 300,
            packets: 11,
            bytes: 1040,
            ..established
        };
        new_flows.insert(&inb, &inb_new, 0)?;
        new_clients.insert(&client, &3, 0)?;
        pending.finish();

        sized_for(&dir, 16)?;
        let now = new_flows.get(&out, 0)?;
        ensure!(
            now == out_fin,
            "the outbound half is {now:?}, not {out_fin:?}"
        );
        let now = new_flows.get(&inb, 0)?;
        ensure!(
            now == Flow {
                tcp_flags: SYN | ACK | FIN,
                ..inb_new
            },
            "the return half is {now:?}: without the old path's FIN, or not the new path's \
             record"
        );
        let new_mappings = BpfHashMap::<MapData, PortKey, Mapping>::try_from(
            aya::maps::Map::from_map_data(open("MAPPINGS")?)?,
        )?;
        let now = new_mappings.get(&client_side, 0)?.used_ns;
        ensure!(now == 250, "the mapping was last used at {now}, not 250");
        let now = new_clients.get(&client, 0)?;
        ensure!(now == 4, "the client counts {now} flows, not 4");
        Ok(())
    })();
    lab.keep_logs_on_err(result)
}
