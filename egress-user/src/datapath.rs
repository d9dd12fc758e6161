//! The eBPF side as the daemon sees it: load with settings, fill the
//! policy maps, attach, read counters and flows.

use std::{
    fs,
    io::Read as _,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        LinkOrder, ProgramError, ProgramInfo, SchedClassifier, Xdp, XdpMode,
        links::FdLink,
        loaded_programs,
        tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttach, TcAttachType},
        xdp::{XdpLink, XdpLinkId},
    },
    sys::SyscallError,
};
use egress_common::{
    config::Config,
    flow::{Flow, FlowKey, Mapping, PortKey},
    flow_cache::{CACHE_SLOTS, CachedFlow},
    fragment::{FragEntry, FragKey},
    ip_id::IP_ID_BUCKETS,
    peers::PeerSet,
    reason::Reason,
    route::ROUTE_SLOTS,
};

use crate::{
    admission::Admission,
    clsact::{self, Clsact, HandedClsact},
    handover::{self, HandedLink},
    inspect, netif, pinning, reorder,
    settings::{AttachMode, PortRange},
    state_fit, upgrade,
};

/// The compiled eBPF object, built by build.rs.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-datapath"));

/// Names of the XDP and TC programs in [`OBJECT`].
pub const XDP_PROGRAM: &str = "egress_xdp";
pub const TC_PROGRAM: &str = "egress_tc";

/// The hook the data path runs in once attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    NativeXdp,
    GenericXdp,
    /// TC through a TCX link on ingress (Linux 6.6+).
    Tcx,
    /// TC through a netlink filter on clsact ingress (older kernels).
    Clsact,
}

impl Attached {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NativeXdp => "native XDP",
            Self::GenericXdp => "generic XDP",
            Self::Tcx => "TC (TCX ingress)",
            Self::Clsact => "TC (clsact ingress)",
        }
    }

    /// A name for file names.
    pub fn slug(self) -> &'static str {
        match self {
            Self::NativeXdp => "native",
            Self::GenericXdp => "generic",
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }

    /// Whether `mode` may give this hook.
    fn fits(self, mode: AttachMode) -> bool {
        matches!(
            (mode, self),
            (AttachMode::Native | AttachMode::Auto, Self::NativeXdp)
                | (AttachMode::Generic, Self::GenericXdp)
                | (AttachMode::Tc | AttachMode::Auto, Self::Tcx)
        )
    }
}

/// Everything the data path is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub tunnel_local: Ipv4Addr,
    pub snat: Vec<Ipv4Addr>,
    pub ports: PortRange,
    pub admission: Admission,
    pub max_flows: u32,
    /// Most flows per client address; 0 for no limit.
    pub max_client_flows: u32,
    /// Largest MSS a TCP SYN or SYN-ACK may announce; 0 leaves MSS alone.
    pub mss: u16,
    /// bpffs directory the connection state is pinned in.
    pub state_dir: PathBuf,
    /// Drop the state a previous run left in `state_dir`.
    pub reset_state: bool,
}

impl Policy {
    fn config(&self) -> Config {
        let mut c = Config::UNSET;
        c.tunnel_local = self.tunnel_local.octets();
        c.port_min = self.ports.min;
        c.port_max = self.ports.max;
        c.snat_count = self.snat.len() as u32;
        c.max_client_flows = self.max_client_flows;
        c.mss = self.mss;
        for (slot, a) in c.snat_addrs.iter_mut().zip(&self.snat) {
            *slot = a.octets();
        }
        c
    }
}

pub struct Datapath {
    // Dropped in this order: the programs detach before the qdisc they
    // may hang from goes.
    ebpf: Ebpf,
    clsact: Option<Clsact>,
    /// The attachment, if it is a link (one a successor can take over).
    link: Option<LinkId>,
}

enum LinkId {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

impl Datapath {
    /// Loads the programs with `policy`, picking up the connection state
    /// pinned by an earlier run unless told to reset it, and fills the
    /// policy maps.
    pub fn load(policy: &Policy) -> anyhow::Result<Self> {
        // Settings are checked before; a policy made in code is checked here.
        policy.admission.validate()?;
        pinning::prepare(&policy.state_dir, policy.reset_state)?;
        let resumed = pinning::has_state(&policy.state_dir);
        if resumed {
            upgrade::flow_cache(&policy.state_dir)?;
        }
        let fit = state_fit::judge(&policy.state_dir, policy.max_flows)?;
        if let Some((what, fix)) = fit.refusal(&policy.state_dir) {
            anyhow::bail!("{what}; {fix}");
        }
        if !fit.missing.is_empty() {
            tracing::warn!(
                dir = %policy.state_dir.display(),
                missing = ?fit.missing,
                "the connection state lacks maps (removed by hand?): made anew, empty"
            );
        }
        let config = policy.config();
        let mut loader = EbpfLoader::new();
        for (name, entries) in map_sizes(policy.max_flows)? {
            loader.map_max_entries(name, entries);
        }
        let mut ebpf = loader
            .override_global("CONFIG", &config, true)
            .default_map_pin_directory(&policy.state_dir)
            .load(OBJECT)
            .map_err(|e| match e {
                // Judged above; this is aya's own word on it.
                EbpfError::MapError(e @ MapError::IncompatiblePinnedMap { .. }) => {
                    let (what, fix) = state_fit::unfit(&policy.state_dir, None);
                    anyhow::anyhow!("{e}: {what}; {fix}")
                }
                EbpfError::MapError(MapError::CreateError { name, io_error })
                    if matches!(io_error.raw_os_error(), Some(libc::ENOMEM | libc::E2BIG)) =>
                {
                    anyhow::anyhow!(
                        "cannot create the {name} map: {io_error}: the state maps for \
                         --max-flows {} do not fit in the kernel's memory (they take about \
                         480 MiB per million flows); lower --max-flows",
                        policy.max_flows
                    )
                }
                EbpfError::MapError(MapError::CreateError { ref io_error, .. })
                    if io_error.raw_os_error() == Some(libc::EPERM) =>
                {
                    anyhow::Error::new(e).context(
                        "cannot load the eBPF programs: needs root or CAP_BPF + CAP_PERFMON + \
                         CAP_NET_ADMIN + CAP_NET_RAW",
                    )
                }
                e => anyhow::Error::new(e).context(
                    "cannot load the eBPF programs (`egress check` says what this host is missing)",
                ),
            })?;
        if resumed {
            tracing::info!(dir = %policy.state_dir.display(), "resuming the connection state of the previous run");
        }

        let mut peers: HashMap<_, [u8; 4], u8> = HashMap::try_from(map(&mut ebpf, "PEERS")?)?;
        for (p, index) in policy.admission.peer_indices() {
            peers
                .insert(&p.octets(), &index, 0)
                .with_context(|| format!("cannot add peer {p}"))?;
        }
        let mut clients: LpmTrie<_, [u8; 4], PeerSet> =
            LpmTrie::try_from(map(&mut ebpf, "CLIENTS")?)?;
        for (c, allowed) in policy.admission.client_ranges() {
            let key = Key::new(u32::from(c.prefix_len()), c.network().octets());
            clients
                .insert(&key, &allowed, 0)
                .with_context(|| format!("cannot add client range {c}"))?;
        }

        seed_ip_ids(&mut ebpf)?;

        let mut datapath = Self {
            ebpf,
            clsact: None,
            link: None,
        };
        datapath
            .xdp()?
            .load()
            .context("the kernel verifier rejected the XDP program")?;
        datapath
            .tc()?
            .load()
            .context("the kernel verifier rejected the TC program")?;
        Ok(datapath)
    }

    /// Attaches to `iface` (index `ifindex`) as `mode` asks; returns the
    /// hook it got. A link handed over in `state_dir` (by a previous image
    /// of the daemon, see `handover`, or the data path this one replaces)
    /// is taken over: this program replaces its program atomically.
    pub fn attach(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: AttachMode,
        state_dir: &Path,
    ) -> anyhow::Result<Attached> {
        let mut handed = None;
        for h in handover::take_links(state_dir)? {
            if handed.is_none() && h.ifindex == ifindex && h.hook.fits(mode) {
                handed = Some(h);
            } else {
                // Another interface, or another hook than asked for now:
                // it goes before this attach (one XDP program at a time).
                tracing::info!(
                    "detached the {} program the previous run handed over on interface {}: \
                     this run attaches {mode:?} to {iface}",
                    h.hook.as_str(),
                    h.ifindex
                );
            }
        }
        // A handed-over link's interface is not looked at for another
        // gateway: one that came since would have been refused, seeing the
        // link's program. (Nor could it be without CAP_SYS_ADMIN: the
        // program of a TCX link is listed, and its details need it.)
        if handed.is_none() {
            self.refuse_another_gateway(iface, ifindex)?;
        }
        // A TC filter a gateway left (killed, or handing over on a kernel
        // without TCX) would run its old program beside (or behind) the
        // new one: removed in any mode, but the one at our place while the
        // attach may end on clsact, which swaps its program in there.
        let may_be_clsact = handed.is_none() && matches!(mode, AttachMode::Tc | AttachMode::Auto);
        clsact::remove_leftovers(iface, ifindex, TC_PROGRAM, may_be_clsact)?;
        let hook = match (handed, mode) {
            (Some(h), _) => self.take_over(h),
            (None, AttachMode::Native) => self.attach_xdp(ifindex, XdpMode::Driver),
            (None, AttachMode::Generic) => self.attach_xdp(ifindex, XdpMode::Skb),
            (None, AttachMode::Tc) => self.attach_tc(iface, ifindex),
            (None, AttachMode::Auto) => match self.attach_xdp(ifindex, XdpMode::Driver) {
                Ok(hook) => {
                    tracing::info!("attach auto: {iface}'s driver supports XDP, the fastest hook");
                    Ok(hook)
                }
                Err(e) => {
                    // Generic XDP is slower than TC, and mishandles GRO
                    // aggregates and offloaded checksums, which TC handles.
                    tracing::warn!(
                        "attach auto: no native XDP on {iface} ({e:#}); using TC, which beats generic XDP"
                    );
                    self.attach_tc(iface, ifindex)
                }
            },
        }?;
        if may_be_clsact && hook != Attached::Clsact {
            clsact::remove_leftovers(iface, ifindex, TC_PROGRAM, false)?;
        }
        Ok(hook)
    }

    /// Refuses an interface that another gateway's program runs on: another
    /// `egress run`, with a state directory of its own (the state lock
    /// keeps out one with ours). Attached in front of it, or behind, or in
    /// its clsact filter's place, one would take the other's packets, each
    /// with its own flows. XDP and TCX attachments end with their process,
    /// so any is a running gateway's; a clsact filter is one only while a
    /// live process holds its program.
    fn refuse_another_gateway(&mut self, iface: &str, ifindex: u32) -> anyhow::Result<()> {
        let ours = [self.xdp()?.info()?.id(), self.tc()?.info()?.id()];
        let theirs = |p: &ProgramInfo| {
            !ours.contains(&p.id())
                && p.name_as_str()
                    .is_some_and(|n| [XDP_PROGRAM, TC_PROGRAM].contains(&n))
        };
        let mut found = match SchedClassifier::query_tcx(ifindex, TcAttachType::Ingress) {
            Ok((_, programs)) => programs.into_iter().find(theirs),
            // A kernel without TCX (before 6.6), or a program that went
            // while listed.
            Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                if matches!(io_error.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) =>
            {
                None
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot list the TCX programs on {iface}"));
            }
        };
        let xdp = netif::xdp_programs(ifindex)
            .with_context(|| format!("cannot list the XDP programs on {iface}"))?;
        if found.is_none() && xdp.iter().any(|id| !ours.contains(id)) {
            // Skipping programs that go while listed.
            found = loaded_programs()
                .flatten()
                .find(|p| xdp.contains(&p.id()) && theirs(p));
        }
        let refusal = |what: String| {
            anyhow::anyhow!(
                "another egress gateway runs on {iface} ({what}): an `egress run` with another \
                 state directory; stop it first (systemctl stop egress)"
            )
        };
        if let Some(p) = found {
            let name = p.name_as_str().unwrap_or_default();
            return Err(refusal(format!("its program {name}, id {}", p.id())));
        }
        // A clsact filter outlives its gateway: it is a running one's only
        // if a live process holds its program.
        match clsact::running_gateway(ifindex, TC_PROGRAM)
            .with_context(|| format!("cannot list the clsact filters on {iface}"))?
        {
            Some((id, pid)) => Err(refusal(format!(
                "its clsact filter's program {TC_PROGRAM}, id {id}, held by pid {pid}"
            ))),
            None => Ok(()),
        }
    }

    fn attach_xdp(&mut self, ifindex: u32, mode: XdpMode) -> anyhow::Result<Attached> {
        let (hook, name) = match mode {
            XdpMode::Driver => (Attached::NativeXdp, "native"),
            _ => (Attached::GenericXdp, "generic"),
        };
        let id = self
            .xdp()?
            .attach(ifindex, mode)
            .with_context(|| format!("{name} XDP attach failed"))?;
        self.link = Some(LinkId::Xdp(id));
        Ok(hook)
    }

    /// Swaps this program into a link handed over.
    fn take_over(&mut self, handed: HandedLink) -> anyhow::Result<Attached> {
        let context = || format!("cannot take over the {} link", handed.hook.as_str());
        let HandedLink { hook, link, .. } = handed;
        self.link = Some(if hook == Attached::Tcx {
            let link = SchedClassifierLink::try_from(link).with_context(context)?;
            LinkId::Tc(self.tc()?.attach_to_link(link).with_context(context)?)
        } else {
            let link = XdpLink::try_from(link).with_context(context)?;
            LinkId::Xdp(self.xdp()?.attach_to_link(link).with_context(context)?)
        });
        tracing::info!(
            "took over the {} link: its program replaced atomically, no packet went to the \
             host's stack",
            hook.as_str()
        );
        Ok(hook)
    }

    /// Hands the attachment (`hook` on interface `ifindex`) over to a
    /// successor and lets go of it: it stays attached after this data path
    /// and process. A link is pinned in `state_dir`; a clsact filter
    /// stays at its place, and what is returned says whether its qdisc is
    /// the successor's to remove.
    pub fn hand_over(
        &mut self,
        state_dir: &Path,
        hook: Attached,
        ifindex: u32,
    ) -> anyhow::Result<Option<HandedClsact>> {
        let link: FdLink = match self.link.take() {
            Some(LinkId::Tc(id)) if hook == Attached::Clsact => {
                // A filter's link deletes it when dropped.
                std::mem::forget(self.tc()?.take_link(id)?);
                return Ok(self.clsact.take().map(Clsact::hand_over));
            }
            Some(LinkId::Xdp(id)) => self.xdp()?.take_link(id)?.try_into()?,
            Some(LinkId::Tc(id)) => self.tc()?.take_link(id)?.try_into()?,
            None => return Ok(None),
        };
        let path = handover::pin_path(state_dir, hook, ifindex);
        link.pin(&path)
            .with_context(|| format!("cannot pin the link at {}", path.display()))?;
        Ok(None)
    }

    /// Takes over the clsact qdisc a previous data path handed over
    /// (removed at the end if a daemon added it); false if this one is not
    /// attached through that interface's clsact qdisc.
    pub fn adopt_clsact(&mut self, handed: HandedClsact) -> bool {
        self.clsact.as_mut().is_some_and(|c| c.adopt(handed))
    }

    /// Through a TCX link where the kernel has TCX (6.6+): like the XDP
    /// link, it ends with this process, so a killed daemon leaves nothing
    /// running and a new one never stacks on an old one. Older kernels get
    /// a filter on clsact ingress instead.
    fn attach_tc(&mut self, iface: &str, ifindex: u32) -> anyhow::Result<Attached> {
        let tcx = TcAttach::Tcx {
            attach_type: TcAttachType::Ingress,
            order: LinkOrder::default(),
        };
        match self.tc()?.attach(ifindex, tcx) {
            Ok(id) => {
                self.link = Some(LinkId::Tc(id));
                tracing::info!(
                    "attach tc: TCX link on {iface} ingress (the kernel has TCX; the attachment ends with this process)"
                );
                Ok(Attached::Tcx)
            }
            // What a kernel without TCX answers (BPF_LINK_CREATE knows no
            // TCX attach type for a TC program).
            Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                self.attach_tc_clsact(iface, ifindex)?;
                tracing::info!(
                    "attach tc: filter on {iface}'s clsact ingress, pref {} handle {:#x} \
                     (the kernel refused a TCX link: {io_error}; TCX came in Linux 6.6)",
                    clsact::PRIORITY,
                    u32::from(clsact::HANDLE),
                );
                Ok(Attached::Clsact)
            }
            Err(e) => Err(e).with_context(|| format!("TCX attach on {iface} ingress failed")),
        }
    }

    /// The TC attach of kernels without TCX: a netlink filter on clsact
    /// ingress at our own priority and handle (public so tests reach it on
    /// kernels with TCX). Our filter found there (a reload's previous image
    /// handed it over, or a killed gateway left it) gets this program in
    /// place, with no moment detached.
    pub fn attach_tc_clsact(&mut self, iface: &str, ifindex: u32) -> anyhow::Result<()> {
        self.clsact = Some(Clsact::ensure(iface, ifindex)?);
        let context = || {
            format!(
                "TC attach on {iface}'s clsact ingress (pref {}, handle {:#x}) failed; \
                 `tc filter show dev {iface} ingress` shows what is there",
                clsact::PRIORITY,
                u32::from(clsact::HANDLE),
            )
        };
        let found = clsact::remove_leftovers(iface, ifindex, TC_PROGRAM, true)?;
        let tc = self.tc()?;
        let id = if found {
            let id = tc
                .attach_to_link(clsact::ours(ifindex)?)
                .with_context(context)?;
            tracing::info!(
                "took over the {TC_PROGRAM} filter on {iface}'s clsact ingress: its program \
                 replaced atomically, no packet went to the host's stack"
            );
            id
        } else {
            tc.attach(ifindex, clsact::ingress_filter())
                .with_context(context)?
        };
        self.link = Some(LinkId::Tc(id));
        Ok(())
    }

    /// The loaded XDP program (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn xdp(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .context("XDP program missing from the eBPF object")?
            .try_into()?)
    }

    /// The loaded TC program (for `BPF_PROG_TEST_RUN` in tests).
    pub fn tc(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(TC_PROGRAM)
            .context("TC program missing from the eBPF object")?
            .try_into()?)
    }

    /// Packets per reason, summed over CPUs.
    pub fn stats(&self) -> anyhow::Result<Vec<(Reason, u64)>> {
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("STATS").context("STATS map missing")?)?;
        Reason::ALL
            .iter()
            .map(|&r| Ok((r, stats.get(&(r as u32), 0)?.iter().sum())))
            .collect()
    }

    /// Retires every FIB answer the data path remembers: routes, rules,
    /// neighbours, links or addresses changed.
    pub fn routes_changed(&mut self) -> anyhow::Result<()> {
        let mut generation: Array<_, u64> =
            Array::try_from(map(&mut self.ebpf, "ROUTES_GENERATION")?)?;
        let next = generation.get(&0, 0)?.wrapping_add(1);
        generation.set(0, &next, 0)?;
        Ok(())
    }

    /// The connection state, on handles of its own that another thread
    /// can own (the garbage collector's) and that stay valid across
    /// reloads, which pick up the same pinned maps.
    pub fn state(&self) -> anyhow::Result<State> {
        Ok(State {
            flows: HashMap::try_from(self.own("FLOWS")?)?,
            mappings: HashMap::try_from(self.own("MAPPINGS")?)?,
            clients: HashMap::try_from(self.own("CLIENT_FLOWS")?)?,
            cache: Array::try_from(self.own("FLOW_CACHE")?)?,
        })
    }

    /// What the daemon reads to send on returning fragments that came
    /// before their first, on handles of their own (pinned maps: valid
    /// across reloads).
    pub fn reorder_maps(&self) -> anyhow::Result<reorder::Maps> {
        Ok(reorder::Maps {
            ring: RingBuf::try_from(self.own("HELD_FRAGMENTS")?)?,
            fragments: HashMap::try_from(self.own("FRAGMENTS")?)?,
            flows: HashMap::try_from(self.own("FLOWS")?)?,
        })
    }

    /// The flows, on a handle of their own (a pinned map: valid across
    /// reloads).
    pub fn flows(&self) -> anyhow::Result<HashMap<MapData, FlowKey, Flow>> {
        Ok(HashMap::try_from(self.own("FLOWS")?)?)
    }

    /// A handle of its own on the map `name`.
    fn own(&self, name: &str) -> anyhow::Result<Map> {
        let fd = self.map_data(name)?.fd().as_fd().try_clone_to_owned()?;
        Ok(Map::from_map_data(MapData::from_fd(fd)?)?)
    }

    /// The map `name`, of a kind the daemon handles on its own.
    fn map_data(&self, name: &str) -> anyhow::Result<&MapData> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("{name} map missing from the eBPF object"))?;
        let (Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::Array(data)
        | Map::RingBuf(data)
        | Map::PerCpuArray(data)) = map
        else {
            anyhow::bail!("{name} is not a map the daemon handles on its own");
        };
        Ok(data)
    }

    /// Pins again in `dir` each of the state maps whose pin is gone or
    /// names another map (removed or replaced by hand), so that a restart
    /// or reload picks up the state this data path runs on; returns their
    /// names.
    pub fn keep_pinned(&self, dir: &Path) -> anyhow::Result<Vec<&'static str>> {
        let mut pinned_again = Vec::new();
        for name in pinning::PINNED_MAPS {
            let ours = self.map_data(name)?;
            let path = dir.join(name);
            let context = || format!("cannot pin {name} at {} again", path.display());
            match MapData::from_pin(&path) {
                Ok(pinned) if pinned.info()?.id() == ours.info()?.id() => continue,
                Ok(_) => std::fs::remove_file(&path).with_context(context)?,
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).with_context(context),
            }
            ours.pin(&path).with_context(context)?;
            pinned_again.push(name);
        }
        Ok(pinned_again)
    }

    /// The first fragments' entries for the rest of their datagrams.
    pub fn fragments(&mut self) -> anyhow::Result<HashMap<&mut MapData, FragKey, FragEntry>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, "FRAGMENTS")?)?)
    }
}

/// Kernel memory charged to a map: the `memlock` line of its fdinfo.
fn memlock(map: &MapData) -> anyhow::Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", map.fd().as_fd().as_raw_fd());
    let info = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock in {path}"))
}

/// The connection-state maps.
pub struct State {
    pub flows: HashMap<MapData, FlowKey, Flow>,
    pub mappings: HashMap<MapData, PortKey, Mapping>,
    /// Live flows per client address.
    pub clients: HashMap<MapData, [u8; 4], u64>,
    /// Recent flows, a block per CPU, with packets not yet counted in
    /// `flows`.
    pub cache: Array<MapData, CachedFlow>,
}

impl State {
    /// Every flow half, its packets counted wherever the data path counted
    /// them (see [`inspect::counted_flows`]).
    pub fn counted_flows(&self) -> anyhow::Result<Vec<(FlowKey, Flow)>> {
        inspect::counted_flows(&self.flows, Some(&self.cache))
    }

    /// Kernel memory of each state map, in bytes.
    pub fn memory(&self) -> anyhow::Result<[(&'static str, u64); 4]> {
        Ok([
            ("flows", memlock(self.flows.map())?),
            ("mappings", memlock(self.mappings.map())?),
            ("client_flows", memlock(self.clients.map())?),
            ("flow_cache", memlock(self.cache.map())?),
        ])
    }
}

/// The sizes the loader gives the maps whose size the settings or the
/// host decide (the object's are placeholders).
pub fn map_sizes(max_flows: u32) -> anyhow::Result<[(&'static str, u32); 5]> {
    // Two entries per flow (outbound and return half), and at most one
    // mapping (two entries) per flow.
    let entries = max_flows.saturating_mul(2);
    let cpus = cpu_numbers()?;
    Ok([
        ("FLOWS", entries),
        ("MAPPINGS", entries),
        ("CLIENT_FLOWS", max_flows),
        // The caches the data path keeps per CPU, a block of slots for
        // each CPU number (see the data path's `maps::this_cpus`).
        ("FLOW_CACHE", CACHE_SLOTS * cpus),
        ("ROUTES", ROUTE_SLOTS * cpus),
    ])
}

/// How many CPU numbers the host may use: the highest possible CPU's,
/// plus one (CPU numbers are below it; the kernel lists ranges in order).
fn cpu_numbers() -> anyhow::Result<u32> {
    const POSSIBLE: &str = "/sys/devices/system/cpu/possible";
    let list =
        std::fs::read_to_string(POSSIBLE).with_context(|| format!("cannot read {POSSIBLE}"))?;
    let highest = list.trim().rsplit([',', '-']).next().unwrap_or_default();
    let highest: u32 = highest
        .parse()
        .with_context(|| format!("{POSSIBLE}: no CPU list: {list:?}"))?;
    Ok(highest + 1)
}

/// Starts the outer IP ID counters at random places, as Linux starts its
/// own, while all are 0: made by this load (or by one that died before it
/// set them). Counters that have counted, pinned by an earlier run, go on
/// where they were.
fn seed_ip_ids(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let context = "cannot set the outer IP ID counters (the IP_IDS map)";
    let mut ids: Array<_, u64> = Array::try_from(map(ebpf, "IP_IDS")?)?;
    let used = ids
        .iter()
        .try_fold(false, |used, id| id.map(|id| used || id != 0))
        .context(context)?;
    if used {
        return Ok(());
    }
    let mut random = [0u8; 8 * IP_ID_BUCKETS as usize];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("cannot read /dev/urandom")?;
    for (i, seed) in (0..).zip(random.as_chunks::<8>().0) {
        ids.set(i, &u64::from_ne_bytes(*seed), 0).context(context)?;
    }
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("{name} map missing from the eBPF object"))
}
