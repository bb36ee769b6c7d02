//! The in-memory [`MapStore`]: what the property tests, the simulator and unit tests run the
//! shipped executor and read-back on.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

use lb_common::{Backend, MemberKey, MemberValue, ServiceKey, ServiceValue, SrcRangeKey};

use super::MapStore;

/// The four maps as ordered maps. Never fails; wrap it in a [`super::FaultStore`] for failures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStore {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub members: BTreeMap<MemberKey, MemberValue>,
    /// SRC_RANGES keys `(prefix_len, data)` as written (the value is always 1). Unlike the
    /// kernel's trie it does not fold keys that differ only after the prefix: xlb never
    /// writes such keys.
    pub src_ranges: BTreeSet<(u32, SrcRangeKey)>,
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
}
