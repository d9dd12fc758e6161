//! Connection state pinned by an earlier version, brought to this
//! version's format before the data path loads, so that an upgrade keeps
//! every flow and its counts.

use std::{fs, path::Path};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, MapType, PerCpuArray};
use egress_common::{
    flow::{Flow, FlowKey},
    flow_cache::CachedFlow,
};

use crate::batch;

/// `BPF_EXIST`: update only an entry that is there.
const BPF_EXIST: u64 = 2;

/// A flow cache pinned as a per-CPU array (the versions from the flow
/// cache's introduction, 4621da5, up to e1cadbb; now one array, a block per
/// CPU): the packets its slots counted go to their flows' entries in
/// `FLOWS`, and its pin goes, so that the data path makes its cache anew. The daemon that pinned it has exited (it held the
/// state's lock), so no program counts in it any more.
///
/// The pin goes before the counts move: should this fail or the daemon die
/// part way, the next start finds no old cache and the counts not yet moved
/// are lost, rather than the ones moved counted twice.
pub fn flow_cache(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("FLOW_CACHE");
    if !path.exists() {
        return Ok(());
    }
    let context = || format!("cannot bring {} to this version", path.display());
    let data = MapData::from_pin(&path).with_context(context)?;
    let map_type = data.info().and_then(|i| i.map_type());
    if !upgrades("FLOW_CACHE", map_type.with_context(context)?) {
        return Ok(());
    }
    let old: PerCpuArray<_, CachedFlow> =
        PerCpuArray::try_from(Map::from_map_data(data)?).with_context(context)?;
    let flows = MapData::from_pin(dir.join("FLOWS")).with_context(context)?;
    let mut flows: HashMap<_, FlowKey, Flow> = HashMap::try_from(Map::from_map_data(flows)?)?;
    let slots = batch::per_cpu_values(&old).with_context(context)?;
    fs::remove_file(&path).with_context(context)?;
    let mut credited = 0u64;
    for slot in slots.iter().filter(|s| s.packets > 0) {
        // A flow the table no longer has has no counts to keep.
        let Ok(mut flow) = flows.get(&slot.key, 0) else {
            continue;
        };
        let before = flow.packets;
        slot.credit(&slot.key, &mut flow);
        if flow.packets != before {
            flows
                .insert(&slot.key, &flow, BPF_EXIST)
                .with_context(context)?;
            credited += flow.packets - before;
        }
    }
    tracing::info!(
        packets = credited,
        "moved the counts of an earlier version's flow cache to the flow table"
    );
    Ok(())
}

/// Whether the map pinned as `name`, of type `map_type`, is an earlier
/// version's that a start brings to this version's format.
pub fn upgrades(name: &str, map_type: MapType) -> bool {
    name == "FLOW_CACHE" && map_type == MapType::PerCpuArray
}
