//! Upgrades across a map-layout change: what a new build does with the maps an older build
//! pinned, before it loads its object over them.
//!
//! aya reuses a pinned map by name without comparing its definition, and the verifier only
//! bounds accesses by the pinned map's sizes: a pinned map whose value is larger than this
//! build's would be *misread* silently. So every start checks the pins first:
//!
//! - A pin with one of this build's names ([`map_names::ALL`]) but another type, key size, value
//!   size, flags, or (for maps whose capacity no flag sets) capacity than this build's object
//!   defines: a build that changed a layout without bumping the name, or a hand-made pin. The
//!   agent refuses to start ([`UpgradeError::Incompatible`]) and says what to do; nothing is
//!   loaded, created or removed.
//! - A pin of a known predecessor ([`PREDECESSORS`]), the name an older build used before a
//!   layout change bumped it:
//!   - [`Rule::Migrate`]: a new map is created under a temporary pin (`NAME-migrating`: bpffs
//!     refuses names with a dot), the entries are copied converted, and the temporary pin is
//!     renamed to the new name (rename is atomic on bpffs, so a new name always holds a whole
//!     copy; an interrupted copy leaves only the temporary pin, removed and redone at the next
//!     start). The object is then loaded over
//!     it like over any pin. Ids (backend ids, rev-NAT ids, Maglev table indexes) are copied
//!     unchanged, so the read-back gives the same `Applied` and the conntrack and affinity
//!     entries (whose maps keep their names) keep naming the same frontends and backends.
//!   - [`Rule::Retire`]: state this build cannot convert (it says why); not copied.
//!
//!   The old pin stays until no loaded program references the old map any more, i.e. the new
//!   programs replaced the old ones in every pinned link (`bpf_link_update`, done by the
//!   agent's attach on its first tick; [`Upgrade::finish`] looks on every tick). Until then the
//!   old programs keep their map, and an agent that dies mid-way finds the old pin next time.
//!   When both the old and the new pin exist, an earlier start already copied: the new map is
//!   the newer state (that agent may have written it since), only the retirement is left.
//! - Other `XLB_*` pins (neither ours nor a known predecessor): left alone, with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::Ebpf;
use lb_common::{map_names, ServiceKey, ServiceValue};
use thiserror::Error;

use super::{LoadOptions, PinLayout};

/// Suffix of the temporary pin a migration copies into.
const MIGRATING: &str = "-migrating";

/// Linux `BPF_MAP_TYPE_HASH`.
const BPF_MAP_TYPE_HASH: u32 = 1;

#[derive(Debug, Error)]
pub enum UpgradeError {
    #[error(
        "the pinned map {path} has another layout than this build's {name} (pinned: {pinned}; this build: \
         {wanted}). It was pinned by a build of xlb with another layout under the same name (or made by hand); \
         this build refuses to read it. Either run the build that pinned it, or remove the pinned state with \
         `xlb cleanup --pin-path {pin_root}` and start again: that detaches the programs and drops the \
         conntrack and affinity state, so connections through Services break until the agent is back"
    )]
    Incompatible {
        name: String,
        path: PathBuf,
        pin_root: PathBuf,
        pinned: MapDef,
        wanted: MapDef,
    },
    #[error(
        "the pinned map {path} has the name of an older xlb map this build migrates ({name} -> {to}), but not \
         its layout (pinned: {pinned}; expected: {expected}); it is left alone and nothing is loaded. Run the \
         build that pinned it, or `xlb cleanup --pin-path {pin_root}` (drops the conntrack state)"
    )]
    UnknownPredecessor {
        name: &'static str,
        to: &'static str,
        path: PathBuf,
        pin_root: PathBuf,
        pinned: MapDef,
        expected: MapDef,
    },
    #[error("reading the eBPF object's map definitions: {0}")]
    Object(String),
    #[error("reading the pinned map {path}: {source}")]
    Pin { path: PathBuf, source: MapError },
    #[error("migrating {from} to {to}: {reason}")]
    Copy {
        from: &'static str,
        to: &'static str,
        reason: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = UpgradeError> = std::result::Result<T, E>;

/// A map's definition as the kernel reports it (`bpf_map_info`) and the object declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} bytes, value {} bytes, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

impl MapDef {
    /// Same layout: type, key and value sizes and flags; the capacity too unless `sized` (a
    /// flag sets it at creation and a reused pin keeps the capacity it was created with).
    fn compatible(&self, other: &MapDef, sized: bool) -> bool {
        self.map_type == other.map_type
            && self.key_size == other.key_size
            && self.value_size == other.value_size
            && self.flags == other.flags
            && (sized || self.max_entries == other.max_entries)
    }
}

/// What a new build does with a pin of an older map name.
#[derive(Clone, Copy, Debug)]
pub enum Rule {
    /// Copy the entries into the new map (`to`), converted by `copy`, when the old pin has the
    /// layout `from` (type, key size, value size).
    Migrate {
        to: &'static str,
        from: (u32, u32, u32),
        copy: fn(&MapData, &mut Map) -> Result<usize, String>,
    },
    /// Not converted (`why`); the pin goes once no program uses it.
    Retire { to: &'static str, why: &'static str },
}

/// A map name an older build pinned, and what this build does with it.
#[derive(Clone, Copy, Debug)]
pub struct Predecessor {
    pub name: &'static str,
    pub rule: Rule,
}

/// Every map name older builds used that this build's names replaced. A layout change adds the
/// old name here when it bumps the name: with a [`Rule::Migrate`] when the entries can be
/// converted, else a [`Rule::Retire`] that says what is lost.
pub const PREDECESSORS: &[Predecessor] = &[
    Predecessor {
        name: "XLB_SVC_V1",
        rule: Rule::Migrate {
            to: map_names::SERVICES,
            from: (BPF_MAP_TYPE_HASH, std::mem::size_of::<ServiceKey>() as u32, SVC_V1_VALUE_SIZE),
            copy: copy_services_v1,
        },
    },
    Predecessor {
        name: "XLB_CT_V2",
        rule: Rule::Retire {
            to: map_names::CONNTRACK,
            why: "conntrack entries without the SNAT fields: flows through Services set up by that build pick a \
                  backend again",
        },
    },
    Predecessor {
        name: "XLB_CT_V1",
        rule: Rule::Retire {
            to: map_names::CONNTRACK,
            why: "conntrack entries without states or expiry: flows through Services set up by that build pick a \
                  backend again",
        },
    },
    Predecessor { name: "XLB_STATS_V2", rule: Rule::Retire { to: map_names::STATS, why: "packet counters restart from 0" } },
    Predecessor { name: "XLB_STATS_V1", rule: Rule::Retire { to: map_names::STATS, why: "packet counters restart from 0" } },
    Predecessor {
        name: "XLB_FEFILTER_V1",
        rule: Rule::Retire {
            to: map_names::FEFILTER,
            why: "the pre-filters start over: every bit set at start (next to pinned frontends), the conntrack \
                  sweeps clear what is not needed",
        },
    },
    Predecessor { name: "XLB_RNAT_V1", rule: Rule::Retire { to: map_names::SERVICES, why: "no longer used" } },
];

/// `XLB_SVC_V1`'s value (builds up to 3d57951): today's [`ServiceValue`] without its last field
/// `svc_port_id`, the fields before it in the same order with the same meaning.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ServiceValueV1 {
    backend_id: u32,
    count: u32,
    rev_nat_id: u32,
    flags: u32,
    affinity_timeout: u32,
}
// SAFETY: repr(C), u32 fields only, no padding.
unsafe impl aya::Pod for ServiceValueV1 {}

const SVC_V1_VALUE_SIZE: u32 = std::mem::size_of::<ServiceValueV1>() as u32;
const _: () = assert!(SVC_V1_VALUE_SIZE == 20);

/// An `XLB_SVC_V1` value as this build's [`ServiceValue`]: every field kept (ids, rev-NAT id,
/// flags, Maglev table index), the Service port identity unknown (0), as the agent's read-back
/// treats a master it has not named yet (it writes the id on its first plan).
fn service_value_from_v1(v: ServiceValueV1) -> ServiceValue {
    ServiceValue {
        backend_id: v.backend_id,
        count: v.count,
        rev_nat_id: v.rev_nat_id,
        flags: v.flags,
        affinity_timeout: v.affinity_timeout,
        ..ServiceValue::default()
    }
}

/// Copy every `XLB_SVC_V1` entry into the new SERVICES map; how many.
fn copy_services_v1(old: &MapData, new: &mut Map) -> Result<usize, String> {
    let (keys, values) = match crate::bpf_batch::hash_lookup_all::<ServiceKey, ServiceValueV1>(old)
    {
        Ok(kv) => kv,
        Err(e) if crate::bpf_batch::is_unsupported(&e) => {
            // A kernel without batch lookups: one entry at a time.
            let data = MapData::from_id(old.info().map_err(|e| e.to_string())?.id())
                .map_err(|e| e.to_string())?;
            let map: HashMap<MapData, ServiceKey, ServiceValueV1> =
                HashMap::try_from(Map::HashMap(data)).map_err(|e| e.to_string())?;
            let mut keys = Vec::new();
            let mut values = Vec::new();
            for kv in map.iter() {
                let (k, v) = kv.map_err(|e| e.to_string())?;
                keys.push(k);
                values.push(v);
            }
            (keys, values)
        }
        Err(e) => return Err(format!("reading the old entries: {e}")),
    };
    let values: Vec<ServiceValue> = values.into_iter().map(service_value_from_v1).collect();
    let mut map: HashMap<&mut MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(new).map_err(|e| format!("the new map: {e}"))?;
    match crate::bpf_batch::hash_update(aya::maps::IterableMap::map(&map), &keys, &values) {
        Ok(()) => {}
        Err((0, e)) if crate::bpf_batch::is_unsupported(&e) => {
            for (k, v) in keys.iter().zip(&values) {
                map.insert(k, v, 0)
                    .map_err(|e| format!("writing {k:?}: {e}"))?;
            }
        }
        Err((n, e)) => return Err(format!("writing entry {n} of {}: {e}", keys.len())),
    }
    Ok(keys.len())
}

/// The definitions of the maps `obj` declares, by name.
pub fn object_defs(obj: &[u8]) -> Result<BTreeMap<String, MapDef>> {
    let obj = aya_obj::Object::parse(obj).map_err(|e| UpgradeError::Object(e.to_string()))?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let def = MapDef {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            (name.clone(), def)
        })
        .collect())
}

/// The definition and id of the map pinned at `path`; None when nothing is pinned there.
pub fn pinned_def(path: &Path) -> Result<Option<(MapDef, u32)>> {
    if !path.exists() {
        return Ok(None);
    }
    let info = aya::maps::MapInfo::from_pin(path).map_err(|source| UpgradeError::Pin {
        path: path.to_path_buf(),
        source,
    })?;
    let def = MapDef {
        // aya's `MapType` has the kernel's `bpf_map_type` numbers as discriminants.
        map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    };
    Ok(Some((def, info.id())))
}

/// A map copied into a new one at this start.
#[derive(Debug)]
struct Migration {
    from: &'static str,
    to: &'static str,
    copy: fn(&MapData, &mut Map) -> Result<usize, String>,
}

/// An old pin removed once no loaded program references its map.
#[derive(Debug)]
struct Retiring {
    name: &'static str,
    map_id: u32,
}

/// What this start does with older pins: the migrations to run between the object's load and
/// its programs' load, and the old pins to remove once the new programs are in every link.
#[derive(Debug, Default)]
pub struct Upgrade {
    pins: Option<PinLayout>,
    migrations: Vec<Migration>,
    retiring: Vec<Retiring>,
    /// The last error of looking at the loaded programs, logged once.
    last_error: Option<String>,
    /// When [`Upgrade::finish`] last listed the loaded programs: at most once a second (every
    /// program on the host is looked at), while a link that is never swapped keeps it waiting.
    last_check: Option<std::time::Instant>,
}

impl Upgrade {
    /// Look at every pin under `pins` before `obj` is loaded with them: refuse incompatible pins
    /// of this build's names and unknown layouts under a predecessor's name; plan the
    /// migrations and retirements. Removes nothing but a temporary pin an interrupted migration
    /// left.
    pub fn prepare(pins: &PinLayout, opts: &LoadOptions, obj: &[u8]) -> Result<Self> {
        let defs = object_defs(obj)?;
        let sized: BTreeSet<&str> = opts
            .max_entries_overrides()
            .iter()
            .map(|(n, _)| *n)
            .collect();
        let pin_root = pins.root.clone();
        for name in map_names::ALL {
            let Some(want) = defs.get(name) else { continue };
            let path = pins.map(name);
            if let Some((pinned, _)) = pinned_def(&path)? {
                let wanted = match opts
                    .max_entries_overrides()
                    .iter()
                    .find(|(n, _)| *n == name)
                {
                    Some((_, n)) => MapDef {
                        max_entries: *n,
                        ..*want
                    },
                    None => *want,
                };
                if !pinned.compatible(&wanted, sized.contains(name)) {
                    return Err(UpgradeError::Incompatible {
                        name: name.to_string(),
                        path,
                        pin_root,
                        pinned,
                        wanted,
                    });
                }
            }
        }
        let mut up = Upgrade {
            pins: Some(pins.clone()),
            ..Upgrade::default()
        };
        for p in PREDECESSORS {
            // A name this build still uses is no predecessor (e.g. before its bump landed).
            if map_names::ALL.contains(&p.name) {
                continue;
            }
            let path = pins.map(p.name);
            let Some((pinned, map_id)) = pinned_def(&path)? else {
                continue;
            };
            match p.rule {
                Rule::Migrate { to, from, copy } => {
                    let expected_layout = (pinned.map_type, pinned.key_size, pinned.value_size);
                    if expected_layout != from {
                        return Err(UpgradeError::UnknownPredecessor {
                            name: p.name,
                            to,
                            path,
                            pin_root,
                            pinned,
                            expected: MapDef {
                                map_type: from.0,
                                key_size: from.1,
                                value_size: from.2,
                                ..pinned
                            },
                        });
                    }
                    let temp = migrating_pin(pins, to);
                    if temp.exists() {
                        tracing::warn!(pin = %temp.display(), "removing the copy of a migration that was interrupted");
                        std::fs::remove_file(&temp).map_err(|source| UpgradeError::Io {
                            what: "removing",
                            path: temp.clone(),
                            source,
                        })?;
                    }
                    if pins.map(to).exists() {
                        tracing::info!(
                            old = p.name,
                            new = to,
                            "an earlier start migrated this map; the old pin goes once no program uses it"
                        );
                    } else {
                        tracing::info!(
                            old = p.name,
                            new = to,
                            "pinned map of an older build: migrating its entries"
                        );
                        up.migrations.push(Migration {
                            from: p.name,
                            to,
                            copy,
                        });
                    }
                }
                Rule::Retire { to, why } => {
                    tracing::warn!(
                        old = p.name,
                        new = to,
                        lost = why,
                        "pinned map of an older build that this build cannot convert: not carried over; \
                         the old pin goes once no program uses it"
                    );
                }
            }
            up.retiring.push(Retiring {
                name: p.name,
                map_id,
            });
        }
        warn_unknown(pins);
        Ok(up)
    }

    /// (map name, pin path) of the maps this start creates under a temporary pin.
    pub fn pin_overrides(&self) -> Vec<(&'static str, PathBuf)> {
        let Some(pins) = &self.pins else {
            return Vec::new();
        };
        self.migrations
            .iter()
            .map(|m| (m.to, migrating_pin(pins, m.to)))
            .collect()
    }

    /// Copy the old entries into the maps `ebpf` created under their temporary pins, then give
    /// each its name. Run after the object is loaded and before any of its programs is.
    pub fn migrate(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        for m in std::mem::take(&mut self.migrations) {
            let temp = migrating_pin(&pins, m.to);
            let result = (|| {
                let old_path = pins.map(m.from);
                let old = MapData::from_pin(&old_path).map_err(|source| UpgradeError::Pin {
                    path: old_path.clone(),
                    source,
                })?;
                let new = ebpf.map_mut(m.to).ok_or_else(|| UpgradeError::Copy {
                    from: m.from,
                    to: m.to,
                    reason: "the object has no such map".into(),
                })?;
                let n = (m.copy)(&old, new).map_err(|reason| UpgradeError::Copy {
                    from: m.from,
                    to: m.to,
                    reason,
                })?;
                let to = pins.map(m.to);
                std::fs::rename(&temp, &to).map_err(|source| UpgradeError::Io {
                    what: "renaming to",
                    path: to,
                    source,
                })?;
                Ok(n)
            })();
            match result {
                Ok(n) => tracing::info!(old = m.from, new = m.to, entries = n, "map migrated"),
                Err(e) => {
                    let _ = std::fs::remove_file(&temp);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Whether old pins still wait for their programs to go.
    pub fn pending(&self) -> bool {
        !self.retiring.is_empty()
    }

    /// Remove the old pins whose maps no loaded program references any more (the new programs
    /// replaced the old ones in every link). Cheap when nothing is pending; the agent calls it
    /// after each attach pass.
    pub fn finish(&mut self) {
        let Some(pins) = self.pins.clone() else {
            return;
        };
        if self.retiring.is_empty() {
            return;
        }
        if self
            .last_check
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1))
        {
            return;
        }
        self.last_check = Some(std::time::Instant::now());
        let used = match maps_in_use() {
            Ok(used) => used,
            Err(e) => {
                if self.last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "listing the loaded programs failed; old map pins stay for now");
                    self.last_error = Some(e);
                }
                return;
            }
        };
        self.retiring.retain(|r| {
            if used.contains(&r.map_id) {
                return true;
            }
            let path = pins.map(r.name);
            // Only the map that was looked at: a pin replaced meanwhile is not ours to remove.
            match pinned_def(&path) {
                Ok(Some((_, id))) if id == r.map_id => match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!(old = r.name, "no program uses the old map any more: its pin is removed; upgrade complete"),
                    Err(e) => tracing::warn!(old = r.name, error = %e, "removing the old map's pin failed"),
                },
                _ => {}
            }
            false
        });
    }
}

/// `PIN/maps/NAME-migrating`.
fn migrating_pin(pins: &PinLayout, name: &str) -> PathBuf {
    pins.maps().join(format!("{name}{MIGRATING}"))
}

/// Pins under `PIN/maps` that are neither this build's maps nor known predecessors: warned
/// about, left alone (another tool's, or a newer build's).
fn warn_unknown(pins: &PinLayout) {
    let Ok(rd) = std::fs::read_dir(pins.maps()) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let known = map_names::ALL.contains(&name.as_str())
            || PREDECESSORS.iter().any(|p| p.name == name)
            || name.ends_with(MIGRATING);
        if !known {
            tracing::warn!(
                pin = %entry.path().display(),
                "pinned map unknown to this build (a newer build's, or not xlb's): left alone"
            );
        }
    }
}

/// Ids of every map some loaded program references.
fn maps_in_use() -> std::result::Result<BTreeSet<u32>, String> {
    let mut used = BTreeSet::new();
    for prog in aya::programs::loaded_programs() {
        // A program unloaded while listing is simply gone.
        let Ok(prog) = prog else { continue };
        match prog.map_ids() {
            Ok(Some(ids)) => used.extend(ids),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_service_value_keeps_every_field_and_has_no_port_identity() {
        let v1 = ServiceValueV1 {
            backend_id: 7,
            count: 3,
            rev_nat_id: 42,
            flags: 0x15,
            affinity_timeout: 10800,
        };
        let v2 = service_value_from_v1(v1);
        assert_eq!(
            (
                v2.backend_id,
                v2.count,
                v2.rev_nat_id,
                v2.flags,
                v2.affinity_timeout
            ),
            (7, 3, 42, 0x15, 10800)
        );
        // V1's value is the first 20 bytes of this build's (the contract of the layout change).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                &v2 as *const ServiceValue as *const u8,
                std::mem::size_of::<ServiceValue>(),
            )
        };
        let old =
            unsafe { std::slice::from_raw_parts(&v1 as *const ServiceValueV1 as *const u8, 20) };
        assert_eq!(&bytes[..20], old);
        assert!(bytes[20..].iter().all(|b| *b == 0));
    }

    #[test]
    fn predecessors_are_no_current_name_and_name_one() {
        for p in PREDECESSORS {
            let to = match p.rule {
                Rule::Migrate { to, .. } | Rule::Retire { to, .. } => to,
            };
            assert!(map_names::ALL.contains(&to), "{} -> {to}", p.name);
            assert!(p.name.starts_with("XLB_"), "{}", p.name);
        }
    }

    #[test]
    fn capacity_counts_only_where_no_flag_sets_it() {
        let a = MapDef {
            map_type: 1,
            key_size: 12,
            value_size: 24,
            max_entries: 100,
            flags: 0,
        };
        let b = MapDef {
            max_entries: 200,
            ..a
        };
        assert!(a.compatible(&b, true));
        assert!(!a.compatible(&b, false));
        assert!(!a.compatible(
            &MapDef {
                value_size: 20,
                ..a
            },
            true
        ));
        assert!(!a.compatible(&MapDef { flags: 1, ..a }, true));
        assert!(!a.compatible(&MapDef { map_type: 9, ..a }, true));
    }

    #[test]
    fn the_object_declares_every_map_with_its_layout() {
        let obj = crate::ebpf_object();
        if obj.is_empty() {
            return; // AYA_BUILD_SKIP build
        }
        let defs = object_defs(obj).unwrap();
        let svc = defs
            .get(map_names::SERVICES)
            .expect("SERVICES in the object");
        assert_eq!(svc.key_size as usize, std::mem::size_of::<ServiceKey>());
        assert_eq!(svc.value_size as usize, std::mem::size_of::<ServiceValue>());
        for name in map_names::ALL {
            assert!(defs.contains_key(name), "{name}");
        }
    }
}
