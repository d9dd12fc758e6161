//! The "client, router, gateway, Internet server" topology, and the pieces
//! it is built from (also used on their own by the emulator's own test).

use crate::addrs::*;
use crate::daemon::Daemon;
use crate::netns::{Lab, exec, exec_output};
use crate::tiny_bpf::{Hook, Program, programs};
use anyhow::Result;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::{ExitStatus, Output};
use std::time::Duration;

/// Loading and verifying the XDP programs can take a while on a busy machine.
const GATEWAY_READY: Duration = Duration::from_secs(60);
const QUICK_READY: Duration = Duration::from_secs(10);

/// The gateway's `--attach` hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Native,
    Generic,
    Tc,
}

impl Attach {
    pub const ALL: [Attach; 3] = [Attach::Native, Attach::Generic, Attach::Tc];

    pub fn flag(self) -> &'static str {
        match self {
            Attach::Native => "native",
            Attach::Generic => "generic",
            Attach::Tc => "tc",
        }
    }
}

/// Four namespaces: the client and server reach each other only through the
/// gateway, via the router that joins all three.
pub struct Topology {
    router_xdp: OwnedFd,
    pub lab: Lab,
    pub router: String,
    pub gateway: String,
    pub client: String,
    pub server: String,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let mut lab = Lab::new()?;
        let router = lab.add_ns("router")?;
        let gateway = lab.add_ns("gw")?;
        let client = lab.add_ns("client")?;
        let server = lab.add_ns("server")?;

        exec(&router, "sysctl -qw net.ipv4.ip_forward=1")?;
        let router_xdp = link_gateway(&router, &gateway)?;
        for (router_if, router_ip, host, host_ip) in [
            (
                ROUTER_CLIENT_IFACE,
                ROUTER_CLIENT_IP,
                &client,
                CLIENT_UNDERLAY_IP,
            ),
            (ROUTER_SERVER_IFACE, ROUTER_SERVER_IP, &server, SERVER_IP),
        ] {
            veth_link(&router, router_if, router_ip, host, host_ip)?;
        }
        // A veth would hand the gateway TCP/UDP with checksums still to be
        // filled in; real Internet traffic arrives complete.
        exec(&server, &format!("ethtool -K {HOST_IFACE} tx off"))?;
        // The same toward the client, where `ipip-peer` reads the tunnel
        // with a raw socket, which gets checksums as they are: a real link
        // finishes the ones a GSO aggregate leaves to offload.
        exec(&router, &format!("ethtool -K {ROUTER_CLIENT_IFACE} tx off"))?;

        add_tun(&client, CLIENT_TUN_IP, CLIENT_TUN_PREFIX)?;
        for ip in CLIENT_EXTRA_IPS {
            exec(&client, &format!("ip addr add {ip}/32 dev {TUN_IFACE}"))?;
        }
        exec(
            &client,
            &format!("ip route add {INTERNET_CIDR} dev {TUN_IFACE} src {CLIENT_TUN_IP}"),
        )?;
        Ok(Self {
            router_xdp,
            lab,
            router,
            gateway,
            client,
            server,
        })
    }

    /// Deletes the link between router and gateway, the gateway's
    /// interface with it.
    pub fn unlink_gateway(&mut self) -> Result<()> {
        exec(&self.router, &format!("ip link del {ROUTER_GATEWAY_IFACE}"))?;
        Ok(())
    }

    /// Creates the link between router and gateway again, as it was.
    pub fn relink_gateway(&mut self) -> Result<()> {
        self.router_xdp = link_gateway(&self.router, &self.gateway)?;
        Ok(())
    }

    /// The link running `XDP_PASS` on the router's veth toward the
    /// gateway, for a caller to put another program in its place.
    pub fn router_gateway_xdp(&self) -> BorrowedFd<'_> {
        self.router_xdp.as_fd()
    }

    /// The client's tunnel endpoint, peering with the gateway.
    /// A UDP request from the client's tunnel address to `server` is
    /// answered, and the server saw it from the gateway's address.
    pub fn udp_translated(&self, server: std::net::SocketAddr) -> Result<()> {
        let reply = crate::echo::udp_request(&self.client, CLIENT_TUN_IP, server, b"hello")?;
        anyhow::ensure!(reply.seen.ip() == GATEWAY_IP, "server saw {}", reply.seen);
        Ok(())
    }

    pub fn start_ipip_peer(&self, bin: &Path) -> Result<Daemon> {
        start_ipip_peer(&self.lab, &self.client, bin, CLIENT_UNDERLAY_IP, GATEWAY_IP)
    }

    pub fn start_gateway(&self, bin: &Path, attach: Attach) -> Result<Daemon> {
        self.start_gateway_with(bin, attach, "")
    }

    /// The gateway with `extra` arguments after the usual ones.
    pub fn start_gateway_with(&self, bin: &Path, attach: Attach, extra: &str) -> Result<Daemon> {
        self.start_gateway_under("", bin, attach, extra)
    }

    /// The gateway run by `launcher` (a command line that ends by running
    /// the program after it, like `env A=B`), or directly if it is empty.
    pub fn start_gateway_under(
        &self,
        launcher: &str,
        bin: &Path,
        attach: Attach,
        extra: &str,
    ) -> Result<Daemon> {
        let state = format!("--state-dir {}", self.lab.state_dir()?.display());
        self.spawn_gateway(launcher, bin, attach, &format!("{state} {extra}"))
    }

    /// The gateway with its state directory named by the file `config`
    /// alone (a `--state-dir` on the command line would win over it).
    pub fn start_gateway_configured(
        &self,
        bin: &Path,
        attach: Attach,
        config: &Path,
    ) -> Result<Daemon> {
        self.spawn_gateway("", bin, attach, &format!("--config {}", config.display()))
    }

    fn spawn_gateway(
        &self,
        launcher: &str,
        bin: &Path,
        attach: Attach,
        extra: &str,
    ) -> Result<Daemon> {
        let args = run_args(attach, extra);
        let mut gw = match launcher.split_once(' ') {
            None if launcher.is_empty() => self.lab.spawn(&self.gateway, "gateway", bin, &args)?,
            split => {
                let (program, rest) = split.unwrap_or((launcher, ""));
                let args = format!("{rest} {} {args}", bin.display());
                self.lab.spawn(&self.gateway, "gateway", program, &args)?
            }
        };
        gw.wait_for("ready", GATEWAY_READY)?;
        Ok(gw)
    }

    /// Runs `egress run` in native mode on the gateway's state directory,
    /// for a start that is to be refused: waits up to `timeout` for it to
    /// end (stopping it if it has not, an error); returns how it ended and
    /// what it printed.
    pub fn run_gateway_refused(
        &self,
        bin: &Path,
        timeout: Duration,
    ) -> Result<(ExitStatus, String)> {
        let state = format!("--state-dir {}", self.lab.state_dir()?.display());
        let mut gw = self.lab.spawn(
            &self.gateway,
            "refused",
            bin,
            &run_args(Attach::Native, &state),
        )?;
        let status = gw.wait_exit(timeout)?;
        Ok((status, gw.log()))
    }

    /// Runs `egress down` (with `extra` arguments) for the gateway's
    /// interface and state directory, in its namespace; returns its
    /// output whatever its exit status.
    pub fn egress_down(&self, bin: &Path, extra: &str) -> Result<Output> {
        exec_output(
            &self.gateway,
            &format!(
                "{} down --iface {HOST_IFACE} --state-dir {} {extra}",
                bin.display(),
                self.lab.state_dir()?.display()
            ),
        )
    }

    /// Takes the gateway down (`egress down`, which must succeed) once its
    /// daemon has stopped; returns what it printed, its log then its
    /// summary.
    pub fn take_down(&self, bin: &Path) -> Result<String> {
        let out = self.egress_down(bin, "")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        anyhow::ensure!(out.status.success(), "egress down failed: {text}");
        Ok(text)
    }

    /// Serves `dir` over HTTP on the server's address.
    pub fn start_http_server(&self, dir: &Path) -> Result<Daemon> {
        start_http_server(&self.lab, &self.server, SERVER_IP, dir)
    }
}

/// The topology with the client's tunnel endpoint and the gateway running.
/// Fields drop in order: the daemons stop before the namespaces go.
pub struct Stack {
    pub gateway: Daemon,
    pub peer: Daemon,
    pub topo: Topology,
    pub attach: Attach,
}

impl Stack {
    pub fn start(egress_bin: &Path, ipip_peer_bin: &Path, attach: Attach) -> Result<Self> {
        Self::start_with(egress_bin, ipip_peer_bin, attach, "")
    }

    /// As [`Stack::start`], with `extra` gateway arguments.
    pub fn start_with(
        egress_bin: &Path,
        ipip_peer_bin: &Path,
        attach: Attach,
        extra: &str,
    ) -> Result<Self> {
        Self::start_under("", egress_bin, ipip_peer_bin, attach, extra)
    }

    /// As [`Stack::start_with`], the gateway run by `launcher` (see
    /// [`Topology::start_gateway_under`]).
    pub fn start_under(
        launcher: &str,
        egress_bin: &Path,
        ipip_peer_bin: &Path,
        attach: Attach,
        extra: &str,
    ) -> Result<Self> {
        let topo = Topology::new()?;
        let peer = topo.start_ipip_peer(ipip_peer_bin)?;
        let gateway = topo.start_gateway_under(launcher, egress_bin, attach, extra)?;
        Ok(Self {
            gateway,
            peer,
            topo,
            attach,
        })
    }
}

impl Stack {
    /// Runs `egress ARGS --state-dir <the gateway's>` in the gateway's
    /// namespace (`egress flows`, `egress stats`); returns its stdout.
    pub fn egress_cli(&self, egress_bin: &Path, args: &str) -> Result<String> {
        exec(
            &self.topo.gateway,
            &format!(
                "{} {args} --state-dir {}",
                egress_bin.display(),
                self.topo.lab.state_dir()?.display()
            ),
        )
    }

    /// Stops the gateway's daemon and takes the gateway down (`egress
    /// down`), as the demo does on its way out; returns what that printed.
    pub fn take_down(&mut self, egress_bin: &Path) -> Result<String> {
        self.gateway.stop();
        self.topo.take_down(egress_bin)
    }

    /// Stops the gateway and starts it again, as an upgrade does.
    pub fn restart_gateway(&mut self, egress_bin: &Path) -> Result<()> {
        self.gateway.stop();
        self.gateway = self.topo.start_gateway(egress_bin, self.attach)?;
        Ok(())
    }
}

/// The router's link to the gateway. The gateway's native XDP_TX lands on
/// the router's veth, which needs an XDP program for that (see `tiny_bpf`):
/// it is returned, attached.
fn link_gateway(router: &str, gateway: &str) -> Result<OwnedFd> {
    veth_link(
        router,
        ROUTER_GATEWAY_IFACE,
        ROUTER_GATEWAY_IP,
        gateway,
        GATEWAY_IP,
    )?;
    let router_xdp =
        Program::load(Hook::Xdp, &programs::pass())?.attach(router, ROUTER_GATEWAY_IFACE)?;
    exec(
        gateway,
        &format!("sysctl -qw net.ipv4.conf.{HOST_IFACE}.rp_filter=0"),
    )?;
    Ok(router_xdp)
}

/// A veth pair, `a_if` in `a` and `HOST_IFACE` in `b`, on one /24; `b`'s
/// default route points at `a`.
/// The arguments of `egress run` for the topology's gateway in `attach`
/// mode, with `extra` ones after them.
fn run_args(attach: Attach, extra: &str) -> String {
    let cidrs: String = CLIENT_CIDRS
        .iter()
        .map(|c| format!(" --client-cidr {c}"))
        .collect();
    format!(
        "run --iface {HOST_IFACE} --peer {CLIENT_UNDERLAY_IP}{cidrs} --snat {GATEWAY_IP} --attach {} {extra}",
        attach.flag()
    )
}

pub fn veth_link(a: &str, a_if: &str, a_ip: Ipv4Addr, b: &str, b_ip: Ipv4Addr) -> Result<()> {
    exec(
        a,
        &format!("ip link add {a_if} type veth peer name {HOST_IFACE} netns {b}"),
    )?;
    exec(a, &format!("ip addr add {a_ip}/{LINK_PREFIX} dev {a_if}"))?;
    exec(a, &format!("ip link set {a_if} up"))?;
    exec(
        b,
        &format!("ip addr add {b_ip}/{LINK_PREFIX} dev {HOST_IFACE}"),
    )?;
    exec(b, &format!("ip link set {HOST_IFACE} up"))?;
    exec(b, &format!("ip route add default via {a_ip}"))?;
    Ok(())
}

/// A persistent TUN device for `ipip-peer` to attach to; it has no carrier
/// until then.
pub fn add_tun(ns: &str, ip: Ipv4Addr, prefix: u8) -> Result<()> {
    exec(ns, &format!("ip tuntap add dev {TUN_IFACE} mode tun"))?;
    exec(ns, &format!("ip link set {TUN_IFACE} mtu {TUN_MTU} up"))?;
    exec(ns, &format!("ip addr add {ip}/{prefix} dev {TUN_IFACE}"))?;
    Ok(())
}

/// Runs the IP-in-IP emulator on `ns`'s TUN device.
pub fn start_ipip_peer(
    lab: &Lab,
    ns: &str,
    bin: &Path,
    local: Ipv4Addr,
    remote: Ipv4Addr,
) -> Result<Daemon> {
    let args = format!("--tun {TUN_IFACE} --local {local} --remote {remote}");
    let mut peer = lab.spawn(ns, "ipip-peer", bin, &args)?;
    peer.wait_for("ready", QUICK_READY)?;
    Ok(peer)
}

/// Text spanning many full-sized segments, to serve over HTTP.
pub fn large_page() -> String {
    (0..20_000).map(|i| format!("line {i:05}\n")).collect()
}

/// `python3 -m http.server` minus its reverse DNS lookup of the bound
/// address, which would stall for many seconds (no DNS in the lab) and send
/// queries toward the host's resolver. Logs each request's client address.
const HTTP_SERVER_PY: &str = r#"
import http.server, socketserver, sys

class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

ip, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=root)
print(f"Serving HTTP on {ip} port {port}", flush=True)
Server((ip, port), handler).serve_forever()
"#;

/// Serves `dir` over HTTP on `ip`:`HTTP_PORT` in `ns`.
pub fn start_http_server(lab: &Lab, ns: &str, ip: Ipv4Addr, dir: &Path) -> Result<Daemon> {
    let script = lab.dir().join("http_server.py");
    std::fs::write(&script, HTTP_SERVER_PY)?;
    let args = format!("-u {} {ip} {HTTP_PORT} {}", script.display(), dir.display());
    let mut http = lab.spawn(ns, "http", "python3", &args)?;
    http.wait_for("Serving HTTP", QUICK_READY)?;
    Ok(http)
}
