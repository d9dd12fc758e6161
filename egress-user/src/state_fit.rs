//! Whether the connection state pinned in a state directory fits the data
//! path this binary loads with given settings. The loader refuses a pinned
//! map of another size or layout (another version's); a start resizes the
//! maps sized from `max-flows` when their size is all that differs (see
//! `resize`), unless they hold more than the new size does. Judged here
//! without loading anything, `egress check` and a reload find out first,
//! so a reload never hands a running gateway over to an image that cannot
//! start.

use std::{cmp::Ordering, io, path::Path};

use anyhow::Context as _;
use aya::maps::{MapData, MapError, MapType};
use aya_obj::{
    Object,
    generated::{BPF_F_RDONLY, BPF_F_WRONLY},
    maps::PinningType,
};
use egress_common::state_format::{STATE_FORMAT, UNRECORDED_FORMAT};

use crate::{datapath, pinning, resize, upgrade};

/// What a state directory holds, judged against this binary's data path.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fit {
    /// The maps the loader would refuse, a line each, as aya words it
    /// (`FLOWS: max_entries is 4096, expected 131072`).
    pub unfit: Vec<String>,
    /// The `max-flows` the pinned flow table was made with, when sizes are
    /// all that differs yet a start cannot resize (a map not sized from
    /// `max-flows` has another size too).
    pub made_with: Option<u32>,
    /// Connection-state maps missing beside others that are there (removed
    /// by hand): a start makes them anew, empty.
    pub missing: Vec<&'static str>,
    /// What a start does with the maps sized from `max-flows` (when
    /// nothing else differs).
    pub resize: resize::Plan,
    /// The format of the state in the directory, if there is state.
    pub format: Option<u32>,
}

impl Fit {
    /// Why the data path could not load on this state, and what to do
    /// about it, if it could not.
    pub fn refusal(&self, dir: &Path) -> Option<(String, String)> {
        if let Some(refusal) = self.format.and_then(|format| other_format(dir, format)) {
            return Some(refusal);
        }
        if self.unfit.is_empty() {
            return self.resize.refusal(dir);
        }
        let (what, fix) = unfit(dir, self.made_with);
        Some((format!("{what}: {}", self.unfit.join("; ")), fix))
    }
}

/// Judges the state pinned in `dir` for a data path with `max_flows`.
pub fn judge(dir: &Path, max_flows: u32) -> anyhow::Result<Fit> {
    let object = Object::parse(datapath::OBJECT).context("cannot read the eBPF object")?;
    let sizes = datapath::map_sizes(max_flows)?;
    let mut fit = Fit::default();
    let recorded = pinning::recorded_format(dir)?;
    let mut present = false;
    // Whether only sizes differ, and the pinned flow table's size (twice
    // the `max-flows` it was made with).
    let (mut sizes_only, mut flows) = (true, None);
    // The maps sized from `max-flows` whose size alone differs, and
    // whether nothing else does: then a start resizes them.
    let (mut resizable, mut only_resizable) = (Vec::new(), true);
    let mut unfit = Vec::new();
    let mut pinned_maps: Vec<_> = object
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == PinningType::ByName)
        .collect();
    // In the order the connection state is told of.
    pinned_maps.sort_by_key(|&(name, _)| {
        pinning::PINNED_MAPS
            .iter()
            .position(|n| n == name)
            .unwrap_or(usize::MAX)
    });
    for (name, map) in pinned_maps {
        let path = dir.join(name);
        let pinned = match MapData::from_pin(&path) {
            Ok(pinned) => pinned,
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        present = true;
        let info = pinned
            .info()
            .with_context(|| format!("cannot read {}", path.display()))?;
        let map_type = info.map_type()?;
        if upgrade::upgrades(name, map_type) {
            continue;
        }
        let sized = sizes.iter().find(|(n, _)| n == name);
        let entries = sized.map_or(map.max_entries(), |&(_, n)| n);
        if name == "FLOWS" {
            flows = Some(info.max_entries());
        }
        // As the loader gives them to the kernel, and as it compares them.
        let value_size = match map_type {
            MapType::RingBuf => 0,
            _ => map.value_size(),
        };
        let access = BPF_F_RDONLY | BPF_F_WRONLY;
        let mut differs = Vec::new();
        for (property, expected, actual) in [
            ("map_type", map.map_type(), map_type as u32),
            ("key_size", map.key_size(), info.key_size()),
            ("value_size", value_size, info.value_size()),
            ("max_entries", entries, info.max_entries()),
            (
                "map_flags",
                map.map_flags() & !access,
                info.map_flags() & !access,
            ),
        ] {
            if expected != actual {
                sizes_only &= property == "max_entries";
                differs.push(property);
                unfit.push(format!(
                    "{name}: {property} is {actual}, expected {expected}"
                ));
            }
        }
        match (&differs[..], resize::sized(name)) {
            ([], _) => {}
            (["max_entries"], Some((name, _))) => {
                resizable.push((name, info.max_entries(), pinned));
            }
            _ => only_resizable = false,
        }
    }
    if only_resizable {
        let mut counted = Vec::new();
        for (name, max_entries, data) in resizable {
            counted.push(resize::Pinned {
                name,
                max_entries,
                entries: resize::count(name, data)?,
            });
        }
        fit.resize = resize::plan(&counted, max_flows);
    } else {
        fit.unfit = unfit;
        if sizes_only {
            fit.made_with = flows.map(|entries| entries / 2).filter(|&n| n != max_flows);
        }
    }
    fit.format = recorded.or(present.then_some(UNRECORDED_FORMAT));
    if present {
        fit.missing = pinning::ALWAYS_PINNED
            .into_iter()
            .filter(|name| !dir.join(name).exists())
            .collect();
    }
    Ok(fit)
}

/// Why this version cannot read state of `format`, and what to do, if
/// it cannot.
fn other_format(dir: &Path, format: u32) -> Option<(String, String)> {
    let by = match format.cmp(&STATE_FORMAT) {
        Ordering::Equal => return None,
        Ordering::Greater => "a newer version of egress",
        Ordering::Less => "an older version of egress, whose state this one cannot bring over",
    };
    Some((
        format!(
            "the connection state in {} is in format {format}, written by {by} (this one \
             reads format {STATE_FORMAT})",
            dir.display()
        ),
        "run the version that wrote it, or start over with --reset-state (live connections \
         through the gateway will break)"
            .to_owned(),
    ))
}

/// What it means that the state in `dir` does not fit (made with
/// `max-flows` `made_with`, if that is all), and what to do.
pub fn unfit(dir: &Path, made_with: Option<u32>) -> (String, String) {
    let dir = dir.display();
    let reset =
        "or start over with --reset-state (live connections through the gateway will break)";
    match made_with {
        Some(n) => (
            format!("the connection state in {dir} was made with max-flows {n}"),
            format!("run with max-flows {n}, {reset}"),
        ),
        None => (
            format!(
                "the connection state in {dir} was made with other settings (--max-flows) or \
                 by a version with another state format"
            ),
            format!("run with those settings, {reset}"),
        ),
    }
}
