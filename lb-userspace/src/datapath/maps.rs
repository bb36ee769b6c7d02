//! The Service maps as an `lb_model::store::MapStore` ([`AyaStore`]): over a loaded object's
//! maps ([`ObjectMaps`], what the agent executes plans on and reads back at start) or over the
//! pins ([`PinnedMaps`], for `xlb inspect`, metrics and tests).
//!
//! The Service maps are SERVICES, BACKENDS, MEMBERS (hashes) and SRC_RANGES (an LPM trie,
//! created with `BPF_F_NO_PREALLOC` as the kernel requires, keyed by aya's
//! `lpm_trie::Key<SrcRangeKey>`).

use std::borrow::BorrowMut;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use aya::Ebpf;
use lb_common::{
    map_names, AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragKey, FragValue, MemberKey, MemberValue,
    ServiceKey, ServiceValue, SrcRangeKey, Stat, STAT_COUNT,
};
use lb_model::store::MapStore;
use lb_model::{Applied, ReadBack};

use super::{Error, PinLayout, Result};

/// SERVICES, BACKENDS, MEMBERS and SRC_RANGES as a [`MapStore`], borrowed from an
/// [`ObjectMaps`] (`T = &mut MapData`) or a [`PinnedMaps`] (`T = MapData`).
pub struct AyaStore<'m, T> {
    services: &'m mut HashMap<T, ServiceKey, ServiceValue>,
    backends: &'m mut HashMap<T, u32, Backend>,
    members: &'m mut HashMap<T, MemberKey, MemberValue>,
    src_ranges: &'m mut LpmTrie<T, SrcRangeKey, u8>,
}

/// The SRC_RANGES value of every entry (the trie is a set: presence is the answer).
const SRC_RANGE_PRESENT: u8 = 1;

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Deleting what is already gone is success (a restart may replay deletes).
fn ignore_missing(r: Result<(), MapError>, name: &'static str) -> Result<()> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map_err(map_err(name)),
    }
}

/// Every entry of `map`, each handed to `f`.
fn for_each<T: BorrowMut<MapData>, K: aya::Pod, V: aya::Pod>(
    map: &HashMap<T, K, V>,
    name: &'static str,
    mut f: impl FnMut(K, V),
) -> Result<()> {
    for item in map.iter() {
        let (k, v) = item.map_err(map_err(name))?;
        f(k, v);
    }
    Ok(())
}

impl<T: BorrowMut<MapData>> MapStore for AyaStore<'_, T> {
    type Error = Error;

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.services.insert(key, value, 0).map_err(map_err(map_names::SERVICES))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<()> {
        ignore_missing(self.services.remove(key), map_names::SERVICES)
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<()> {
        self.backends.insert(id, value, 0).map_err(map_err(map_names::BACKENDS))
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        ignore_missing(self.backends.remove(&id), map_names::BACKENDS)
    }
    fn put_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<()> {
        self.members.insert(key, value, 0).map_err(map_err(map_names::MEMBERS))
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<()> {
        ignore_missing(self.members.remove(key), map_names::MEMBERS)
    }
    fn put_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<()> {
        self.src_ranges
            .insert(&Key::new(prefix_len, *key), SRC_RANGE_PRESENT, 0)
            .map_err(map_err(map_names::SRC_RANGES))
    }
    fn delete_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<()> {
        // An exact-prefix delete (the kernel's trie delete does no longest-prefix match).
        ignore_missing(self.src_ranges.remove(&Key::new(prefix_len, *key)), map_names::SRC_RANGES)
    }
    fn for_each_service(&self, f: &mut dyn FnMut(&ServiceKey, &ServiceValue)) -> Result<()> {
        for_each(self.services, map_names::SERVICES, |k, v| f(&k, &v))
    }
    fn for_each_backend(&self, f: &mut dyn FnMut(u32, &Backend)) -> Result<()> {
        for_each(self.backends, map_names::BACKENDS, |id, b| f(id, &b))
    }
    fn for_each_member(&self, f: &mut dyn FnMut(&MemberKey, &MemberValue)) -> Result<()> {
        for_each(self.members, map_names::MEMBERS, |k, v| f(&k, &v))
    }
    fn for_each_src_range(&self, f: &mut dyn FnMut(u32, &SrcRangeKey)) -> Result<()> {
        // Keys only: the value is always the same, and a value lookup on a trie is a
        // longest-prefix match, not the entry the key came from.
        for key in self.src_ranges.keys() {
            let key = key.map_err(map_err(map_names::SRC_RANGES))?;
            f(key.prefix_len(), &key.data());
        }
        Ok(())
    }
}

/// The Service maps of a loaded object (pinned or not), typed.
pub struct ObjectMaps<'a> {
    pub services: HashMap<&'a mut MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<&'a mut MapData, u32, Backend>,
    pub members: HashMap<&'a mut MapData, MemberKey, MemberValue>,
    pub src_ranges: LpmTrie<&'a mut MapData, SrcRangeKey, u8>,
}

impl<'a> ObjectMaps<'a> {
    pub fn of(ebpf: &'a mut Ebpf) -> Result<Self> {
        let mut services = None;
        let mut backends = None;
        let mut members = None;
        let mut src_ranges = None;
        for (name, map) in ebpf.maps_mut() {
            match name {
                n if n == map_names::SERVICES => services = Some(map),
                n if n == map_names::BACKENDS => backends = Some(map),
                n if n == map_names::MEMBERS => members = Some(map),
                n if n == map_names::SRC_RANGES => src_ranges = Some(map),
                _ => {}
            }
        }
        fn found<'m>(name: &'static str, m: Option<&'m mut Map>) -> Result<&'m mut Map> {
            m.ok_or(Error::Map { name, source: MapError::InvalidName { name: name.into() } })
        }
        fn typed<'m, K: aya::Pod, V: aya::Pod>(
            name: &'static str,
            m: Option<&'m mut Map>,
        ) -> Result<HashMap<&'m mut MapData, K, V>> {
            HashMap::try_from(found(name, m)?).map_err(map_err(name))
        }
        Ok(ObjectMaps {
            services: typed(map_names::SERVICES, services)?,
            backends: typed(map_names::BACKENDS, backends)?,
            members: typed(map_names::MEMBERS, members)?,
            src_ranges: LpmTrie::try_from(found(map_names::SRC_RANGES, src_ranges)?)
                .map_err(map_err(map_names::SRC_RANGES))?,
        })
    }

    pub fn store(&mut self) -> AyaStore<'_, &'a mut MapData> {
        AyaStore {
            services: &mut self.services,
            backends: &mut self.backends,
            members: &mut self.members,
            src_ranges: &mut self.src_ranges,
        }
    }
}

/// Access to the pinned maps of a running (or exited) agent, for `xlb inspect`, metrics and
/// tests. Opening by path needs no program load.
pub struct PinnedMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub members: HashMap<MapData, MemberKey, MemberValue>,
    pub src_ranges: LpmTrie<MapData, SrcRangeKey, u8>,
    pub frags: HashMap<MapData, FragKey, FragValue>,
    pub stats: PerCpuArray<MapData, u64>,
}

fn open_pinned(pins: &PinLayout, name: &'static str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

impl PinnedMaps {
    pub fn open(pin_path: &Path) -> Result<Self> {
        let pins = PinLayout::new(pin_path);
        macro_rules! typed {
            ($name:expr) => {
                open_pinned(&pins, $name)?.try_into().map_err(map_err($name))?
            };
        }
        Ok(PinnedMaps {
            services: typed!(map_names::SERVICES),
            backends: typed!(map_names::BACKENDS),
            conntrack: typed!(map_names::CONNTRACK),
            affinity: typed!(map_names::AFFINITY),
            members: typed!(map_names::MEMBERS),
            src_ranges: typed!(map_names::SRC_RANGES),
            frags: typed!(map_names::FRAGS),
            stats: typed!(map_names::STATS),
        })
    }

    /// The Service maps as a [`MapStore`].
    pub fn store(&mut self) -> AyaStore<'_, MapData> {
        AyaStore {
            services: &mut self.services,
            backends: &mut self.backends,
            members: &mut self.members,
            src_ranges: &mut self.src_ranges,
        }
    }

    /// The Service maps read back (`lb_model::ReadBack`).
    pub fn applied(&mut self) -> Result<Applied> {
        ReadBack::read(&self.store())
    }

    /// Datapath counters summed over CPUs, by `Stat`.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>> {
        let mut out = Vec::with_capacity(STAT_COUNT as usize);
        for s in Stat::ALL {
            let v = self.stats.get(&(s as u32), 0).map_err(map_err(map_names::STATS))?;
            out.push((s, v.iter().sum()));
        }
        Ok(out)
    }
}
