//! `egress check`: is this host ready to run the gateway with these
//! settings? Facts are gathered first ([`Facts::gather`]), then judged by
//! a pure function ([`judge`]), so the verdicts are unit-tested without a
//! host to break.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use crate::{
    datapath::Attached,
    host_changes::HostChanges,
    links,
    netif::{self, Interface, Route},
    pinning::{self, Placement},
    resize::{self, Remnant},
    settings::{AttachMode, Settings},
    state_fit, sysctl,
};

/// Oldest kernel the data path is built and tested for.
const MIN_KERNEL: (u32, u32) = (6, 1);
/// First kernel with TCX, which attaches TC programs as links.
const TCX_KERNEL: (u32, u32) = (6, 6);
const BTF: &str = "/sys/kernel/btf/vmlinux";
/// Largest MTU at which most drivers (ENA, mlx5, veth) run an XDP program
/// that does not handle multi-buffer frames: one 4 KiB page minus headroom
/// and the kernel's per-packet bookkeeping.
pub const NATIVE_XDP_MAX_MTU: u32 = 3498;
/// The outer IPv4 header the tunnel adds.
const OUTER_HEADER: u32 = 20;
/// Smallest inner MTU worth running a tunnel with (IPv6's minimum link MTU).
const MIN_INNER_MTU: u32 = 1280;
/// An address on the Internet, to ask the kernel for the route there
/// (nothing is sent).
const INTERNET: Ipv4Addr = Ipv4Addr::new(1, 1, 1, 1);

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Worth knowing, nothing to fix.
    Info,
    Warning,
    Problem,
}

#[derive(Debug)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    /// What to do about it, for warnings and problems.
    pub fix: Option<String>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn ok(&mut self, what: impl Into<String>) {
        self.add(Level::Ok, what.into(), None);
    }

    fn info(&mut self, what: impl Into<String>) {
        self.add(Level::Info, what.into(), None);
    }

    fn warn(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.add(Level::Warning, what.into(), Some(fix.into()));
    }

    fn problem(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.add(Level::Problem, what.into(), Some(fix.into()));
    }

    fn add(&mut self, level: Level, what: String, fix: Option<String>) {
        self.findings.push(Finding { level, what, fix });
    }

    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// One line per finding, a `fix:` line under each that has one, and a
    /// summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let tag = match f.level {
                Level::Ok => "ok",
                Level::Info => "info",
                Level::Warning => "warning",
                Level::Problem => "PROBLEM",
            };
            let _ = writeln!(out, "{tag:<8} {}", f.what);
            if let Some(fix) = &f.fix {
                let _ = writeln!(out, "{:<8} fix: {fix}", "");
            }
        }
        let (problems, warnings) = (self.count(Level::Problem), self.count(Level::Warning));
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let warnings = plural(warnings, "warning");
        let _ = match problems {
            0 => writeln!(out, "ready to run ({warnings})"),
            n => writeln!(out, "{}, {warnings}", plural(n, "problem")),
        };
        out
    }
}

/// What the host says, gathered without changing anything.
#[derive(Debug)]
pub struct Facts {
    /// `uname -r`.
    pub kernel: String,
    pub btf: bool,
    /// `net.core.bpf_jit_enable`, when readable.
    pub jit: Option<bool>,
    /// The effective capability set.
    pub caps: u64,
    /// Where the state directory lies.
    pub bpffs: Placement,
    /// Why the state directory cannot be written, if it cannot.
    pub state_unwritable: Option<nix::errno::Errno>,
    /// A previous run's pinned state is in the state directory.
    pub state_present: bool,
    /// Whether that state fits the data path with these settings (or why
    /// it cannot be read).
    pub state_fit: Result<state_fit::Fit, String>,
    /// The pins an interrupted resize of the state left (or why they
    /// cannot be read, which stops a start too).
    pub resize_remnants: Result<Vec<Remnant>, String>,
    /// The data path an `egress run` on the state directory attached: its
    /// links pinned there (hook and interface), and whether a clsact
    /// filter is recorded (see `host_changes`).
    pub data_path: Vec<String>,
    /// Whether a daemon runs on the state directory (`None`: no such
    /// directory, or it cannot be looked at).
    pub daemon: Option<bool>,
    /// `net.ipv4.ip_forward`.
    pub ip_forward: Option<bool>,
    /// `net.ipv4.conf.all.rp_filter`.
    pub rp_filter_all: Option<u32>,
    /// `net.ipv4.ip_no_pmtu_disc`.
    pub no_pmtu_disc: Option<u32>,
    /// The gateway's interface, when it exists.
    pub iface: Option<IfaceFacts>,
    /// Every interface's name, to suggest one.
    pub names: Vec<String>,
    /// Every local IPv4 address.
    pub local_addrs: Vec<Ipv4Addr>,
    /// The route to each peer, in the order of the settings.
    pub peer_routes: Vec<(Ipv4Addr, Option<Route>)>,
    pub internet_route: Option<Route>,
}

#[derive(Debug)]
pub struct IfaceFacts {
    pub iface: Interface,
    pub mtu: Option<u32>,
    /// `None` when the kernel cannot tell (before 6.3).
    pub native_xdp: Option<bool>,
    /// The per-interface sysctls the daemon sets, with their values now.
    pub sysctls: Vec<(&'static str, Option<String>)>,
    /// Whether this process may write them.
    pub sysctls_writable: bool,
    pub rp_filter: Option<u32>,
}

impl Facts {
    pub fn gather(settings: &Settings) -> Self {
        let iface = Interface::lookup(&settings.iface)
            .ok()
            .flatten()
            .map(|iface| {
                let dir = sysctl::conf_dir(&iface.name);
                IfaceFacts {
                    mtu: iface.mtu,
                    native_xdp: iface.native_xdp().ok().flatten(),
                    sysctls: sysctl::NEEDED
                        .iter()
                        .map(|(key, _)| (*key, read_trimmed(&dir.join(key))))
                        .collect(),
                    sysctls_writable: nix::unistd::access(
                        &dir.join(sysctl::NEEDED[0].0),
                        nix::unistd::AccessFlags::W_OK,
                    )
                    .is_ok(),
                    rp_filter: read_trimmed(&dir.join("rp_filter")).and_then(|v| v.parse().ok()),
                    iface,
                }
            });
        Self {
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            btf: Path::new(BTF).exists(),
            jit: read_trimmed(Path::new("/proc/sys/net/core/bpf_jit_enable")).map(|v| v != "0"),
            caps: effective_caps(),
            bpffs: bpffs(&settings.state_dir),
            state_unwritable: pinning::writable(&settings.state_dir).err(),
            state_present: pinning::has_state(&settings.state_dir),
            state_fit: state_fit::judge(&settings.state_dir, settings.max_flows)
                .map_err(|e| format!("{e:#}")),
            resize_remnants: resize::remnants(&settings.state_dir).map_err(|e| format!("{e:#}")),
            data_path: data_path(&settings.state_dir),
            daemon: pinning::held(&settings.state_dir),
            ip_forward: read_trimmed(Path::new("/proc/sys/net/ipv4/ip_forward")).map(|v| v != "0"),
            rp_filter_all: read_trimmed(&sysctl::conf_dir("all").join("rp_filter"))
                .and_then(|v| v.parse().ok()),
            no_pmtu_disc: read_trimmed(Path::new("/proc/sys/net/ipv4/ip_no_pmtu_disc"))
                .and_then(|v| v.parse().ok()),
            iface,
            names: netif::names(),
            local_addrs: local_addrs(),
            peer_routes: settings
                .admission
                .peers
                .iter()
                .map(|&p| (p, netif::route_to(p).ok().flatten()))
                .collect(),
            internet_route: netif::route_to(INTERNET).ok().flatten(),
        }
    }
}

/// What is attached from `dir`'s pins and record, as "HOOK on IFACE".
fn data_path(dir: &Path) -> Vec<String> {
    let iface = |index| netif::name_of(index).unwrap_or_else(|| format!("interface {index}"));
    let mut attached: Vec<String> = links::pinned(dir)
        .unwrap_or_default()
        .iter()
        .map(|l| format!("{} on {}", l.hook.as_str(), iface(l.ifindex)))
        .collect();
    if let Some(c) = HostChanges::load(dir).ok().and_then(|h| h.clsact) {
        attached.push(format!(
            "{} on {}",
            Attached::Clsact.as_str(),
            iface(c.ifindex)
        ));
    }
    attached
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// `CapEff` of /proc/self/status.
fn effective_caps() -> u64 {
    read_trimmed(Path::new("/proc/self/status"))
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn bpffs(state_dir: &Path) -> Placement {
    // Unreadable: judged as a place for no pins, which names the fix.
    pinning::placement(state_dir).unwrap_or(Placement::Elsewhere)
}

fn local_addrs() -> Vec<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .map(|list| {
            list.filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
                .collect()
        })
        .unwrap_or_default()
}

/// `6.18.44-generic` → (6, 18).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn has_cap(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// The verdict on `facts` for `settings`.
pub fn judge(settings: &Settings, facts: &Facts) -> Report {
    let mut r = Report::default();
    kernel(&mut r, facts);
    privileges(&mut r, facts);
    state_dir(&mut r, &settings.state_dir, facts);
    resize_remnants(&mut r, &settings.state_dir, facts);
    match &facts.iface {
        Some(i) => interface(&mut r, settings, i, facts),
        None => r.problem(
            format!("interface {:?} does not exist", settings.iface),
            format!(
                "set iface (--iface) to the interface facing the peers and the Internet, one of: {}",
                facts.names.join(", ")
            ),
        ),
    }
    sysctls(&mut r, settings, facts);
    routes(&mut r, settings, facts);
    for warning in settings.warnings() {
        r.warn(warning.what, warning.fix);
    }
    r
}

fn kernel(r: &mut Report, facts: &Facts) {
    match kernel_version(&facts.kernel) {
        Some(v) if v >= MIN_KERNEL => r.ok(format!("kernel {} (6.1 or later)", facts.kernel)),
        _ => r.problem(
            format!("kernel {:?} is older than 6.1", facts.kernel),
            "install a 6.1 or later kernel (Debian 12, Ubuntu 24.04, or Ubuntu 22.04 with linux-aws / HWE)",
        ),
    }
    match facts.btf {
        true => r.ok(format!("BTF: {BTF}")),
        false => r.problem(
            format!("no BTF: {BTF} is missing"),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's and Ubuntu's are)",
        ),
    }
    if facts.jit == Some(false) {
        r.warn(
            "the BPF JIT is off: the data path runs interpreted, several times slower",
            "sysctl -w net.core.bpf_jit_enable=1",
        );
    }
}

fn privileges(r: &mut Report, facts: &Facts) {
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
    ]
    .into_iter()
    .filter(|&(cap, _)| !has_cap(facts.caps, cap))
    .map(|(_, name)| name)
    .collect();
    const FIX: &str =
        "run as root, or under packaging/egress.service, which grants exactly what is needed";
    if !missing.is_empty() {
        r.problem(format!("missing capabilities: {}", missing.join(", ")), FIX);
    } else if !has_cap(facts.caps, CAP_NET_RAW) {
        r.warn(
            "missing CAP_NET_RAW: returning fragments that come before their first would not \
             be sent on to their client, the path MTU toward the peers not learned (TCP \
             through a narrower link on the way would stall), and routers' errors about the \
             tunnel not reported",
            FIX,
        );
    } else {
        r.ok("privileges: CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW, CAP_PERFMON");
    }
}

fn state_dir(r: &mut Report, dir: &Path, facts: &Facts) {
    match (facts.bpffs, facts.state_unwritable) {
        (Placement::OnBpffs, Some(e)) => r.problem(
            format!(
                "state-dir {} cannot be written: {}",
                dir.display(),
                e.desc()
            ),
            match e {
                nix::errno::Errno::EROFS => format!(
                    "keep state-dir under {} (a systemd unit's ProtectSystem=strict makes \
                     other mounts read-only), or mount a read-write BPF filesystem on it",
                    pinning::BPFFS
                ),
                _ => "run as root (uid 0 owns the pinned state)".to_owned(),
            },
        ),
        (Placement::OnBpffs, None) => {
            r.ok(format!("state-dir {} on a BPF filesystem", dir.display()))
        }
        // Judged once mounted: a new BPF filesystem is writable.
        (Placement::Mountable, _) if has_cap(facts.caps, CAP_SYS_ADMIN) => r.ok(format!(
            "no BPF filesystem on {} yet: the gateway mounts it at start",
            pinning::BPFFS
        )),
        (Placement::Mountable, _) => r.problem(
            format!(
                "no BPF filesystem on {}, and no CAP_SYS_ADMIN to mount it",
                pinning::BPFFS
            ),
            format!("mount -t bpf bpf {}", pinning::BPFFS),
        ),
        (Placement::Elsewhere, _) => r.problem(
            format!("state-dir {} is not on a BPF filesystem", dir.display()),
            pinning::elsewhere_fix(dir),
        ),
    }
    let fit = match &facts.state_fit {
        Ok(fit) => fit,
        Err(e) => {
            return r.warn(
                format!("cannot read the connection state in {}: {e}", dir.display()),
                "run as root (uid 0 owns the pinned state)",
            );
        }
    };
    if let Some((what, fix)) = fit.refusal(dir) {
        r.problem(what, fix);
    } else if let Some(resize) = fit.resize.describe(dir) {
        r.info(resize);
    } else if facts.state_present {
        r.ok(format!(
            "connection state of an earlier run in {}: the gateway resumes it",
            dir.display()
        ));
    }
    if !facts.data_path.is_empty() {
        let attached = facts.data_path.join(", ");
        match facts.daemon {
            Some(true) => r.ok(format!("a gateway runs on {}: {attached}", dir.display())),
            _ => r.info(format!(
                "the data path of a stopped `egress run` on {} is attached and translating \
                 ({attached}), without a daemon: a start takes it over with no gap; `egress \
                 down` removes it",
                dir.display()
            )),
        }
    }
    if !fit.missing.is_empty() {
        r.warn(
            format!(
                "the connection state in {} lacks {} (removed by hand?): a start makes {} \
                 anew, empty",
                dir.display(),
                fit.missing.join(", "),
                if fit.missing.len() == 1 { "it" } else { "them" }
            ),
            "none while the gateway runs: it pins its own again within 10 s (a stopped \
             gateway's are lost)",
        );
    }
}

/// An interrupted resize's pins: the next start finishes the resize with
/// them (or drops them), so they are a warning, unless unreadable, which
/// stops a start.
fn resize_remnants(r: &mut Report, dir: &Path, facts: &Facts) {
    let remnants = match &facts.resize_remnants {
        Ok(remnants) if remnants.is_empty() => return,
        Ok(remnants) => remnants,
        Err(e) => {
            return r.problem(
                format!(
                    "cannot read what an interrupted resize of the connection state left in \
                     {}: {e}; a start stops there too",
                    dir.display()
                ),
                "remove the pin named (rm PATH; connections only an old table holds break), \
                 or start over with --reset-state",
            );
        }
    };
    let name = |pin: &Path| {
        pin.file_name()
            .map_or_else(|| pin.display().to_string(), |n| n.display().to_string())
    };
    let each: Vec<String> = remnants
        .iter()
        .map(|Remnant { pin, replaced }| match replaced {
            Some(map) => format!(
                "{} (the old {map} table, replaced by its copy: the next start copies what the \
                 previous data path added to it after the copy, then removes it)",
                name(pin)
            ),
            None => format!(
                "{} (a table the resize left unused: the next start removes it)",
                name(pin)
            ),
        })
        .collect();
    let paths: Vec<String> = remnants
        .iter()
        .map(|Remnant { pin, .. }| pin.display().to_string())
        .collect();
    r.warn(
        format!(
            "an interrupted resize of the connection state left tables pinned in {}, holding \
             kernel memory until the next start: {}",
            dir.display(),
            each.join(", ")
        ),
        format!(
            "none needed: the next `egress run` finishes the resize; to drop them now instead: \
             rm {} (connections only an old table holds break), or `egress down \
             --reset-state` (the gateway and all its connection state)",
            paths.join(" ")
        ),
    );
}

fn interface(r: &mut Report, s: &Settings, i: &IfaceFacts, facts: &Facts) {
    let name = &i.iface.name;
    match i.iface.up {
        true => r.ok(format!("interface {name} exists and is up")),
        false => r.problem(
            format!("interface {name} is down"),
            format!("ip link set {name} up"),
        ),
    }
    let defaulted: Vec<&str> = [
        ("snat", s.snat.is_empty()),
        ("tunnel-local", s.tunnel_local.is_none()),
    ]
    .into_iter()
    .filter(|&(_, d)| d)
    .map(|(k, _)| k)
    .collect();
    match (i.iface.primary, defaulted.is_empty()) {
        (Some(a), false) => r.ok(format!(
            "{name} has IPv4 address {a}: {} default to it",
            defaulted.join(" and ")
        )),
        (None, false) => r.problem(
            format!(
                "{name} has no IPv4 address, and {} default to it",
                defaulted.join(" and ")
            ),
            format!(
                "ip addr add ADDRESS/PREFIX dev {name}, or set {}",
                defaulted.join(" and ")
            ),
        ),
        (_, true) => {}
    }
    for (key, addr) in s
        .snat
        .iter()
        .map(|a| ("snat", *a))
        .chain(s.tunnel_local.map(|a| ("tunnel-local", a)))
    {
        if !facts.local_addrs.contains(&addr) {
            r.warn(
                format!("{key} {addr} is not an address of this host: nothing answers ARP for it"),
                format!(
                    "ip addr add {addr}/32 dev {name} (on EC2: assign it to the ENI as a secondary private address)"
                ),
            );
        }
    }
    mtu_and_hook(r, s.attach, i, tc_attach(facts));
}

/// How the gateway attaches its TC program on this kernel. It finds out
/// by trying a TCX link; the kernel version tells the same without
/// attaching anything.
fn tc_attach(facts: &Facts) -> &'static str {
    match kernel_version(&facts.kernel) >= Some(TCX_KERNEL) {
        true => "a TCX link on ingress (Linux 6.6+)",
        false => "a filter on clsact ingress (no TCX before Linux 6.6)",
    }
}

fn mtu_and_hook(r: &mut Report, attach: AttachMode, i: &IfaceFacts, tc: &str) {
    let name = &i.iface.name;
    let Some(mtu) = i.mtu else {
        r.warn(format!("cannot read {name}'s MTU"), "see `ip link show`");
        return;
    };
    let inner = mtu.saturating_sub(OUTER_HEADER);
    match inner >= MIN_INNER_MTU {
        true => r.ok(format!(
            "MTU {mtu}: tunnelled packets up to {inner} bytes (set the peers' tunnel MTU to {inner} or less)"
        )),
        false => r.warn(
            format!("MTU {mtu} leaves tunnelled packets only {inner} bytes (under {MIN_INNER_MTU})"),
            format!("ip link set {name} mtu 1500 (and the same on the path to the peers)"),
        ),
    }
    let too_big = mtu > NATIVE_XDP_MAX_MTU;
    let xdp = match (i.native_xdp, too_big) {
        (Some(false), _) => Err(format!("{name}'s driver has no native XDP")),
        (_, true) => Err(format!(
            "MTU {mtu} is above the {NATIVE_XDP_MAX_MTU} bytes most drivers (ENA included) allow native XDP"
        )),
        (Some(true), false) => Ok(format!("{name}'s driver runs XDP natively")),
        (None, false) => Ok(format!(
            "this kernel cannot tell whether {name}'s driver runs XDP natively (Linux 6.3+ can)"
        )),
    };
    match (attach, xdp) {
        (AttachMode::Auto, Ok(why)) => r.ok(format!(
            "{why}: attach auto tries native XDP first, TC if that fails"
        )),
        (AttachMode::Auto, Err(why)) => {
            r.ok(format!("{why}: attach auto will use TC, through {tc}"))
        }
        (AttachMode::Native, Ok(why)) => r.ok(why),
        (AttachMode::Native, Err(why)) if too_big => r.problem(
            why,
            format!("ip link set {name} mtu {NATIVE_XDP_MAX_MTU}, or attach = \"tc\""),
        ),
        (AttachMode::Native, Err(why)) => r.problem(why, "attach = \"tc\" (or \"auto\")"),
        (AttachMode::Generic, _) => r.warn(
            "attach generic: the slowest hook, and it mishandles offloaded checksums",
            "attach = \"auto\" (native XDP where the driver has it, else TC)",
        ),
        (AttachMode::Tc, _) => r.ok(format!("attach tc: through {tc}")),
    }
}

fn sysctls(r: &mut Report, s: &Settings, facts: &Facts) {
    if let Some(i) = &facts.iface {
        let name = &i.iface.name;
        let now: Vec<String> = i
            .sysctls
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("?")))
            .collect();
        match i.sysctls_writable {
            true => r.ok(format!(
                "net.ipv4.conf.{name}: {} now; the gateway sets {} while its data path runs (until `egress down`)",
                now.join(" "),
                sysctl::NEEDED.map(|(k, v)| format!("{k}={v}")).join(" ")
            )),
            false => r.problem(
                format!("cannot write net.ipv4.conf.{name}.*, which the gateway must set"),
                "run as root (or with CAP_NET_ADMIN) without a read-only /proc/sys (systemd: no ProtectKernelTunables)",
            ),
        }
        // The kernel uses the larger of `all` and the interface's value.
        let rp = i.rp_filter.max(facts.rp_filter_all);
        if let Some(rp) = rp.filter(|&v| v != 0) {
            r.ok(format!(
                "rp_filter={rp} on {name}: fine, the kernel never sees the clients' inner addresses"
            ));
        }
    }
    if facts.ip_forward == Some(false) {
        r.warn(
            format!(
                "net.ipv4.ip_forward=0: the gateway turns forwarding on for {} alone, but a later write of ip_forward=0 (sysctl --system, configuration management) turns it off on every interface and stops translation",
                s.iface
            ),
            "echo net.ipv4.ip_forward=1 > /etc/sysctl.d/90-egress.conf && sysctl --system",
        );
    }
    if let Some(mode) = facts.no_pmtu_disc.filter(|&m| m != 0) {
        r.warn(
            format!(
                "net.ipv4.ip_no_pmtu_disc={mode}: the kernel {} the MTU routers on the way to a \
                 peer report, so returning packets too big for a narrower link there are lost",
                if mode == 1 { "takes 552 bytes for" } else { "ignores" }
            ),
            "echo net.ipv4.ip_no_pmtu_disc=0 > /etc/sysctl.d/90-egress-pmtu.conf && sysctl --system",
        );
    }
}

fn routes(r: &mut Report, s: &Settings, facts: &Facts) {
    let iface_index = facts.iface.as_ref().map(|i| i.iface.index);
    let via = |route: &Route| {
        let dev = netif::name_of(route.oif).unwrap_or_else(|| format!("#{}", route.oif));
        match route.via {
            Some(gw) => format!("via {gw} dev {dev}"),
            None => format!("dev {dev}"),
        }
    };
    for (peer, route) in &facts.peer_routes {
        match route {
            Some(route) if Some(route.oif) == iface_index || iface_index.is_none() => {
                r.ok(format!("route to peer {peer}: {}", via(route)))
            }
            Some(route) => r.ok(format!(
                "route to peer {peer}: {} (not {}: replies are redirected there)",
                via(route),
                s.iface
            )),
            None => r.problem(
                format!("no route to peer {peer}: replies cannot be tunnelled back"),
                format!("ip route add {peer} via GATEWAY dev {}", s.iface),
            ),
        }
    }
    match &facts.internet_route {
        Some(route) => r.ok(format!("route to the Internet: {}", via(route))),
        None => r.problem(
            "no route to the Internet: translated packets have nowhere to go",
            format!("ip route add default via GATEWAY dev {}", s.iface),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{resize, settings::for_test as settings};

    fn route() -> Option<Route> {
        Some(Route {
            oif: 2,
            via: Some(Ipv4Addr::new(10, 1, 1, 1)),
        })
    }

    /// A host where everything is right.
    fn good() -> Facts {
        Facts {
            kernel: "6.18.44-generic".into(),
            btf: true,
            jit: Some(true),
            caps: (1 << CAP_BPF)
                | (1 << CAP_NET_ADMIN)
                | (1 << CAP_NET_RAW)
                | (1 << CAP_PERFMON)
                | (1 << CAP_SYS_ADMIN),
            bpffs: Placement::OnBpffs,
            state_unwritable: None,
            state_present: false,
            state_fit: Ok(state_fit::Fit::default()),
            resize_remnants: Ok(Vec::new()),
            data_path: Vec::new(),
            daemon: Some(false),
            ip_forward: Some(true),
            rp_filter_all: Some(0),
            no_pmtu_disc: Some(0),
            iface: Some(IfaceFacts {
                iface: Interface {
                    name: "eth0".into(),
                    index: 2,
                    primary: Some(Ipv4Addr::new(10, 1, 1, 10)),
                    up: true,
                    mtu: Some(1500),
                },
                mtu: Some(1500),
                native_xdp: Some(true),
                sysctls: vec![
                    ("forwarding", Some("0".into())),
                    ("accept_local", Some("0".into())),
                ],
                sysctls_writable: true,
                rp_filter: Some(0),
            }),
            names: vec!["eth0".into(), "lo".into()],
            local_addrs: vec![Ipv4Addr::new(10, 1, 1, 10)],
            peer_routes: vec![(Ipv4Addr::new(10, 0, 1, 10), route())],
            internet_route: route(),
        }
    }

    fn iface(f: &mut Facts) -> &mut IfaceFacts {
        f.iface.as_mut().unwrap()
    }

    /// The findings at `level`, as text.
    fn at(report: &Report, level: Level) -> Vec<String> {
        report
            .findings
            .iter()
            .filter(|f| f.level == level)
            .map(|f| format!("{} / fix: {}", f.what, f.fix.as_deref().unwrap_or("")))
            .collect()
    }

    #[test]
    fn a_good_host_has_no_problems_or_warnings() {
        let report = judge(&settings(""), &good());
        assert!(
            at(&report, Level::Problem).is_empty(),
            "{}",
            report.render()
        );
        assert!(
            at(&report, Level::Warning).is_empty(),
            "{}",
            report.render()
        );
        assert!(report.render().contains("attach auto tries native XDP"));
    }

    /// Each broken fact yields exactly one problem whose text and fix
    /// contain `words`.
    #[test]
    fn each_broken_fact_is_one_problem_with_a_fix() {
        type Break = fn(&mut Facts);
        let cases: [(Break, &[&str]); 12] = [
            (
                |f| f.kernel = "5.15.0-91-generic".into(),
                &["older than 6.1", "install"],
            ),
            (|f| f.btf = false, &["BTF", "CONFIG_DEBUG_INFO_BTF"]),
            (
                |f| f.caps = 1 << CAP_SYS_ADMIN,
                &["CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON", "root"],
            ),
            (
                |f| f.bpffs = Placement::Elsewhere,
                &["not on a BPF filesystem", "mount -t bpf"],
            ),
            (
                |f| f.state_unwritable = Some(nix::errno::Errno::EROFS),
                &["cannot be written: Read-only file system", "ProtectSystem"],
            ),
            (
                |f| iface(f).iface.up = false,
                &["eth0 is down", "ip link set eth0 up"],
            ),
            (
                |f| iface(f).iface.primary = None,
                &["no IPv4 address", "snat and tunnel-local", "ip addr add"],
            ),
            (
                |f| iface(f).sysctls_writable = false,
                &["cannot write net.ipv4.conf.eth0"],
            ),
            (
                |f| f.peer_routes[0].1 = None,
                &["no route to peer 10.0.1.10", "ip route add 10.0.1.10"],
            ),
            (
                |f| f.internet_route = None,
                &["no route to the Internet", "ip route add default"],
            ),
            (|f| f.iface = None, &["\"eth0\" does not exist", "eth0, lo"]),
            (
                |f| f.state_fit = Ok(unfit()),
                &[
                    "made with max-flows 2048: FLOWS: max_entries is 4096, expected 2097152",
                    "run with max-flows 2048, or start over with --reset-state",
                ],
            ),
        ];
        for (breaks, words) in cases {
            let mut facts = good();
            breaks(&mut facts);
            let problems = at(&judge(&settings(""), &facts), Level::Problem);
            assert_eq!(problems.len(), 1, "{words:?}: {problems:?}");
            for w in words {
                assert!(problems[0].contains(w), "{w:?} not in {problems:?}");
            }
        }
    }

    /// The state a gateway with `max-flows` 2048 pinned, judged for the
    /// default.
    fn unfit() -> state_fit::Fit {
        state_fit::Fit {
            unfit: vec!["FLOWS: max_entries is 4096, expected 2097152".into()],
            made_with: Some(2048),
            ..Default::default()
        }
    }

    /// The information `facts` give with the default settings, which must
    /// be neither problems nor warnings, and the report as printed.
    fn info_only(facts: &Facts) -> (Vec<String>, String) {
        let report = judge(&settings(""), facts);
        assert!(
            at(&report, Level::Problem).is_empty() && at(&report, Level::Warning).is_empty(),
            "{}",
            report.render()
        );
        (at(&report, Level::Info), report.render())
    }

    /// The state a gateway with `max-flows` 2048 pinned, holding `flows`
    /// flows, judged for `max_flows`.
    fn resized(flows: u32, max_flows: u32) -> state_fit::Fit {
        let pinned = resize::sizes(2048).map(|(name, max_entries)| resize::Pinned {
            name,
            max_entries,
            entries: flows * resize::sized(name).map_or(1, |(_, per_flow)| per_flow),
        });
        state_fit::Fit {
            resize: resize::plan(&pinned, max_flows),
            ..Default::default()
        }
    }

    #[test]
    fn a_resize_is_information_and_a_shrink_below_the_flows_a_problem() {
        let mut facts = good();
        facts.state_present = true;
        facts.state_fit = Ok(resized(3, 4096));
        let (info, rendered) = info_only(&facts);
        assert!(
            info.len() == 1
                && info[0].contains("was made with max-flows 2048: a start resizes it to max-flows 4096, copying its 3 flows"),
            "{info:?}"
        );
        assert!(rendered.contains("\ninfo     the connection state"));

        facts.state_fit = Ok(resized(300, 100));
        let problems = at(&judge(&settings(""), &facts), Level::Problem);
        assert!(
            problems.len() == 1
                && problems[0].contains("holds 300 flows, more than max-flows 100 holds")
                && problems[0].contains("run with max-flows 300 or more"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_state_lacking_maps_is_a_warning_and_unreadable_state_too() {
        let mut facts = good();
        facts.state_present = true;
        facts.state_fit = Ok(state_fit::Fit {
            missing: vec!["MAPPINGS", "STATS"],
            ..Default::default()
        });
        let report = judge(&settings(""), &facts);
        assert!(at(&report, Level::Problem).is_empty());
        let warnings = at(&report, Level::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("lacks MAPPINGS, STATS (removed by hand?)")
                && warnings[0].contains("pins its own again"),
            "{warnings:?}"
        );
        facts.state_fit = Err("cannot open /sys/fs/bpf/egress/FLOWS: EPERM".into());
        let warnings = at(&judge(&settings(""), &facts), Level::Warning);
        assert!(
            warnings[0].contains("cannot read the connection state")
                && warnings[0].contains("EPERM"),
            "{warnings:?}"
        );
    }

    #[test]
    fn an_interrupted_resize_is_a_warning_unless_unreadable() {
        let mut facts = good();
        let dir = Path::new("/sys/fs/bpf/egress");
        facts.resize_remnants = Ok(vec![
            Remnant {
                pin: dir.join("resize-old-FLOWS-42"),
                replaced: Some("FLOWS"),
            },
            Remnant {
                pin: dir.join("resize-new-MAPPINGS"),
                replaced: None,
            },
        ]);
        let report = judge(&settings(""), &facts);
        assert!(
            at(&report, Level::Problem).is_empty(),
            "{}",
            report.render()
        );
        let warnings = at(&report, Level::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        for words in [
            "an interrupted resize of the connection state left tables pinned in \
             /sys/fs/bpf/egress, holding kernel memory until the next start: \
             resize-old-FLOWS-42 (the old FLOWS table, replaced by its copy: the next start \
             copies what the previous data path added to it after the copy, then removes it), \
             resize-new-MAPPINGS (a table the resize left unused: the next start removes it)",
            "fix: none needed: the next `egress run` finishes the resize",
            "rm /sys/fs/bpf/egress/resize-old-FLOWS-42 /sys/fs/bpf/egress/resize-new-MAPPINGS",
        ] {
            assert!(warnings[0].contains(words), "{words:?} not in {warnings:?}");
        }

        facts.resize_remnants =
            Err("cannot read /sys/fs/bpf/egress/resize-old-FLOWS-42: EINVAL".into());
        let problems = at(&judge(&settings(""), &facts), Level::Problem);
        assert!(
            problems.len() == 1
                && problems[0].contains("resize-old-FLOWS-42: EINVAL; a start stops there too")
                && problems[0].contains("rm PATH"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_data_path_left_running_is_information() {
        let mut facts = good();
        facts.data_path = vec!["native XDP on eth0".into()];
        let (info, rendered) = info_only(&facts);
        assert!(
            info.len() == 1
                && info[0].contains("(native XDP on eth0), without a daemon")
                && info[0].contains("`egress down` removes it"),
            "{info:?}"
        );
        assert!(rendered.contains("\ninfo     the data path"));
        facts.daemon = Some(true);
        let report = judge(&settings(""), &facts);
        assert!(at(&report, Level::Info).is_empty());
        assert!(report.render().contains("a gateway runs on"));
    }

    #[test]
    fn bpffs_is_fine_where_the_daemon_can_mount_it() {
        let mut facts = good();
        facts.bpffs = Placement::Mountable;
        assert!(at(&judge(&settings(""), &facts), Level::Problem).is_empty());
        facts.caps &= !(1 << CAP_SYS_ADMIN);
        let problems = at(&judge(&settings(""), &facts), Level::Problem);
        assert!(
            problems[0].contains("mount -t bpf bpf /sys/fs/bpf"),
            "{problems:?}"
        );
    }

    #[test]
    fn explicit_addresses_need_no_interface_address() {
        let mut facts = good();
        iface(&mut facts).iface.primary = None;
        let s = settings("snat = [\"10.1.1.10\"]\ntunnel-local = \"10.1.1.10\"");
        let report = judge(&s, &facts);
        assert!(
            at(&report, Level::Problem).is_empty(),
            "{}",
            report.render()
        );
        // An address no interface has gets a warning.
        let s = settings("snat = [\"10.1.1.99\"]");
        let warnings = at(&judge(&s, &good()), Level::Warning);
        assert!(
            warnings[0].contains("snat 10.1.1.99 is not an address"),
            "{warnings:?}"
        );
    }

    #[test]
    fn mtu_and_xdp_support_decide_the_hook() {
        let with = |mtu: u32, native: Option<bool>, attach: &str| {
            let mut facts = good();
            iface(&mut facts).mtu = Some(mtu);
            iface(&mut facts).native_xdp = native;
            judge(&settings(&format!("attach = \"{attach}\"")), &facts)
        };
        let jumbo = with(9001, Some(true), "auto");
        assert!(
            jumbo.render().contains("attach auto will use TC"),
            "{}",
            jumbo.render()
        );
        assert!(at(&jumbo, Level::Problem).is_empty());
        let jumbo_native = at(&with(9001, Some(true), "native"), Level::Problem);
        assert!(
            jumbo_native[0].contains("ip link set eth0 mtu 3498"),
            "{jumbo_native:?}"
        );
        let no_xdp = at(&with(1500, Some(false), "native"), Level::Problem);
        assert!(no_xdp[0].contains("no native XDP"), "{no_xdp:?}");
        assert!(
            with(1500, Some(false), "auto")
                .render()
                .contains("attach auto will use TC")
        );
        assert!(with(1500, None, "auto").render().contains("cannot tell"));
        let small = at(&with(1200, Some(true), "auto"), Level::Warning);
        assert!(small[0].contains("only 1180 bytes"), "{small:?}");
        assert!(at(&with(1500, Some(true), "tc"), Level::Problem).is_empty());
    }

    #[test]
    fn the_tc_attach_follows_the_kernel() {
        let tc_on = |kernel: &str| {
            let mut facts = good();
            facts.kernel = kernel.into();
            judge(&settings("attach = \"tc\""), &facts).render()
        };
        assert!(tc_on("6.18.44-generic").contains("attach tc: through a TCX link"));
        assert!(tc_on("6.6.0").contains("TCX link"));
        let old = tc_on("6.1.0-27-cloud-amd64");
        assert!(
            old.contains("attach tc: through a filter on clsact ingress"),
            "{old}"
        );
    }

    #[test]
    fn ip_forward_off_is_a_warning_with_a_fix() {
        let mut facts = good();
        facts.ip_forward = Some(false);
        let report = judge(&settings(""), &facts);
        assert!(at(&report, Level::Problem).is_empty());
        let warnings = at(&report, Level::Warning);
        assert!(
            warnings[0].contains("net.ipv4.ip_forward=0"),
            "{warnings:?}"
        );
        assert!(warnings[0].contains("/etc/sysctl.d/"), "{warnings:?}");
    }

    #[test]
    fn missing_cap_net_raw_is_a_warning() {
        let mut facts = good();
        facts.caps &= !(1 << CAP_NET_RAW);
        let report = judge(&settings(""), &facts);
        assert!(at(&report, Level::Problem).is_empty());
        let warnings = at(&report, Level::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("CAP_NET_RAW"), "{warnings:?}");
    }

    #[test]
    fn path_mtu_discovery_off_is_a_warning() {
        for (mode, says) in [(1, "takes 552"), (2, "ignores"), (3, "ignores")] {
            let mut facts = good();
            facts.no_pmtu_disc = Some(mode);
            let report = judge(&settings(""), &facts);
            assert!(at(&report, Level::Problem).is_empty());
            let warnings = at(&report, Level::Warning);
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(warnings[0].contains(says), "{warnings:?}");
            assert!(warnings[0].contains("ip_no_pmtu_disc=0"), "{warnings:?}");
        }
    }

    #[test]
    fn each_settings_warning_has_its_own_fix() {
        let short_udp = settings("[timeouts]\nudp = \"30s\"");
        let warnings = at(&judge(&short_udp, &good()), Level::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("timeouts.udp") && warnings[0].contains("fix: raise"),
            "{warnings:?}"
        );
        // A peer left unbound beside a bound one: the fix binds it, it
        // has nothing to do with timeouts (it said "raise the timeout").
        let text = "iface = \"eth0\"\npeer = [\"10.0.1.10\", \"10.0.1.11\"]\n\
                    client-cidr = [\"10.0.0.0/16\"]\n\
                    [peer-clients]\n\"10.0.1.11\" = [\"10.0.7.0/24\"]\n";
        let unbound = Settings::merge(
            crate::settings::FileSettings::default(),
            crate::settings::FileSettings::parse(text).unwrap(),
        )
        .unwrap();
        let warnings = at(&judge(&unbound, &good()), Level::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("peer 10.0.1.10 is not in peer-clients")
                && warnings[0].contains("--peer-clients 10.0.1.10=")
                && !warnings[0].contains("timeout"),
            "{warnings:?}"
        );
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("6.1.0-27-cloud-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("weird"), None);
    }
}
