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
        LinkOrder, Program, ProgramError, ProgramInfo, SchedClassifier, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        loaded_programs,
        tc::{SchedClassifierLink, TcAttach, TcAttachType},
        xdp::XdpLink,
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
    route::{self, ROUTE_SLOTS},
};

use crate::{
    admission::Admission,
    clsact::{self, ClsactRecord},
    inspect, links, netif, pinning, reorder,
    resize::{self, Pending},
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

    pub fn is_xdp(self) -> bool {
        matches!(self, Self::NativeXdp | Self::GenericXdp)
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

/// Records what a clsact attach may leave (the filter, and the qdisc if
/// it adds one) before it makes either: a filter outlives the daemon, and
/// one killed between making it and recording it would leave it (and a
/// qdisc it added) for nobody to remove. The attach stops if this fails.
pub type RecordClsact<'a> = &'a mut dyn FnMut(ClsactRecord) -> anyhow::Result<()>;

pub struct Datapath {
    ebpf: Ebpf,
    /// The attachment: a link pinned in the state directory, also held
    /// open (see `links`), or our filter on clsact ingress (no link: it
    /// stays by itself), with whether a gateway added its qdisc.
    link: Option<HeldLink>,
    clsact: Option<ClsactRecord>,
    /// A resize of the connection state, until the old maps are caught up.
    resized: Option<Pending>,
}

/// A link pinned at `path`, held open twice: pinning takes a handle and
/// drops it should the pin fail, so one is spent pinning it again (the
/// pin removed by hand) while the other keeps it attached.
struct HeldLink {
    path: PathBuf,
    handles: Vec<FdLink>,
}

impl HeldLink {
    /// Holds `link`, pinned at `path`, and a second handle from the pin.
    fn new(path: PathBuf, link: FdLink) -> anyhow::Result<Self> {
        let spare = PinnedLink::from_pin(&path)
            .with_context(|| format!("cannot open the link pinned at {}", path.display()))?;
        Ok(Self {
            path,
            handles: vec![link, spare.into()],
        })
    }
}

impl Datapath {
    /// Loads the data path with `policy`, picking up the connection state
    /// pinned by an earlier run unless told to reset it, and fills the
    /// policy maps. The programs are loaded (verified by the kernel) on
    /// first use, see [`Datapath::xdp`].
    pub fn load(policy: &Policy) -> anyhow::Result<Self> {
        // Settings are checked before; a policy made in code is checked here.
        policy.admission.validate()?;
        pinning::prepare(&policy.state_dir, policy.reset_state)?;
        let resumed = pinning::has_state(&policy.state_dir);
        let fit = state_fit::judge(&policy.state_dir, policy.max_flows)?;
        if let Some((what, fix)) = fit.refusal(&policy.state_dir) {
            anyhow::bail!("{what}; {fix}");
        }
        if resumed {
            upgrade::flow_cache(&policy.state_dir)?;
        }
        // Before the maps: a start killed once it made them leaves them
        // recorded.
        pinning::record_format(&policy.state_dir)?;
        if !fit.missing.is_empty() {
            tracing::warn!(
                dir = %policy.state_dir.display(),
                missing = ?fit.missing,
                "the connection state lacks maps (removed by hand?): made anew, empty"
            );
        }
        let resized = resize::apply(&policy.state_dir, &fit.resize)?;
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

        Ok(Self {
            ebpf,
            link: None,
            clsact: None,
            resized,
        })
    }

    /// Finishes a resize of the connection state once this data path is
    /// attached (see `resize`): copies what the previous one made on the
    /// old maps until this one took its place, then lets them go.
    pub fn finish_resize(&mut self) {
        if let Some(resized) = self.resized.take() {
            resized.finish();
        }
    }

    /// Attaches to `iface` (index `ifindex`) as `mode` asks, pinning the
    /// link in `state_dir`; returns the hook it got. The data path an
    /// earlier daemon left there (see `links`) is taken over: this
    /// program replaces its program atomically. Links pinned there for
    /// another interface or hook (the settings changed) are detached once
    /// this one runs, but an XDP one on `iface` before an XDP attach: an
    /// interface runs one XDP program at a time. A clsact attach calls
    /// `record` first (see [`RecordClsact`]).
    pub fn attach(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: AttachMode,
        state_dir: &Path,
        record: RecordClsact<'_>,
    ) -> anyhow::Result<Attached> {
        let pinned = links::pinned(state_dir)?;
        let programs = pinned
            .iter()
            .map(links::Pinned::program)
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.refuse_another_gateway(iface, ifindex, &programs)?;
        let mut ours = None;
        let (mut first, mut later) = (Vec::new(), Vec::new());
        for p in pinned {
            if ours.is_none() && p.ifindex == ifindex && p.hook.fits(mode) {
                ours = Some(p);
            } else if p.ifindex == ifindex && p.hook.is_xdp() && mode != AttachMode::Tc {
                first.push(p);
            } else {
                later.push(p);
            }
        }
        let moved = |p: &links::Pinned| {
            tracing::info!(
                "the data path was attached to interface {} as {}: this run attaches {mode:?} to {iface}",
                p.ifindex,
                p.hook.as_str()
            );
        };
        for p in first {
            moved(&p);
            p.detach()?;
        }
        // A TC filter a gateway left elsewhere than our place (versions
        // that let the kernel pick it) would run its old program beside
        // (or behind) the new one. Ours stays until the new attach runs:
        // a clsact attach swaps its program in there.
        clsact::remove_leftovers(iface, ifindex, TC_PROGRAM, true)?;
        let taken = match ours {
            Some(p) => match self.take_over(&p) {
                Ok(hook) => Some(hook),
                Err(e) => {
                    tracing::warn!("{e:#}: detaching it, and attaching anew");
                    p.detach()?;
                    None
                }
            },
            None => None,
        };
        let hook = match (taken, mode) {
            (Some(hook), _) => hook,
            (None, AttachMode::Native) => self.attach_xdp(ifindex, XdpMode::Driver, state_dir)?,
            (None, AttachMode::Generic) => self.attach_xdp(ifindex, XdpMode::Skb, state_dir)?,
            (None, AttachMode::Tc) => self.attach_tc(iface, ifindex, state_dir, record)?,
            (None, AttachMode::Auto) => self.attach_auto(iface, ifindex, state_dir, record)?,
        };
        if hook != Attached::Clsact {
            self.clsact = None;
            clsact::remove_leftovers(iface, ifindex, TC_PROGRAM, false)?;
        }
        for p in later {
            moved(&p);
            p.detach()?;
        }
        Ok(hook)
    }

    /// Native XDP where the driver has it, else TC.
    fn attach_auto(
        &mut self,
        iface: &str,
        ifindex: u32,
        state_dir: &Path,
        record: RecordClsact<'_>,
    ) -> anyhow::Result<Attached> {
        // A program the verifier refuses is an error, not a reason for TC.
        self.xdp()?;
        match self.attach_xdp(ifindex, XdpMode::Driver, state_dir) {
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
                self.attach_tc(iface, ifindex, state_dir, record)
            }
        }
    }

    /// Refuses an interface that another gateway's program runs on: another
    /// `egress run` with a state directory of its own (the state lock
    /// keeps out one with ours), or the data path one left when it stopped.
    /// Attached in front of it, or behind, or in its clsact filter's place,
    /// one would take the other's packets, each with its own flows. An XDP
    /// or TCX program is ours if this data path loaded it or a link pinned
    /// in our state directory runs it (`pinned`, an earlier run's); another
    /// is told by its name, which needs `CAP_SYS_ADMIN` (without it, none
    /// is refused here, and an XDP attach fails on the other's). A clsact
    /// filter is a running gateway's while a live process holds its
    /// program.
    fn refuse_another_gateway(
        &mut self,
        iface: &str,
        ifindex: u32,
        pinned: &[u32],
    ) -> anyhow::Result<()> {
        let mut ours = pinned.to_vec();
        for (_, program) in self.ebpf.programs() {
            // One not loaded yet runs nowhere.
            if program.fd().is_ok() {
                ours.push(program.info()?.id());
            }
        }
        let mut others = netif::tcx_programs(ifindex)
            .with_context(|| format!("cannot list the TCX programs on {iface}"))?;
        others.extend(
            netif::xdp_programs(ifindex)
                .with_context(|| format!("cannot list the XDP programs on {iface}"))?,
        );
        others.retain(|id| !ours.contains(id));
        let theirs = |p: &ProgramInfo| {
            others.contains(&p.id())
                && p.name_as_str()
                    .is_some_and(|n| [XDP_PROGRAM, TC_PROGRAM].contains(&n))
        };
        let refusal = |what: String| {
            anyhow::anyhow!(
                "another egress gateway runs on {iface} ({what}): an `egress run` with another \
                 state directory, or the data path one left attached when it stopped; stop it \
                 (systemctl stop egress) and remove it (`egress down` with its settings)"
            )
        };
        // Skipping programs that go while listed.
        if !others.is_empty()
            && let Some(p) = loaded_programs().flatten().find(theirs)
        {
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

    fn attach_xdp(
        &mut self,
        ifindex: u32,
        mode: XdpMode,
        state_dir: &Path,
    ) -> anyhow::Result<Attached> {
        let (hook, name) = match mode {
            XdpMode::Driver => (Attached::NativeXdp, "native"),
            _ => (Attached::GenericXdp, "generic"),
        };
        let xdp = self.xdp()?;
        let id = xdp
            .attach(ifindex, mode)
            .with_context(|| format!("{name} XDP attach failed"))?;
        let link = xdp.take_link(id)?.try_into()?;
        self.pin(link, state_dir, hook, ifindex)?;
        Ok(hook)
    }

    /// Pins the link this data path attached with (see `links`), in the
    /// place of any pinned there before, and holds it. Should that fail,
    /// the link detaches: it would not outlive the daemon.
    fn pin(
        &mut self,
        link: FdLink,
        state_dir: &Path,
        hook: Attached,
        ifindex: u32,
    ) -> anyhow::Result<()> {
        let path = links::pin_path(state_dir, hook, ifindex);
        pinning::unpin(&path)?;
        let link = link
            .pin(&path)
            .with_context(|| format!("cannot pin the link at {}", path.display()))?;
        self.link = Some(HeldLink::new(path, link.into())?);
        Ok(())
    }

    /// Swaps this program into a link pinned by an earlier daemon, and
    /// holds it.
    fn take_over(&mut self, pinned: &links::Pinned) -> anyhow::Result<Attached> {
        let (hook, path) = (pinned.hook, &pinned.path);
        let context = || {
            format!(
                "cannot take over the {} link at {}",
                hook.as_str(),
                path.display()
            )
        };
        // A handle of its own: should this fail, the caller detaches it.
        let link: FdLink = PinnedLink::from_pin(path).with_context(context)?.into();
        let link: FdLink = if hook == Attached::Tcx {
            let tc = self.tc()?;
            let link = SchedClassifierLink::try_from(link).with_context(context)?;
            let id = tc.attach_to_link(link).with_context(context)?;
            tc.take_link(id)?.try_into()?
        } else {
            let xdp = self.xdp()?;
            let link = XdpLink::try_from(link).with_context(context)?;
            let id = xdp.attach_to_link(link).with_context(context)?;
            xdp.take_link(id)?.try_into()?
        };
        self.link = Some(HeldLink::new(path.clone(), link)?);
        tracing::info!(
            "took over the {} link: its program replaced atomically, no packet went to the \
             host's stack",
            hook.as_str()
        );
        Ok(hook)
    }

    /// Through a TCX link where the kernel has TCX (6.6+). Older kernels
    /// get a filter on clsact ingress instead.
    fn attach_tc(
        &mut self,
        iface: &str,
        ifindex: u32,
        state_dir: &Path,
        record: RecordClsact<'_>,
    ) -> anyhow::Result<Attached> {
        let tcx = TcAttach::Tcx {
            attach_type: TcAttachType::Ingress,
            order: LinkOrder::default(),
        };
        let tc = self.tc()?;
        match tc.attach(ifindex, tcx) {
            Ok(id) => {
                let link = tc.take_link(id)?.try_into()?;
                self.pin(link, state_dir, Attached::Tcx, ifindex)?;
                tracing::info!(
                    "attach tc: TCX link on {iface} ingress (the kernel has TCX), pinned in {}",
                    state_dir.display()
                );
                Ok(Attached::Tcx)
            }
            // What a kernel without TCX answers (BPF_LINK_CREATE knows no
            // TCX attach type for a TC program).
            Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                self.attach_tc_clsact(iface, ifindex, record)?;
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
    /// kernels with TCX), which stays after this data path and process.
    /// Our filter found there (an earlier daemon left it) gets this
    /// program in place, with no moment detached. What it may leave is
    /// given to `record` before anything is made.
    pub fn attach_tc_clsact(
        &mut self,
        iface: &str,
        ifindex: u32,
        record: RecordClsact<'_>,
    ) -> anyhow::Result<()> {
        record(ClsactRecord::intent(iface, ifindex)?)?;
        let qdisc = ClsactRecord::ensure(iface, ifindex)?;
        let context = || {
            format!(
                "TC attach on {iface}'s clsact ingress (pref {}, handle {:#x}) failed; \
                 `tc filter show dev {iface} ingress` shows what is there",
                clsact::PRIORITY,
                u32::from(clsact::HANDLE),
            )
        };
        let found = clsact::remove_leftovers(iface, ifindex, TC_PROGRAM, true)?.kept_ours;
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
        // Its link would delete the filter when dropped.
        std::mem::forget(tc.take_link(id)?);
        self.link = None;
        self.clsact = Some(qdisc);
        Ok(())
    }

    /// Our clsact filter's interface, and whether this data path added its
    /// qdisc, if it attached through one.
    pub fn clsact(&self) -> Option<ClsactRecord> {
        self.clsact
    }

    /// The XDP program, loaded on first use: the kernel's verifier takes
    /// most of a second over each program, and a gateway attaches one.
    pub fn xdp(&mut self) -> anyhow::Result<&mut Xdp> {
        self.program(XDP_PROGRAM, "XDP", Xdp::load)
    }

    /// The TC program, loaded on first use (see [`Datapath::xdp`]).
    pub fn tc(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        self.program(TC_PROGRAM, "TC", SchedClassifier::load)
    }

    /// Loads the program `hook` runs, unless it is loaded.
    pub fn load_program_of(&mut self, hook: Attached) -> anyhow::Result<()> {
        match hook.is_xdp() {
            true => self.xdp().map(drop),
            false => self.tc().map(drop),
        }
    }

    /// The program `name` (`kind`, for messages), loaded by `load` unless
    /// it is. What the previous data path made meanwhile in the old maps
    /// of a resize is caught up then: the attach comes next.
    fn program<P>(
        &mut self,
        name: &str,
        kind: &str,
        load: fn(&mut P) -> Result<(), ProgramError>,
    ) -> anyhow::Result<&mut P>
    where
        for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        let program = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("{kind} program missing from the eBPF object"))?;
        if program.fd().is_err() {
            load(program.try_into()?)
                .with_context(|| format!("the kernel verifier rejected the {kind} program"))?;
            if let Some(resized) = &mut self.resized {
                resized.catch_up("before the attach");
            }
        }
        Ok(program.try_into()?)
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
        self.set_routes_generation(|now| now.wrapping_add(1))
    }

    /// Stops the data path remembering FIB answers, for as long as no
    /// daemon hears of route changes: every packet asks the kernel's FIB,
    /// dearer but never stale (a next hop's new MAC address, say). The
    /// next daemon's programs start with answers of their own.
    pub fn routes_unwatched(&mut self) -> anyhow::Result<()> {
        self.set_routes_generation(|_| route::UNWATCHED)
    }

    fn set_routes_generation(&mut self, next: impl FnOnce(u64) -> u64) -> anyhow::Result<()> {
        let mut generation: Array<_, u64> =
            Array::try_from(map(&mut self.ebpf, "ROUTES_GENERATION")?)?;
        let next = next(generation.get(&0, 0)?);
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
    /// or reload picks up the state this data path runs on, and the link
    /// it runs from, so that it stays attached after the daemon; returns
    /// their names.
    pub fn keep_pinned(&mut self, dir: &Path) -> anyhow::Result<Vec<&'static str>> {
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
        if let Some(held) = self.link.as_mut() {
            let path = &held.path;
            let ours = held.handles[0].info()?.id();
            let pinned = PinnedLink::from_pin(path).map(FdLink::from);
            if !pinned.is_ok_and(|p| p.info().is_ok_and(|i| i.id() == ours)) {
                let context = || format!("cannot pin the link at {} again", path.display());
                if held.handles.len() < 2 {
                    anyhow::bail!("{}: no handle to spare", context());
                }
                pinning::unpin(path)?;
                let spare = held.handles.pop().context("no spare handle")?;
                spare.pin(path).with_context(context)?;
                held.handles
                    .push(PinnedLink::from_pin(path).with_context(context)?.into());
                pinned_again.push("its link");
            }
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
    let [flows, mappings, clients] = resize::sizes(max_flows);
    let cpus = cpu_numbers()?;
    Ok([
        flows,
        mappings,
        clients,
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
