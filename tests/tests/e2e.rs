//! End to end through the real gateway (`EGRESS_BIN`): a client behind an
//! emulated IP-in-IP peer reaches an "Internet" server, which must see the
//! translation address. Every scenario runs once per attach mode, each on
//! its own topology. Needs root.

use anyhow::{Context as _, Result, ensure};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;
use tests::addrs::{
    CLIENT_EXTRA_IPS, CLIENT_TUN_IP, CLIENT_UNDERLAY_IP, GATEWAY_IP, HOST_IFACE, HTTP_PORT,
    INTERNET_CIDR, ROUTER_CLIENT_IFACE, ROUTER_GATEWAY_IFACE, ROUTER_GATEWAY_IP, SERVER_IP,
    TUN_IFACE, TUN_MTU,
};
use tests::echo::{Reply, UdpClient, tcp_request, tcp_server, udp_request, udp_server};
use tests::topology::large_page;
use tests::{Attach, Daemon, Stack, egress_bin, exec, in_netns, require_root};

#[path = "packets/frames.rs"]
#[allow(dead_code)]
mod frames;

const ECHO_PORT: u16 = 9000;
/// Where every scenario's gateway serves its metrics (in its namespace).
const METRICS: &str = "127.0.0.1:9464";
const CONNECTIONS: usize = 50;

/// One `#[test]` per attach mode for each scenario, in modules named after
/// the mode: `cargo test tc::` runs one mode, `cargo test ping` one scenario.
macro_rules! in_every_mode {
    ($($scenario:ident),* $(,)?) => {
        in_every_mode!(@mode native Native; $($scenario),*);
        in_every_mode!(@mode generic Generic; $($scenario),*);
        in_every_mode!(@mode tc Tc; $($scenario),*);
    };
    (@mode $module:ident $attach:ident; $($scenario:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $scenario() -> anyhow::Result<()> {
                    super::with_stack(tests::Attach::$attach, super::$scenario)
                }
            )*
        }
    };
}

in_every_mode!(
    http_get_returns_exact_content,
    http_server_sees_translation_address,
    udp_reply_shows_translation_address,
    ping_through_gateway,
    concurrent_tcp_from_several_client_addresses,
    bulk_tcp_with_gro,
    tracepath_shows_the_gateway_hop_and_the_tunnel_mtu,
    ping_with_df_fits_the_tunnel_mtu_exactly,
    large_replies_arrive_or_teach_the_server_the_tunnel_mtu,
    a_narrower_link_on_the_way_to_the_peer_lowers_the_tunnel_mtu,
    a_peer_a_router_cannot_reach_is_reported_and_the_server_told,
    fragmented_udp_crosses_both_ways,
    reply_fragments_arriving_last_first_reach_the_client,
    syn_mss_is_clamped_to_fit_the_tunnel,
    udp_to_a_closed_client_port_is_refused_by_the_translation,
);

/// TC hands the program socket buffers whose transport checksum is still to
/// be filled in on the way out (`CHECKSUM_PARTIAL`): GRO aggregates, and
/// here the server's own packets, sent with offload on. The gateway's
/// interface has checksum offload off, so its kernel fills them in (and
/// segments aggregates) in software as they leave. XDP never gets such
/// packets from a real NIC (a veth would hand them over unfinished).
mod tc_offloaded {
    use super::*;

    #[test]
    fn udp_reply_too_big_teaches_the_server_the_tunnel_mtu() -> Result<()> {
        with_offloaded_server("", large_replies_arrive_or_teach_the_server_the_tunnel_mtu)
    }

    #[test]
    fn tcp_segments_too_big_teach_the_server_the_tunnel_mtu() -> Result<()> {
        // No MSS clamp, and a client announcing 1460: the server's segments,
        // sent in aggregates of many, fill 1500-byte packets, too big to
        // encapsulate, and only "fragmentation needed" gets them through.
        with_offloaded_server("--mss 0", |stack| {
            let topo = &stack.topo;
            exec(
                &topo.client,
                &format!(
                    "ip route change {INTERNET_CIDR} dev {TUN_IFACE} src {CLIENT_TUN_IP} advmss 1460"
                ),
            )?;
            let server = SocketAddr::from((SERVER_IP, ECHO_PORT));
            let _echo = tcp_server(&topo.server, server)?;
            let tap = tests::tap::Tap::start(&topo.gateway, HOST_IFACE)?;
            let data: Vec<u8> = (0..256 << 10).map(|i| (i % 251) as u8).collect();
            let reply = tcp_request(&topo.client, CLIENT_TUN_IP, server, &data)?;
            ensure!(reply.body == data, "payload changed");
            ensure!(
                tap.largest() > MAX_FRAME,
                "no aggregate reached the hook (largest frame {} bytes)",
                tap.largest()
            );
            // Every segment too big was answered: one error would do to get
            // the data through, so count the ones that failed.
            let out = stack.egress_cli(&egress_bin()?, "stats --json")?;
            let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
            let packets = |reason: &str| {
                rows.iter()
                    .find(|r| r["reason"] == reason)
                    .and_then(|r| r["packets"].as_u64())
            };
            ensure!(
                packets("too_big") > Some(0) && packets("internal") == Some(0),
                "{out}"
            );
            Ok(())
        })
    }

    fn with_offloaded_server(extra: &str, test: impl FnOnce(&Stack) -> Result<()>) -> Result<()> {
        with_stack_args(Attach::Tc, extra, |stack| {
            let topo = &stack.topo;
            exec(
                &topo.server,
                &format!("ethtool -K {HOST_IFACE} tx on tso on"),
            )?;
            exec(&topo.gateway, &format!("ethtool -K {HOST_IFACE} tx off"))?;
            test(stack)
        })
    }
}

/// Runs `test` against a fresh stack, its gateway serving metrics on
/// [`METRICS`]; a failure keeps the daemons' logs.
fn with_stack(attach: Attach, test: impl FnOnce(&Stack) -> Result<()>) -> Result<()> {
    with_stack_args(attach, &format!("--metrics {METRICS}"), test)
}

/// As [`with_stack`], with `extra` gateway arguments.
fn with_stack_args(
    attach: Attach,
    extra: &str,
    test: impl FnOnce(&Stack) -> Result<()>,
) -> Result<()> {
    require_root()?;
    let stack = Stack::start_with(
        &egress_bin()?,
        Path::new(env!("CARGO_BIN_EXE_ipip-peer")),
        attach,
        extra,
    )?;
    stack.topo.lab.keep_logs_on_err(test(&stack))
}

/// Serves `content` over HTTP on the server; returns the server and what
/// `curl` on the client downloaded.
fn http_get(stack: &Stack, content: &[u8]) -> Result<(Daemon, Vec<u8>)> {
    let topo = &stack.topo;
    let www = topo.lab.dir().join("www");
    std::fs::create_dir(&www)?;
    std::fs::write(www.join("file"), content)?;
    let http = topo.start_http_server(&www)?;
    let url = format!("http://{SERVER_IP}:{HTTP_PORT}/file");
    let saved = topo.lab.dir().join("downloaded");
    exec(
        &topo.client,
        &format!("curl -sS --max-time 60 -o {} {url}", saved.display()),
    )?;
    Ok((http, std::fs::read(&saved)?))
}

/// Bytes of the large download: thousands of full-sized segments.
const DOWNLOAD: usize = 8 << 20;

/// A large download through the tunnel arrives byte for byte (segments
/// sized by the clamped MSS fit the tunnel).
fn http_get_returns_exact_content(stack: &Stack) -> Result<()> {
    // Pseudo-random (xorshift), so a misplaced segment cannot look right.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let want: Vec<u8> = (0..DOWNLOAD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let (_http, got) = http_get(stack, &want)?;
    ensure!(
        got.len() == want.len(),
        "got {} bytes, expected {}",
        got.len(),
        want.len()
    );
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    ensure!(
        first_bad.is_none(),
        "content differs from byte {first_bad:?}"
    );
    Ok(())
}

fn http_server_sees_translation_address(stack: &Stack) -> Result<()> {
    let (mut http, _) = http_get(stack, large_page().as_bytes())?;
    // http.server logs `<client address> - - [date] "GET ..."`.
    http.wait_for(&format!("{GATEWAY_IP} - - "), Duration::from_secs(5))?;
    let log = http.log();
    ensure!(
        !log.contains(&CLIENT_TUN_IP.to_string()),
        "client address leaked:\n{log}"
    );
    Ok(())
}

fn udp_reply_shows_translation_address(stack: &Stack) -> Result<()> {
    let server = SocketAddr::from((SERVER_IP, ECHO_PORT));
    let _echo = udp_server(&stack.topo.server, server)?;
    let reply = udp_request(&stack.topo.client, CLIENT_TUN_IP, server, b"hello")?;
    ensure!(reply.body == b"hello", "{reply:?}");
    ensure!(reply.seen.ip() == GATEWAY_IP, "server saw {}", reply.seen);
    Ok(())
}

fn ping_through_gateway(stack: &Stack) -> Result<()> {
    let out = exec(&stack.topo.client, &format!("ping -c 3 -W 2 {SERVER_IP}"))?;
    ensure!(out.contains("3 received"), "{out}");
    Ok(())
}

/// Concurrent connections from every client address: each is echoed intact,
/// every one is seen from the translation address, and no two share a port
/// (they would be one flow to the server).
fn concurrent_tcp_from_several_client_addresses(stack: &Stack) -> Result<()> {
    let server = SocketAddr::from((SERVER_IP, ECHO_PORT));
    let _echo = tcp_server(&stack.topo.server, server)?;
    let sources: Vec<Ipv4Addr> = [CLIENT_TUN_IP]
        .into_iter()
        .chain(CLIENT_EXTRA_IPS)
        .collect();
    let request = |i: usize| format!("connection {i} ").repeat(500).into_bytes();
    let replies: Vec<Result<Reply>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                let src = sources[i % sources.len()];
                let client = &stack.topo.client;
                s.spawn(move || tcp_request(client, src, server, &request(i)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let mut seen = HashSet::new();
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply?;
        ensure!(reply.body == request(i), "connection {i}: payload changed");
        ensure!(
            reply.seen.ip() == GATEWAY_IP,
            "connection {i}: server saw {}",
            reply.seen
        );
        ensure!(
            seen.insert(reply.seen),
            "connection {i}: {} reused",
            reply.seen
        );
    }
    Ok(())
}

/// Bytes each way in the bulk transfer: many full-sized segments.
const BULK: usize = 4 << 20;
/// Largest frame on the lab's 1500-byte links.
const MAX_FRAME: usize = 1514;

/// A bulk TCP transfer both ways with GRO on the gateway's interface, so the
/// TC hook, which runs after GRO, gets aggregates of many segments: they
/// must leave re-segmented and intact.
fn bulk_tcp_with_gro(stack: &Stack) -> Result<()> {
    let topo = &stack.topo;
    // Like a NIC off the wire: the router sends single segments (a veth
    // skips GRO for a peer that could have sent aggregates itself), and
    // the gateway's interface aggregates them.
    exec(
        &topo.router,
        &format!("ethtool -K {ROUTER_GATEWAY_IFACE} tso off"),
    )?;
    exec(&topo.gateway, &format!("ethtool -K {HOST_IFACE} gro on"))?;
    let server = SocketAddr::from((SERVER_IP, ECHO_PORT));
    let _echo = tcp_server(&topo.server, server)?;
    let tap = tests::tap::Tap::start(&topo.gateway, HOST_IFACE)?;
    let data: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
    let reply = tcp_request(&topo.client, CLIENT_TUN_IP, server, &data)?;
    ensure!(reply.body == data, "payload changed");
    // A packet tap sees what the TC hook gets next; XDP runs before taps.
    if stack.attach == Attach::Tc {
        ensure!(
            tap.largest() > MAX_FRAME,
            "no GRO aggregate reached the hook (largest frame {} bytes)",
            tap.largest()
        );
    }
    ensure!(reply.seen.ip() == GATEWAY_IP, "server saw {}", reply.seen);
    Ok(())
}

/// tracepath from the client: the gateway answers hop 1 itself (time
/// exceeded through the tunnel), the router behind it answers hop 2 (its
/// error relayed back), the server's port unreachable ends the trace, and
/// the path MTU is the tunnel's.
fn tracepath_shows_the_gateway_hop_and_the_tunnel_mtu(stack: &Stack) -> Result<()> {
    let out = exec(
        &stack.topo.client,
        &format!("tracepath -n -m 5 {SERVER_IP}"),
    )?;
    let hop = |n: u8, addr: Ipv4Addr| {
        out.lines()
            .any(|l| l.trim_start().starts_with(&format!("{n}:")) && l.contains(&addr.to_string()))
    };
    ensure!(hop(1, GATEWAY_IP), "hop 1 is not the gateway:\n{out}");
    ensure!(hop(2, ROUTER_GATEWAY_IP), "hop 2 is not the router:\n{out}");
    ensure!(
        out.lines()
            .any(|l| l.contains(&SERVER_IP.to_string()) && l.contains("reached")),
        "server not reached:\n{out}"
    );
    ensure!(out.contains(&format!("pmtu {TUN_MTU}")), "{out}");
    Ok(())
}

/// Don't-fragment pings: the largest that fits the tunnel goes through both
/// ways (its reply encapsulated to exactly 1500 bytes), one byte more is
/// refused at the client with the tunnel's MTU.
fn ping_with_df_fits_the_tunnel_mtu_exactly(stack: &Stack) -> Result<()> {
    let client = &stack.topo.client;
    let largest = TUN_MTU - 28;
    let out = exec(
        client,
        &format!("ping -M do -s {largest} -c 2 -W 2 {SERVER_IP}"),
    )?;
    ensure!(out.contains("2 received"), "{out}");
    let too_big = exec(client, &format!("ping -M do -s 1472 -c 1 -W 2 {SERVER_IP}"));
    let err = too_big.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        err.contains(&format!("mtu={TUN_MTU}")),
        "ping -s 1472: {err}"
    );
    Ok(())
}

/// A 1500-byte UDP reply no longer fits once encapsulated. Without DF the
/// gateway's kernel fragments the tunnel packet and the datagram arrives
/// whole; with DF the gateway answers "fragmentation needed", and the
/// server's kernel learns the tunnel's MTU for the translation address.
fn large_replies_arrive_or_teach_the_server_the_tunnel_mtu(stack: &Stack) -> Result<()> {
    let (client, server) = udp_pair(stack)?;
    let mut buf = vec![0; 2048];
    let reply: Vec<u8> = (0..1472u32).map(|i| (i % 251) as u8).collect();
    set_pmtu_discovery(&server, libc::IP_PMTUDISC_DONT)?;
    server.send(&reply)?;
    let n = client.recv(&mut buf)?;
    ensure!(buf[..n] == reply[..], "got {n} bytes, sent {}", reply.len());

    set_pmtu_discovery(&server, libc::IP_PMTUDISC_DO)?;
    server.send(&reply)?;
    learns_path_mtu(&server, TUN_MTU)
}

/// A UDP socket on the client and one on the server, connected to the
/// client's translation, which its first datagram created.
fn udp_pair(stack: &Stack) -> Result<(UdpSocket, UdpSocket)> {
    let topo = &stack.topo;
    let client = in_netns(&topo.client, || UdpSocket::bind((CLIENT_TUN_IP, 0)))??;
    let server = in_netns(&topo.server, || UdpSocket::bind((SERVER_IP, ECHO_PORT)))??;
    for sock in [&client, &server] {
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    }
    client.send_to(b"hello", (SERVER_IP, ECHO_PORT))?;
    let (_, translated) = server.recv_from(&mut [0; 16])?;
    server.connect(translated)?;
    Ok((client, server))
}

/// Waits for the connected `sock`'s path MTU to become `want` (an error
/// comes back asynchronously), and takes the error it left pending.
fn learns_path_mtu(sock: &UdpSocket, want: u32) -> Result<()> {
    let mut mtu = 0;
    for _ in 0..50 {
        mtu = path_mtu(sock)?;
        if mtu == want {
            sock.take_error()?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("path MTU to {}: {mtu}, not {want}", sock.peer_addr()?)
}

/// A datagram larger than the tunnel MTU each way: the client's kernel
/// cuts the request at its tunnel's 1480 bytes and the gateway translates
/// every fragment (only the first carries the ports); the echo, larger
/// still, leaves the server in 1500-byte fragments, each too big to
/// encapsulate within the link's 1500, so the gateway's kernel fragments
/// the tunnel packets. The flow counts each fragment once: none was lost
/// and resent.
fn fragmented_udp_crosses_both_ways(stack: &Stack) -> Result<()> {
    let server = SocketAddr::from((SERVER_IP, ECHO_PORT));
    let _echo = udp_server(&stack.topo.server, server)?;
    let client = UdpClient::bind(&stack.topo.client, CLIENT_TUN_IP)?;
    let request: Vec<u8> = (0..3500u32).map(|i| (i % 251) as u8).collect();
    let reply = client.request(server, &request)?;
    ensure!(
        reply.body == request,
        "the echo came back altered ({} bytes)",
        reply.body.len()
    );
    ensure!(reply.seen.ip() == GATEWAY_IP, "server saw {}", reply.seen);
    let out = stack.egress_cli(&egress_bin()?, "flows --json --proto udp")?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let me = client.local_addr()?.to_string();
    let row = rows
        .iter()
        .find(|r| r["client"] == me.as_str())
        .with_context(|| format!("no flow of {me}:\n{out}"))?;
    // 3508 and about 3525 bytes of UDP: three fragments each way.
    let packets = |dir: &str| row[dir]["packets"].as_u64();
    ensure!(
        (packets("out"), packets("in")) == (Some(3), Some(3)),
        "fragments counted: {row}"
    );
    Ok(())
}

/// The link between the router and the peer narrowed to 1400 bytes: the
/// router drops tunnel packets too big for it (DF, copied from the reply)
/// and answers "fragmentation needed" to the gateway, which must learn the
/// path MTU toward the peer from it, as the kernel's ipip tunnel does, and
/// pass it on as 1380 (less our outer header) to the server. Without that,
/// downloads stall: the server resends segments no one can forward.
fn a_narrower_link_on_the_way_to_the_peer_lowers_the_tunnel_mtu(stack: &Stack) -> Result<()> {
    const NARROW: u32 = 1400;
    let fits = NARROW - 20;
    let topo = &stack.topo;
    exec(
        &topo.router,
        &format!("ip link set {ROUTER_CLIENT_IFACE} mtu {NARROW}"),
    )?;
    exec(
        &topo.client,
        &format!("ip link set {HOST_IFACE} mtu {NARROW}"),
    )?;
    let (client, server) = udp_pair(stack)?;
    set_pmtu_discovery(&server, libc::IP_PMTUDISC_DO)?;
    let reply = |ip_len: u32| -> Vec<u8> { (0..ip_len - 28).map(|i| (i % 251) as u8).collect() };
    // The replies leave from one CPU, and so meet one CPU's remembered
    // routes at the gateway (the data path remembers routes per CPU). For
    // the rest of the test: it runs on a thread of its own.
    let allowed = sched_getaffinity(Pid::from_raw(0))?;
    let first = (0..CpuSet::count()).find(|&c| allowed.is_set(c).unwrap_or(false));
    let mut one = CpuSet::new();
    one.set(first.context("no CPU to run on")?)?;
    sched_setaffinity(Pid::from_raw(0), &one)?;

    // Fits the gateway's link, not the narrow one: lost there, and the
    // router's error teaches the gateway. The daemon retires the routes
    // the data path remembers as it counts the error.
    server.send(&reply(NARROW))?;
    counts_tunnel_error(stack, "fragmentation_needed")?;
    let route = exec(&topo.gateway, &format!("ip route get {CLIENT_UNDERLAY_IP}"))?;
    ensure!(route.contains(&format!("mtu {NARROW}")), "{route}");

    // The same again: the gateway answers it itself, and the server learns
    // what fits; a datagram of exactly that size crosses.
    server.send(&reply(NARROW))?;
    learns_path_mtu(&server, fits)?;
    server.send(&reply(fits))?;
    let mut buf = vec![0; 2048];
    let n = client.recv(&mut buf)?;
    ensure!(buf[..n] == reply(fits)[..], "got {n} bytes");

    // A download, once the server has forgotten: its segments, sized by
    // the clamp to fill 1500-byte tunnel packets, meet the narrow link, and
    // the gateway must tell the server again.
    exec(&topo.server, "ip route flush cache")?;
    let route = exec(&topo.server, &format!("ip route get {GATEWAY_IP}"))?;
    ensure!(!route.contains("mtu"), "the server still knows: {route}");
    let page = large_page();
    let (_http, got) = http_get(stack, page.as_bytes())?;
    ensure!(
        got == page.as_bytes(),
        "download differs ({} bytes)",
        got.len()
    );
    Ok(())
}

/// Waits for the gateway to count one tunnel error of kind `error`, and
/// none of another kind.
fn counts_tunnel_error(stack: &Stack, error: &str) -> Result<()> {
    let counted = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("egress_tunnel_errors_total{") && !l.ends_with(" 0"))
            .map(str::to_owned)
            .collect()
    };
    let want = vec![format!("egress_tunnel_errors_total{{error=\"{error}\"}} 1")];
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen = counted(&metrics(stack)?);
        if !seen.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(seen == want, "counted {seen:?}, not {want:?}");
    Ok(())
}

/// A router on the way to the peer has no route to it: the reply tunnelled
/// back is lost there, and the router's "host unreachable" about our
/// tunnel packet must reach the operator (counted and logged, naming the
/// peer) and, as host unreachable from the translation address about its
/// own datagram, the server (RFC 2003 section 4.1), whose connected socket
/// then fails. Once the route is back, the flow carries on.
fn a_peer_a_router_cannot_reach_is_reported_and_the_server_told(stack: &Stack) -> Result<()> {
    let topo = &stack.topo;
    let (client, server) = udp_pair(stack)?;
    set_int(&server, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
    let route = format!("unreachable {CLIENT_UNDERLAY_IP}/32");
    exec(&topo.router, &format!("ip route add {route}"))?;
    server.send(b"lost")?;
    counts_tunnel_error(stack, "unreachable")?;
    let log = stack.gateway.log();
    ensure!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("reports the peer unreachable (host unreachable")
            && l.contains(&format!("peer={CLIENT_UNDERLAY_IP}"))
            && l.contains(&format!("from={ROUTER_GATEWAY_IP}"))),
        "no warning naming the peer and the router in\n{log}"
    );
    // The server's kernel matched the error to its socket by the quote:
    // its own datagram, to the translation address and port.
    fails_from_the_translation(&server, libc::EHOSTUNREACH, (3, 1))?;
    let metrics = metrics(stack)?;
    let relayed = "egress_tunnel_error_relays_total{outcome=\"relayed\"} 1\n";
    ensure!(metrics.contains(relayed), "no {relayed:?} in\n{metrics}");

    exec(&topo.router, &format!("ip route del {route}"))?;
    server.send(b"back")?;
    let mut buf = [0; 16];
    let n = client.recv(&mut buf)?;
    ensure!(&buf[..n] == b"back", "got {:?}", &buf[..n]);
    Ok(())
}

/// The gateway's metrics.
fn metrics(stack: &Stack) -> Result<String> {
    exec(
        &stack.topo.gateway,
        &format!("curl -sS --max-time 10 http://{METRICS}/metrics"),
    )
}

/// A reply datagram whose fragments reach the gateway last first, as
/// reordering on the way may deliver them: the later fragments find no
/// first fragment to follow, so the data path hands the daemon a copy of
/// each, and the daemon sends them on once the first has passed. The
/// client must get the datagram whole.
fn reply_fragments_arriving_last_first_reach_the_client(stack: &Stack) -> Result<()> {
    let server_at = SocketAddr::from((SERVER_IP, ECHO_PORT));
    let (server, raw) = in_netns(&stack.topo.server, || -> std::io::Result<_> {
        let raw = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )?;
        Ok((UdpSocket::bind(server_at)?, raw))
    })??;
    let client = in_netns(&stack.topo.client, || UdpSocket::bind((CLIENT_TUN_IP, 0)))??;
    for sock in [&server, &client] {
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    }
    // The client's datagram creates the flow; the server learns its
    // translation.
    client.send_to(b"hello", server_at)?;
    let mut buf = vec![0; 65536];
    let (_, SocketAddr::V4(seen)) = server.recv_from(&mut buf)? else {
        anyhow::bail!("the server saw an IPv6 source");
    };
    let payload: Vec<u8> = (0..3500u32).map(|i| (i % 249) as u8).collect();
    let reply = frames::L4::Udp {
        sport: ECHO_PORT,
        dport: seen.port(),
        payload: &payload,
    };
    let ip = frames::Ip {
        df: false,
        ..frames::Ip::new(SERVER_IP.octets(), seen.ip().octets())
    };
    // Cut by the server's 1500-byte link, sent by hand, last first: the
    // middle piece, 1500 bytes, no longer fits once encapsulated, so the
    // daemon cuts it in two.
    let pieces = frames::fragment(&frames::ip_packet(ip, reply), &[1480, 2960]);
    for piece in pieces.iter().rev() {
        raw.send_to(piece, &std::net::SocketAddrV4::new(*seen.ip(), 0).into())?;
    }
    let (n, from) = client
        .recv_from(&mut buf)
        .context("the reordered reply did not arrive")?;
    ensure!(from == server_at, "reply from {from}");
    ensure!(
        buf[..n] == payload[..],
        "the reply arrived altered ({n} bytes)"
    );
    // Two copies held and sent on (the middle one in two pieces).
    let metrics = metrics(stack)?;
    let sent = "egress_held_fragments_total{outcome=\"sent\"} 2\n";
    ensure!(metrics.contains(sent), "no {sent:?} in\n{metrics}");
    Ok(())
}

/// A client announcing MSS 1460 (as a host on a 1500-byte network behind
/// the tunnel would): the server must see the gateway's clamp, 1440 from
/// its interface's MTU of 1500, less the timestamp option.
fn syn_mss_is_clamped_to_fit_the_tunnel(stack: &Stack) -> Result<()> {
    let topo = &stack.topo;
    exec(
        &topo.client,
        &format!("ip route change {INTERNET_CIDR} dev {TUN_IFACE} src {CLIENT_TUN_IP} advmss 1460"),
    )?;
    let listener = in_netns(&topo.server, || TcpListener::bind((SERVER_IP, ECHO_PORT)))??;
    let _client = in_netns(&topo.client, || {
        TcpStream::connect_timeout(&(SERVER_IP, ECHO_PORT).into(), Duration::from_secs(10))
    })??;
    let (accepted, _) = listener.accept()?;
    let mss = get_int(&accepted, libc::IPPROTO_TCP, libc::TCP_MAXSEG)?;
    ensure!(
        (1400..=1440).contains(&mss),
        "the server's MSS is {mss}, not the clamp's"
    );
    Ok(())
}

/// The server sends to a client port whose socket has closed: the client's
/// kernel answers with port unreachable through the tunnel, which the
/// gateway translates (RFC 5508). The server's connected socket must be
/// refused, by the translation address, about its own datagram to it.
fn udp_to_a_closed_client_port_is_refused_by_the_translation(stack: &Stack) -> Result<()> {
    let topo = &stack.topo;
    let client = in_netns(&topo.client, || UdpSocket::bind((CLIENT_TUN_IP, 0)))??;
    let server = in_netns(&topo.server, || UdpSocket::bind((SERVER_IP, ECHO_PORT)))??;
    server.set_read_timeout(Some(Duration::from_secs(3)))?;
    set_int(&server, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
    client.send_to(b"hello", (SERVER_IP, ECHO_PORT))?;
    let mut buf = vec![0; 2048];
    let (_, translated) = server.recv_from(&mut buf)?;
    ensure!(translated.ip() == GATEWAY_IP, "server saw {translated}");
    server.connect(translated)?;
    drop(client);

    server.send(b"still there?")?;
    fails_from_the_translation(&server, libc::ECONNREFUSED, (3, 3))
}

/// The server's connected `sock` (`IP_RECVERR` on) fails with `errno`, and
/// the ICMP error queued on it is `want` (type, code), from the
/// translation address.
fn fails_from_the_translation(sock: &UdpSocket, errno: i32, want: (u8, u8)) -> Result<()> {
    let failed = sock.recv(&mut [0; 16]);
    ensure!(
        failed
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(errno)),
        "the server's recv: {failed:?}, not errno {errno}"
    );
    let (kind, code, from) = queued_icmp_error(sock)?;
    ensure!(
        (kind, code) == want,
        "ICMP type {kind} code {code}, not {want:?}"
    );
    ensure!(from == GATEWAY_IP, "the error came from {from}");
    Ok(())
}

/// Type, code and sender of the ICMP error queued on `sock` (`IP_RECVERR`).
fn queued_icmp_error(sock: &UdpSocket) -> Result<(u8, u8, Ipv4Addr)> {
    use std::os::fd::AsRawFd;
    let mut data = [0u8; 512];
    // Aligned for the control messages.
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: a valid socket, and buffers that outlive the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, libc::MSG_ERRQUEUE) };
    ensure!(n >= 0, "MSG_ERRQUEUE: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel filled in `msg` and its control messages.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: a control message header within `control`.
        let header = unsafe { &*cmsg };
        if (header.cmsg_level, header.cmsg_type) == (libc::IPPROTO_IP, libc::IP_RECVERR) {
            // SAFETY: an IP_RECVERR message holds a sock_extended_err and,
            // for an ICMP error, the sender's sockaddr_in after it.
            let (err, from) = unsafe {
                let err = libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>();
                let from = libc::SO_EE_OFFENDER(err).cast::<libc::sockaddr_in>();
                (err.read_unaligned(), from.read_unaligned())
            };
            ensure!(
                err.ee_origin == libc::SO_EE_ORIGIN_ICMP,
                "error of origin {}",
                err.ee_origin
            );
            let from = Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr));
            return Ok((err.ee_type, err.ee_code, from));
        }
        // SAFETY: as for the first header.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    anyhow::bail!("no IP_RECVERR message queued")
}

fn set_pmtu_discovery(sock: &UdpSocket, mode: libc::c_int) -> Result<()> {
    set_int(sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, mode)
}

/// Sets an integer socket option.
fn set_int(
    sock: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> Result<()> {
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The kernel's path MTU for a connected socket's destination.
fn path_mtu(sock: &UdpSocket) -> Result<u32> {
    Ok(get_int(sock, libc::IPPROTO_IP, libc::IP_MTU)? as u32)
}

/// An integer socket option.
fn get_int(sock: &impl std::os::fd::AsRawFd, level: libc::c_int, name: libc::c_int) -> Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, and a c_int buffer with its size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    ensure!(
        rc == 0,
        "getsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(value)
}
