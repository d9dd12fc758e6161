//! The gateway's XDP or TC program loaded by the real loader and run with
//! BPF_PROG_TEST_RUN inside a namespace that gives `bpf_fib_lookup` a route
//! and a resolved neighbour.

use std::{
    collections::HashMap,
    os::fd::{AsFd, BorrowedFd},
    sync::RwLock,
};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, TestRunResult, Xdp};
use egress_common::{
    flow::{DIR_OUT, Flow, FlowKey, Mapping, PortKey},
    fragment::HeldFragment,
    reason::Reason,
};
use egress_user::{
    admission::Admission,
    datapath::{Datapath, Policy, State},
    gc,
    settings::PortRange,
};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};
use tests::tiny_bpf::xdp_md;
use tests::{Lab, ifindex, in_netns, ip_batch, sysctl};

pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const GW: [u8; 4] = [10, 1, 1, 10];
pub const ROUTER: [u8; 4] = [10, 1, 1, 1];
pub const PEER: [u8; 4] = [10, 0, 1, 10];
/// A second peer, allowed by the tests that add it.
pub const PEER2: [u8; 4] = [10, 0, 1, 11];
pub const CLIENT: [u8; 4] = [192, 168, 250, 2];
pub const CLIENT2: [u8; 4] = [10, 0, 2, 2];
pub const SERVER: [u8; 4] = [203, 0, 113, 10];
/// Reached via a next hop that has no neighbour entry.
pub const UNRESOLVED: [u8; 4] = [198, 51, 100, 7];
/// Reached by a route whose MTU is [`SMALL_MTU`].
pub const BEHIND_SMALL_MTU: [u8; 4] = [203, 0, 113, 99];
pub const SMALL_MTU: u16 = 1400;
/// Routed out of a second interface, eth1, via a resolved next hop.
pub const BEYOND_ETH1: [u8; 4] = [198, 18, 0, 5];
pub const ETH1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];
pub const ETH1_NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The MSS clamp: the default for the lab's 1500-byte links.
pub const MSS: u16 = 1440;
pub const PORTS: PortRange = PortRange {
    min: 20000,
    max: 29999,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
/// `TC_ACT_UNSPEC` (-1), "next program".
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// The program under test.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    /// A data path loaded with `policy` and the program of this hook, the
    /// one a gateway under test loads: each case runs once per hook, so
    /// every policy still meets the verifier with both.
    fn load(self, policy: &Policy) -> Datapath {
        let mut datapath = Datapath::load(policy).unwrap();
        let loaded = match self {
            Hook::Xdp => datapath.xdp().map(drop),
            Hook::Tc => datapath.tc().map(drop),
        };
        loaded.unwrap();
        datapath
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    Drop,
    Pass,
    Tx,
    Redirect,
}

pub struct Gateway {
    hook: Hook,
    datapath: Datapath,
    policy: Policy,
    ns: String,
    ifindex: u32,
    _lab: Lab,
}

impl Gateway {
    pub fn new(hook: Hook) -> Self {
        Self::with(hook, |_| {})
    }

    /// A gateway whose policy `adjust` has changed from the tests' default.
    pub fn with(hook: Hook, adjust: impl FnOnce(&mut Policy)) -> Self {
        tests::require_root().unwrap();
        let mut lab = Lab::new().unwrap();
        let ns = lab.add_ns("pkt").unwrap();
        let setup = [
            "link add eth0 type veth peer name p0".to_owned(),
            format!("link set eth0 address {}", mac(GW_MAC)),
            "link set eth0 up".into(),
            "link set p0 up".into(),
            format!("addr add {}/24 dev eth0", ip(GW)),
            format!("route add default via {}", ip(ROUTER)),
            format!("route add {}/32 via 10.1.1.2", ip(UNRESOLVED)),
            format!(
                "route add {}/32 via {} mtu lock {SMALL_MTU}",
                ip(BEHIND_SMALL_MTU),
                ip(ROUTER)
            ),
            "link add eth1 type veth peer name p1".into(),
            format!("link set eth1 address {}", mac(ETH1_MAC)),
            "link set eth1 up".into(),
            "link set p1 up".into(),
            "addr add 192.0.2.1/24 dev eth1".into(),
            format!(
                "neigh replace 192.0.2.2 lladdr {} dev eth1 nud permanent",
                mac(ETH1_NEXT_HOP_MAC)
            ),
            format!("route add {}/32 via 192.0.2.2", ip(BEYOND_ETH1)),
            format!(
                "neigh replace {} lladdr {} dev eth0 nud permanent",
                ip(ROUTER),
                mac(ROUTER_MAC)
            ),
        ];
        ip_batch(&ns, &setup).unwrap();
        // bpf_fib_lookup routes only for interfaces with forwarding on.
        sysctl(&ns, "net/ipv4/conf/eth0/forwarding", "1").unwrap();
        let ifindex = ifindex(&ns, "eth0").unwrap();
        let state_dir = lab.state_dir().unwrap();
        let mut policy = Policy {
            tunnel_local: GW.into(),
            snat: vec![GW.into()],
            ports: PORTS,
            admission: Admission {
                peers: vec![PEER.into()],
                client_cidrs: vec![
                    "192.168.250.0/30".parse().unwrap(),
                    "10.0.0.0/16".parse().unwrap(),
                ],
                peer_clients: Default::default(),
            },
            max_flows: 1024,
            max_client_flows: 0,
            mss: MSS,
            state_dir,
            reset_state: false,
        };
        adjust(&mut policy);
        let datapath = hook.load(&policy);
        Self {
            hook,
            datapath,
            policy,
            ns,
            ifindex,
            _lab: lab,
        }
    }

    /// Unloads the data path and loads it again, as a restarted daemon
    /// does: keeping the pinned state, or starting clean with `reset`.
    pub fn restart(&mut self, reset: bool) {
        self.policy.reset_state = reset;
        // The old instance is dropped only once the new one is loaded, like
        // an upgrade that starts the new daemon before the old one exits.
        self.datapath = self.hook.load(&self.policy);
    }

    /// Loads the data path again under the policy as `adjust` changes it,
    /// keeping the state: a daemon restarted with new settings.
    pub fn reconfigure(&mut self, adjust: impl FnOnce(&mut Policy)) {
        adjust(&mut self.policy);
        self.restart(false);
    }

    /// Loads another data path under the policy as `adjust` changes it,
    /// leaving this gateway's as it is.
    pub fn try_load(&self, adjust: impl FnOnce(&mut Policy)) -> anyhow::Result<Datapath> {
        let mut policy = self.policy.clone();
        adjust(&mut policy);
        Datapath::load(&policy)
    }

    /// Runs the program once on `frame`, as received on eth0. Returns the
    /// verdict, the frame as the program left it, and the one reason counter
    /// that moved.
    pub fn run(&mut self, frame: &[u8]) -> (Verdict, Vec<u8>, Reason) {
        let run = self.try_run(frame);
        let verdict = run
            .verdict
            .unwrap_or_else(|| panic!("unexpected {:?} verdict {}", self.hook, run.ret));
        assert_eq!(
            run.moved.len(),
            1,
            "exactly one reason counter per packet, got {:?}",
            run.moved
        );
        (verdict, run.out, run.moved[0])
    }

    /// Runs the program once on `frame`, as [`Gateway::run`] does, without
    /// judging the result.
    pub fn try_run(&mut self, frame: &[u8]) -> Run {
        let before = self.stats();
        // On one CPU, as a flow's packets arrive under RSS: another CPU's
        // flow cache may serve a packet from a copy up to a tick old, which
        // a test of what the table records would meet at random.
        let (result, mut out) = self.with_runs(|run| {
            pin_to(0);
            let mut out = vec![0u8; frame.len() + 256];
            (run(frame, &mut out), out)
        });
        out.truncate(result.data_size_out as usize);
        let verdict = match (self.hook, result.return_value) {
            (Hook::Xdp, XDP_DROP) | (Hook::Tc, TC_ACT_SHOT) => Some(Verdict::Drop),
            (Hook::Xdp, XDP_PASS) | (Hook::Tc, TC_ACT_UNSPEC) => Some(Verdict::Pass),
            (Hook::Xdp, XDP_TX) => Some(Verdict::Tx),
            (Hook::Xdp, XDP_REDIRECT) => Some(Verdict::Redirect),
            // TC sends out of any interface with bpf_redirect, and a test
            // run does not say which: the source MAC the FIB chose does.
            (Hook::Tc, TC_ACT_REDIRECT) if out.get(6..12) == Some(&GW_MAC[..]) => Some(Verdict::Tx),
            (Hook::Tc, TC_ACT_REDIRECT) => Some(Verdict::Redirect),
            _ => None,
        };
        let after = self.stats();
        // Each increment once: a counter that moved by two shows twice.
        let moved = Reason::ALL
            .into_iter()
            .flat_map(|r| std::iter::repeat_n(r, after[&r].saturating_sub(before[&r]) as usize))
            .collect();
        Run {
            verdict,
            ret: result.return_value,
            out,
            moved,
        }
    }

    /// Runs the program `n` times on `frame` from a thread inside the
    /// namespace. Every run starts from a fresh copy of `frame` (the program
    /// rewrites packets in place, so the kernel's own repeat would not redo
    /// the work); `out` receives the frame as the last run left it.
    #[allow(dead_code, reason = "the benchmark's state runs")]
    pub fn test_run(&mut self, frame: &[u8], n: usize, out: &mut [u8]) -> Vec<TestRunResult> {
        self.with_runs(|run| (0..n).map(|_| run(frame, &mut *out)).collect())
    }

    /// Calls `f` from a thread inside the namespace, handing it a function
    /// that runs the program once on a fresh copy of a frame, as `test_run`
    /// does: for callers that mix the program's runs with other work.
    pub fn with_runs<T: Send>(
        &mut self,
        f: impl FnOnce(&mut dyn FnMut(&[u8], &mut [u8]) -> TestRunResult) -> T + Send,
    ) -> T {
        let (ifindex, ns) = (self.ifindex, self.ns.clone());
        let prog = self.program();
        in_netns(&ns, || f(&mut |frame, out| prog.run(frame, ifindex, out))).unwrap()
    }

    /// Calls `f` from a thread inside the namespace with the program and
    /// the index of eth0, which frames arrive on: for harnesses that reach
    /// the program from programs of their own (tail calls).
    #[allow(dead_code, reason = "the benchmark's warm runs")]
    pub fn with_program<T: Send>(&mut self, f: impl FnOnce(BorrowedFd, u32) -> T + Send) -> T {
        let (ifindex, ns) = (self.ifindex, self.ns.clone());
        let fd = match self.program() {
            Program::Xdp(p) => p.fd(),
            Program::Tc(p) => p.fd(),
        };
        let fd = fd.expect("a loaded program").as_fd();
        in_netns(&ns, || f(fd, ifindex)).unwrap()
    }

    /// The frames the program leaves of `frames`, run in order on CPU
    /// `cpu` (so they meet the same per-CPU flow cache).
    pub fn outputs_on_cpu(&mut self, cpu: usize, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        self.with_runs(|run| outputs_pinned(cpu, frames, run))
    }

    /// Runs the program once on each of `frames`, in order, all on CPU
    /// `cpu` (so they meet the same per-CPU flow cache), and returns how
    /// many packets it counted for each reason.
    pub fn on_cpu(&mut self, cpu: usize, frames: &[Vec<u8>]) -> HashMap<Reason, u64> {
        let before = self.stats();
        self.outputs_on_cpu(cpu, frames);
        let after = self.stats();
        Reason::ALL
            .into_iter()
            .filter(|r| after[r] > before[r])
            .map(|r| (r, after[&r] - before[&r]))
            .collect()
    }

    /// Runs the frames, in order, on two threads at once, one on CPU 0 and
    /// one on CPU 1: first packets of the same flows race each other on the
    /// two CPUs. Returns the frames each thread's runs left.
    pub fn race(&mut self, frames: &[Vec<u8>]) -> [Vec<Vec<u8>>; 2] {
        let ifindex = self.ifindex;
        let ns = self.ns.clone();
        let prog = &self.program();
        let run_all = |cpu| {
            in_netns(&ns, || {
                outputs_pinned(cpu, frames, |frame, out| prog.run(frame, ifindex, out))
            })
            .unwrap()
        };
        std::thread::scope(|s| {
            let other = s.spawn(|| run_all(1));
            [run_all(0), other.join().unwrap()]
        })
    }

    fn program(&mut self) -> Program<'_> {
        match self.hook {
            Hook::Xdp => Program::Xdp(self.datapath.xdp().unwrap()),
            Hook::Tc => Program::Tc(self.datapath.tc().unwrap()),
        }
    }

    /// Packets per reason so far.
    pub fn stats(&self) -> HashMap<Reason, u64> {
        self.datapath.stats().unwrap().into_iter().collect()
    }

    /// One garbage-collection sweep as the daemon runs it, at time `now_ns`.
    pub fn sweep(&mut self, now_ns: u64) -> gc::Sweep {
        let stop = gc::Stop::default();
        let allowed = self.allowed();
        gc::sweep(
            &mut self.state(),
            &gc::Timeouts::default(),
            &allowed,
            now_ns,
            &stop,
        )
        .unwrap()
    }

    /// What the gateway's policy allows, for a sweep.
    pub fn allowed(&self) -> RwLock<gc::Allowed> {
        RwLock::new(gc::Allowed::of(&self.policy))
    }

    /// The connection-state maps.
    pub fn state(&self) -> State {
        self.datapath.state().unwrap()
    }

    /// Where the connection state is pinned.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.policy.state_dir
    }

    /// Number of map entries in the flow table (two per flow).
    pub fn flow_entries(&mut self) -> usize {
        self.state().flows.keys().count()
    }

    /// Every flow half, by key, with every packet counted.
    pub fn flows(&mut self) -> HashMap<FlowKey, Flow> {
        self.state().counted_flows().unwrap().into_iter().collect()
    }

    /// The outbound halves only: one per flow.
    pub fn outbound_flows(&mut self) -> Vec<Flow> {
        let mut flows: Vec<Flow> = self
            .flows()
            .into_iter()
            .filter(|(k, _)| k.dir == DIR_OUT)
            .map(|(_, f)| f)
            .collect();
        flows.sort_by_key(|f| f.created_ns);
        flows
    }

    /// Every mapping entry, by key.
    pub fn mappings(&mut self) -> HashMap<PortKey, Mapping> {
        self.state().mappings.iter().map(Result::unwrap).collect()
    }

    /// Number of fragment entries (first fragments remembered).
    pub fn fragment_entries(&mut self) -> usize {
        self.datapath.fragments().unwrap().keys().count()
    }

    /// Makes every fragment entry `ns` older, as if its first fragment had
    /// passed that much earlier.
    pub fn age_fragments(&mut self, ns: u64) {
        let mut map = self.datapath.fragments().unwrap();
        let entries: Vec<_> = map.iter().map(Result::unwrap).collect();
        for (key, mut entry) in entries {
            entry.first_ns = entry.first_ns.saturating_sub(ns);
            map.insert(&key, &entry, 0).unwrap();
        }
    }

    /// The copies of returning later fragments the data path handed the
    /// daemon since the last call: the tunnel address and the IP packet.
    pub fn held_fragments(&mut self) -> Vec<([u8; 4], Vec<u8>)> {
        let mut ring = self.datapath.reorder_maps().unwrap().ring;
        let mut held = Vec::new();
        while let Some(record) = ring.next() {
            let (tunnel_local, packet) = HeldFragment::read(&record).unwrap();
            held.push((tunnel_local, packet.to_vec()));
        }
        held
    }

    /// The per-client flow count the data path enforces its cap with.
    pub fn client_flows(&mut self, client: [u8; 4]) -> u64 {
        self.state().clients.get(&client, 0).unwrap_or(0)
    }
}

/// The frames `run` leaves of `frames`, run in order from this thread,
/// pinned to CPU `cpu`.
fn outputs_pinned(
    cpu: usize,
    frames: &[Vec<u8>],
    mut run: impl FnMut(&[u8], &mut [u8]) -> TestRunResult,
) -> Vec<Vec<u8>> {
    pin_to(cpu);
    frames
        .iter()
        .map(|frame| {
            let mut out = vec![0u8; 2048];
            let r = run(frame, &mut out);
            out.truncate(r.data_size_out as usize);
            out
        })
        .collect()
}

/// Keeps the calling thread on CPU `cpu`.
fn pin_to(cpu: usize) {
    let mut one = CpuSet::new();
    one.set(cpu).unwrap();
    sched_setaffinity(Pid::from_raw(0), &one).unwrap();
}

/// One run of the program, unjudged.
pub struct Run {
    /// What the return value means, if it is one the hook may return.
    pub verdict: Option<Verdict>,
    pub ret: u32,
    /// The frame as the program left it.
    pub out: Vec<u8>,
    /// The reason counters that moved, once per increment.
    pub moved: Vec<Reason>,
}

/// The loaded program under test.
enum Program<'a> {
    Xdp(&'a Xdp),
    Tc(&'a SchedClassifier),
}

impl Program<'_> {
    /// One BPF_PROG_TEST_RUN on `frame`, arriving on `ifindex`.
    fn run(&self, frame: &[u8], ifindex: u32, out: &mut [u8]) -> TestRunResult {
        let ctx = match self {
            Program::Xdp(_) => xdp_md(frame, ifindex),
            // struct __sk_buff up to ifindex: zeroes (which the kernel
            // requires) up to ingress_ifindex, then ifindex, the device the
            // skb arrives on.
            Program::Tc(_) => [[0; 9].as_slice(), &[ifindex; 2]]
                .concat()
                .iter()
                .flat_map(|v: &u32| v.to_ne_bytes())
                .collect(),
        };
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        match self {
            Program::Xdp(p) => p.test_run(opts),
            Program::Tc(p) => p.test_run(opts),
        }
        .expect("BPF_PROG_TEST_RUN")
    }
}

fn ip(a: [u8; 4]) -> std::net::Ipv4Addr {
    a.into()
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
