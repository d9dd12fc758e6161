//! The daemon's garbage collector on a million flows written into the
//! pinned state maps: SIGTERM during a sweep ends the daemon cleanly, and
//! the sweeps remove exactly the expired flows, their mappings and their
//! client counts, however far a stopped sweep got, and mend counts a
//! killed daemon left too high. And a daemon in a time namespace judges
//! idleness by the data path's clock. Needs root.

#[path = "packets/table.rs"]
mod table;

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Pod,
    maps::{Array, HashMap as BpfHashMap, Map, MapData},
};
use egress_common::flow::Flow;
use egress_user::{batch, clock, datapath::State};
use tests::{
    Attach, Daemon, Topology, addrs::SERVER_IP, echo::udp_server, egress_bin, require_root,
};

const FLOWS: u32 = 1_000_000;
/// Hang guard only: how long the daemon may take to exit, or to sweep.
const PATIENCE: Duration = Duration::from_secs(120);
/// UDP flows idle longer than this expire.
const UDP_TIMEOUT: &str = "--timeout udp=1s";
/// Logs every sweep, including those that remove nothing.
const SWEEP_LOG: &str = "env RUST_LOG=info,egress_user::sweeper=debug";

/// Every even flow is live (stamped an hour ahead, so whatever the
/// test's pace), every odd one idle since boot.
fn last_seen(now: u64) -> impl Fn(u32) -> u64 {
    move |i| match i % 2 {
        0 => now + 3600 * 1_000_000_000,
        _ => 0,
    }
}

#[test]
fn sigterm_during_a_sweep_exits_cleanly_and_sweeps_remove_exactly_the_expired_flows() -> Result<()>
{
    require_root()?;
    let bin = egress_bin()?;
    let topo = Topology::new()?;
    let result = (|| {
        // The table's translation addresses (the topology gives the first),
        // so the sweeps find them all allowed.
        let mut args = UDP_TIMEOUT.to_string();
        for addr in &table::nat_addrs(FLOWS)[1..] {
            args += &format!(" --snat {addr}");
        }
        // A first run makes the pinned maps.
        let start = |launcher: &str| topo.start_gateway_under(launcher, &bin, Attach::Tc, &args);
        start("")?.stop();
        let dir = topo.lab.state_dir()?;
        let mut state = pinned(&dir)?;
        table::fill(&mut state, 0..FLOWS, last_seen(clock::monotonic_ns()));
        counted_too_high(&mut state.clients)?;

        // SIGTERM as it reports ready, while its first sweep (seconds long)
        // runs.
        let mut gw = start("")?;
        exits_cleanly(&mut gw)?;
        ensure!(
            gw.log().contains("stopped a sweep part way"),
            "the sweep was not under way at SIGTERM:\n{}",
            gw.log()
        );

        let mut gw = start(SWEEP_LOG)?;
        gw.wait_for("swept", PATIENCE)?;
        exits_cleanly(&mut gw)?;
        only_live_flows_left(&pinned(&dir)?)
    })();
    topo.lab.keep_logs_on_err(result)
}

/// A daemon whose clock runs a day ahead (in a time namespace; BPF's clock
/// never does) would find every flow a day idle. Its sweeps keep a flow
/// just used, and the flow goes on translating.
#[test]
fn a_gateway_in_a_time_namespace_keeps_its_live_flows() -> Result<()> {
    require_root()?;
    let bin = egress_bin()?;
    let topo = Topology::new()?;
    let result = (|| {
        let _peer = topo.start_ipip_peer(Path::new(env!("CARGO_BIN_EXE_ipip-peer")))?;
        // unshare makes the namespace for its children; nsenter moves
        // itself in and execs: the gateway is the process signals reach.
        let launcher = format!(
            "unshare --time --monotonic 86400 nsenter --time=/proc/self/ns/time_for_children \
             {SWEEP_LOG}"
        );
        let mut gw = topo.start_gateway_under(&launcher, &bin, Attach::Native, "")?;
        let server = SocketAddr::from((SERVER_IP, 5353));
        let _udp = udp_server(&topo.server, server)?;
        topo.udp_translated(server)?;
        let sweeps = gw.log().matches("swept").count();
        gw.wait_for_times("swept", sweeps + 1, PATIENCE)?;
        let flows = batch::dump(&pinned(&topo.lab.state_dir()?)?.flows)?.len();
        ensure!(
            flows == 2 && !gw.log().contains("swept idle flows"),
            "{flows} flow halves left after a sweep; the log:\n{}",
            gw.log()
        );
        topo.udp_translated(server)?;
        exits_cleanly(&mut gw)
    })();
    topo.lab.keep_logs_on_err(result)
}

/// Counts as a daemon killed during a sweep leaves them: some clients'
/// flows removed yet still counted, one client counted with none left.
fn counted_too_high(clients: &mut BpfHashMap<MapData, [u8; 4], u64>) -> Result<()> {
    for (client, n) in batch::dump(clients)?.into_iter().take(3) {
        clients.insert(&client, &(n + 7), 0)?;
    }
    clients.insert(&[10, 99, 99, 99], &5, 0)?;
    Ok(())
}

fn exits_cleanly(gw: &mut Daemon) -> Result<()> {
    let status = gw.terminate(PATIENCE)?;
    ensure!(
        status.success(),
        "the gateway exited {status} after SIGTERM; its log:\n{}",
        gw.log()
    );
    ensure!(
        gw.log().contains("stopped: the data path stays attached"),
        "no clean shutdown:\n{}",
        gw.log()
    );
    Ok(())
}

/// Whether `map` holds the keys `want` and no others.
fn exactly<K: Pod + Eq + Hash, V: Pod>(
    name: &str,
    map: &BpfHashMap<MapData, K, V>,
    want: HashSet<K>,
) -> Result<()> {
    let keys: HashSet<K> = batch::dump(map)?.into_iter().map(|(k, _)| k).collect();
    ensure!(
        keys == want,
        "{name}: {} entries, {} of them wanted, {} wanted",
        keys.len(),
        keys.intersection(&want).count(),
        want.len()
    );
    Ok(())
}

/// The state maps the gateway pinned in `dir`.
fn pinned(dir: &Path) -> Result<State> {
    let open = |name: &str| -> Result<Map> {
        let data = MapData::from_pin(dir.join(name)).with_context(|| format!("open {name}"))?;
        Ok(Map::from_map_data(data)?)
    };
    Ok(State {
        flows: BpfHashMap::try_from(open("FLOWS")?)?,
        mappings: BpfHashMap::try_from(open("MAPPINGS")?)?,
        clients: BpfHashMap::try_from(open("CLIENT_FLOWS")?)?,
        cache: Array::try_from(open("FLOW_CACHE")?)?,
    })
}

fn only_live_flows_left(state: &State) -> Result<()> {
    let live: Vec<Flow> = (0..FLOWS).step_by(2).map(|i| table::flow(i, 0)).collect();
    let halves = live.iter().flat_map(|f| [f.out_key(), f.in_key()]);
    exactly("FLOWS", &state.flows, halves.collect())?;
    let mappings = live.iter().flat_map(|f| table::mapping(f).map(|(k, _)| k));
    exactly("MAPPINGS", &state.mappings, mappings.collect())?;

    let mut want: HashMap<[u8; 4], u64> = HashMap::new();
    for f in &live {
        *want.entry(f.client_addr).or_default() += 1;
    }
    let counts: HashMap<[u8; 4], u64> = batch::dump(&state.clients)?.into_iter().collect();
    ensure!(counts == want, "client counts {counts:?}, want {want:?}");
    Ok(())
}
