//! The in-memory [`MapStore`]: what the property tests, the simulator and unit tests run the
//! shipped executor and read-back on.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

use lb_common::{Backend, MemberKey, MemberValue, ServiceKey, ServiceValue, SrcRangeKey, SvcName};

use super::MapStore;
use crate::maglev::Geometry;

/// The maps as ordered maps. Never fails; wrap it in a [`super::FaultStore`] for failures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStore {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub members: BTreeMap<MemberKey, MemberValue>,
    /// SRC_RANGES keys `(prefix_len, data)` as written (the value is always 1). Unlike the
    /// kernel's trie it does not fold keys that differ only after the prefix: xlb never
    /// writes such keys.
    pub src_ranges: BTreeSet<(u32, SrcRangeKey)>,
    /// The MAGLEV array's shape (default: the agent's defaults; tests choose small tables).
    pub maglev_geometry: Geometry,
    /// MAGLEV, by table: the tables ever written (others read as zeros).
    pub maglev: BTreeMap<u32, Vec<u32>>,
    /// SVCNAME.
    pub svc_names: BTreeMap<u32, SvcName>,
    /// How many times each id's counters were reset (a name written): what a real store's
    /// zeroing of SVCSTATS would have done.
    pub svc_stats_resets: BTreeMap<u32, u32>,
    /// The Service port ids SVCNAME has room for; 0: the default.
    pub svc_ports_max: u32,
}

impl MemStore {
    /// An empty store whose MAGLEV array has the shape `geometry`.
    pub fn with_geometry(geometry: Geometry) -> Self {
        MemStore {
            maglev_geometry: geometry,
            ..MemStore::default()
        }
    }
}

impl MapStore for MemStore {
    type Error = Infallible;

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Infallible> {
        self.services.insert(*key, *value);
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), Infallible> {
        self.services.remove(key);
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), Infallible> {
        self.backends.insert(id, *value);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), Infallible> {
        self.backends.remove(&id);
        Ok(())
    }
    fn put_member(&mut self, key: &MemberKey, value: &MemberValue) -> Result<(), Infallible> {
        self.members.insert(*key, *value);
        Ok(())
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), Infallible> {
        self.members.remove(key);
        Ok(())
    }
    fn put_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), Infallible> {
        self.src_ranges.insert((prefix_len, *key));
        Ok(())
    }
    fn delete_src_range(&mut self, prefix_len: u32, key: &SrcRangeKey) -> Result<(), Infallible> {
        self.src_ranges.remove(&(prefix_len, *key));
        Ok(())
    }
    fn for_each_service(
        &self,
        f: &mut dyn FnMut(&ServiceKey, &ServiceValue),
    ) -> Result<(), Infallible> {
        self.services.iter().for_each(|(k, v)| f(k, v));
        Ok(())
    }
    fn for_each_backend(&self, f: &mut dyn FnMut(u32, &Backend)) -> Result<(), Infallible> {
        self.backends.iter().for_each(|(id, b)| f(*id, b));
        Ok(())
    }
    fn for_each_member(
        &self,
        f: &mut dyn FnMut(&MemberKey, &MemberValue),
    ) -> Result<(), Infallible> {
        self.members.iter().for_each(|(k, v)| f(k, v));
        Ok(())
    }
    fn for_each_src_range(&self, f: &mut dyn FnMut(u32, &SrcRangeKey)) -> Result<(), Infallible> {
        self.src_ranges.iter().for_each(|(len, k)| f(*len, k));
        Ok(())
    }
    fn maglev_geometry(&self) -> Geometry {
        self.maglev_geometry
    }
    /// # Panics
    /// On a table outside the array or entries of the wrong length (the kernel would refuse
    /// them; xlb never writes them).
    fn put_maglev_table(&mut self, table: u32, entries: &[u32]) -> Result<(), Infallible> {
        let g = self.maglev_geometry;
        assert!(
            table < g.tables,
            "Maglev table {table} outside the {} tables",
            g.tables
        );
        assert_eq!(entries.len(), g.m as usize, "a Maglev table has M entries");
        self.maglev.insert(table, entries.to_vec());
        Ok(())
    }
    fn put_svc_name(&mut self, id: u32, name: &SvcName) -> Result<(), Infallible> {
        *self.svc_stats_resets.entry(id).or_default() += 1;
        self.svc_names.insert(id, *name);
        Ok(())
    }
    fn delete_svc_name(&mut self, id: u32) -> Result<(), Infallible> {
        self.svc_names.remove(&id);
        Ok(())
    }
    fn for_each_svc_name(&self, f: &mut dyn FnMut(u32, &SvcName)) -> Result<(), Infallible> {
        self.svc_names.iter().for_each(|(id, v)| f(*id, v));
        Ok(())
    }
    fn svc_ports_max(&self) -> u32 {
        if self.svc_ports_max == 0 {
            lb_common::DEFAULT_SVC_PORTS_MAX
        } else {
            self.svc_ports_max
        }
    }
    fn read_maglev_table(&self, table: u32) -> Result<Vec<u32>, Infallible> {
        let m = self.maglev_geometry.m as usize;
        Ok(self
            .maglev
            .get(&table)
            .cloned()
            .unwrap_or_else(|| vec![0; m]))
    }
}
