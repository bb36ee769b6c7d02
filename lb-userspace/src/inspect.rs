//! `xlb inspect`: read the pinned maps and print them as tables or JSON. Needs no running agent:
//! the Service names come from the pinned `XLB_SVCNAME_V1` (Service port id -> namespace, name,
//! port name), which every master and conntrack entry names by id.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::Context as _;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use lb_common::{
    ct_state, ip4_from, port_from, BACKEND_ACTIVE, BACKEND_F_LOCAL, BACKEND_TERMINATING, CT_FORWARD, CT_F_FIN_FWD, CT_F_FIN_REV,
    CT_F_HAIRPIN, CT_F_SNAT, SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_EXT_LOCAL, SVC_FLAG_INT_LOCAL,
    SVC_FLAG_ALG_MAGLEV, SVC_FLAG_ALG_RR, SVC_FLAG_DROP_NO_LOCAL, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
    SVC_FLAG_TERMINATING_FALLBACK, SVC_FLAG_TWO_SCOPES,
};
use lb_model::{Applied, Frontend, Proto, SvcPortName};
use serde::Serialize;

use crate::datapath::PinnedMaps;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    Services,
    Backends,
    Conntrack,
    Stats,
}

/// The Service port a row belongs to (`null` in JSON when unknown: a frontend without an id,
/// or a flow whose Service is gone).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" when unnamed).
    pub port: String,
}

impl ServiceRef {
    fn of(n: &SvcPortName) -> Self {
        ServiceRef { namespace: n.namespace.clone(), name: n.name.clone(), port: n.port_name.clone() }
    }
    /// `namespace/name:port` (`namespace/name` for an unnamed port).
    pub fn display(&self) -> String {
        if self.port.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
    fn is(&self, ns: &str, name: &str) -> bool {
        self.namespace == ns && self.name == name
    }
}

/// What `--service NS/NAME`, `--frontend IP:PORT` and `--client IP` keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// (namespace, name).
    pub service: Option<(String, String)>,
    pub frontend: Option<SocketAddrV4>,
    /// Conntrack only: flows of this client.
    pub client: Option<Ipv4Addr>,
}

impl Filter {
    /// Parse `NS/NAME`.
    pub fn parse_service(s: &str) -> anyhow::Result<(String, String)> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok((ns.to_string(), name.to_string()))
            }
            _ => anyhow::bail!("--service wants NAMESPACE/NAME, got {s:?}"),
        }
    }

    fn service_ok(&self, s: Option<&ServiceRef>) -> bool {
        match &self.service {
            None => true,
            Some((ns, name)) => s.is_some_and(|s| s.is(ns, name)),
        }
    }

    fn frontend_ok(&self, addr: Ipv4Addr, port: u16) -> bool {
        self.frontend.is_none_or(|f| *f.ip() == addr && f.port() == port)
    }
}

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    /// The Service port of the frontend (its master's `svc_port_id`).
    pub service: Option<ServiceRef>,
    pub svc_port_id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: String,
    pub scope: u8,
    pub rev_nat_id: u32,
    pub flags: Vec<&'static str>,
    pub affinity_timeout: u32,
    pub count: u32,
    pub backends: Vec<SlotRow>,
}

#[derive(Debug, Serialize)]
pub struct SlotRow {
    pub slot: u16,
    pub id: u32,
    pub addr: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub proto: Option<String>,
    pub state: &'static str,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: String,
    pub state: &'static str,
    /// The Service ports whose frontends have it in a slot (sorted, distinct).
    pub services: Vec<ServiceRef>,
    /// Those frontends.
    pub frontends: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CtRow {
    pub dir: &'static str,
    pub saddr: Ipv4Addr,
    pub sport: u16,
    pub daddr: Ipv4Addr,
    pub dport: u16,
    pub proto: String,
    pub nat_addr: Ipv4Addr,
    pub nat_port: u16,
    /// A flow from outside SNATed to the node (flag `snat`). Forward: the node address and
    /// port the backend sees. Reply: the client the answer is restored to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<(Ipv4Addr, u16)>,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// The flow's Service port: by the id the entry recorded, or (entries of builds without
    /// it) by the frontend it was translated from; `null` when that is gone.
    pub service: Option<ServiceRef>,
    pub svc_port_id: u16,
    /// `lb_common::ct_state::name` of the state.
    pub state: &'static str,
    /// `fin_fwd`, `fin_rev`, `hairpin`.
    pub flags: Vec<&'static str>,
    /// Seconds until the entry expires (CLOCK_MONOTONIC_COARSE); negative once expired.
    pub expires_in_s: f64,
    /// The datapath treats the entry as a miss; the next sweep removes it.
    pub expired: bool,
}

/// Names of the `CT_F_*` flags set in `flags`.
pub fn ct_flag_names(flags: u8) -> Vec<&'static str> {
    [(CT_F_FIN_FWD, "fin_fwd"), (CT_F_FIN_REV, "fin_rev"), (CT_F_HAIRPIN, "hairpin"), (CT_F_SNAT, "snat")]
        .into_iter()
        .filter(|(f, _)| flags & f != 0)
        .map(|(_, n)| n)
        .collect()
}

/// "12.3s", or "expired 2.0s ago".
pub fn time_left(expires_in_s: f64) -> String {
    if expires_in_s > 0.0 {
        format!("{expires_in_s:.1}s")
    } else {
        format!("expired {:.1}s ago", 0.0 - expires_in_s)
    }
}

pub fn flag_names(flags: u32) -> Vec<&'static str> {
    [
        (SVC_FLAG_CLUSTER_IP, "cluster_ip"),
        (SVC_FLAG_NODE_PORT, "node_port"),
        (SVC_FLAG_LOAD_BALANCER, "load_balancer"),
        (SVC_FLAG_EXTERNAL_IP, "external_ip"),
        (SVC_FLAG_EXT_LOCAL, "ext_traffic_local"),
        (SVC_FLAG_INT_LOCAL, "int_traffic_local"),
        (SVC_FLAG_AFFINITY, "affinity"),
        (SVC_FLAG_TERMINATING_FALLBACK, "terminating_fallback"),
        (SVC_FLAG_TWO_SCOPES, "two_scopes"),
        (SVC_FLAG_SOURCE_RANGES, "source_ranges"),
        (SVC_FLAG_DROP_NO_LOCAL, "drop_no_local"),
        (SVC_FLAG_ALG_RR, "round_robin"),
        (SVC_FLAG_ALG_MAGLEV, "maglev"),
    ]
    .into_iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| n)
    .collect()
}

/// The backend's state, and whether it runs on this node (`BACKEND_F_LOCAL`).
fn state_name(s: u8) -> &'static str {
    match (s & !BACKEND_F_LOCAL, s & BACKEND_F_LOCAL != 0) {
        (BACKEND_ACTIVE, false) => "active",
        (BACKEND_ACTIVE, true) => "active,local",
        (BACKEND_TERMINATING, false) => "terminating",
        (BACKEND_TERMINATING, true) => "terminating,local",
        _ => "unknown",
    }
}

fn proto_name(p: u8) -> String {
    Proto::from_number(p).map(|p| p.to_string()).unwrap_or_else(|| p.to_string())
}

/// The frontends (one row per master), read back with the agent's read-back
/// (`lb_model::ReadBack`), in frontend order.
pub fn services(maps: &mut PinnedMaps) -> anyhow::Result<Vec<ServiceRow>> {
    let applied = maps.applied().context("reading the Service maps")?;
    Ok(service_rows(&applied))
}

/// The Service port of the frontend `fe` in `applied` (its master's id, named), if any.
fn service_of(applied: &Applied, fe: &Frontend) -> Option<ServiceRef> {
    applied.svc_name_of(fe).map(ServiceRef::of)
}

/// The rows of the frontends of `applied` that have a master.
pub fn service_rows(applied: &Applied) -> Vec<ServiceRow> {
    service_rows_filtered(applied, &Filter::default())
}

/// [`service_rows`] that `filter` keeps (`--service`, `--frontend`).
pub fn service_rows_filtered(applied: &Applied, filter: &Filter) -> Vec<ServiceRow> {
    let mut rows = Vec::new();
    for (fe, af) in applied.frontends.iter().filter(|(_, af)| af.rev_nat_id != 0) {
        let service = service_of(applied, fe);
        if !filter.service_ok(service.as_ref()) || !filter.frontend_ok(fe.addr, fe.port) {
            continue;
        }
        let backends = (1..=af.count.min(u32::from(u16::MAX)))
            .map(|slot| {
                let id = af.slots.get(slot as usize - 1).copied().unwrap_or(0);
                let b = applied.backends.get(&id);
                SlotRow {
                    slot: slot as u16,
                    id,
                    addr: b.map(|(b, _)| b.addr),
                    port: b.map(|(b, _)| b.port),
                    proto: b.map(|(b, _)| b.proto.to_string()),
                    state: b.map(|(_, s)| state_name(*s)).unwrap_or("missing"),
                }
            })
            .collect();
        rows.push(ServiceRow {
            frontend: fe.to_string(),
            service,
            svc_port_id: af.svc_port_id,
            addr: fe.addr,
            port: fe.port,
            proto: fe.proto.to_string(),
            scope: fe.scope,
            rev_nat_id: af.rev_nat_id,
            flags: flag_names(af.flags),
            affinity_timeout: af.affinity_timeout,
            count: af.count,
            backends,
        });
    }
    rows
}

/// Every backend, by id.
pub fn backends(maps: &mut PinnedMaps) -> anyhow::Result<Vec<BackendRow>> {
    let applied = maps.applied().context("reading the Service maps")?;
    Ok(backend_rows(&applied, &Filter::default()))
}

/// The backends of `applied` that `filter` keeps: with `--service` / `--frontend`, those in a
/// slot of a matching frontend.
pub fn backend_rows(applied: &Applied, filter: &Filter) -> Vec<BackendRow> {
    // Backend id -> (Service ports, frontends) of the masters whose slots name it.
    let mut users: BTreeMap<u32, (BTreeSet<ServiceRef>, BTreeSet<Frontend>)> = BTreeMap::new();
    let mut wanted: BTreeSet<u32> = BTreeSet::new();
    for (fe, af) in applied.frontends.iter().filter(|(_, af)| af.rev_nat_id != 0) {
        let service = service_of(applied, fe);
        let keep = filter.service_ok(service.as_ref()) && filter.frontend_ok(fe.addr, fe.port);
        for id in af.slots.iter().take(af.count as usize).filter(|id| **id != 0) {
            let u = users.entry(*id).or_default();
            u.0.extend(service.clone());
            u.1.insert(*fe);
            if keep {
                wanted.insert(*id);
            }
        }
    }
    let filtered = filter.service.is_some() || filter.frontend.is_some();
    applied
        .backends
        .iter()
        .filter(|(id, _)| !filtered || wanted.contains(id))
        .map(|(id, (b, state))| {
            let (services, frontends) = users.remove(id).unwrap_or_default();
            BackendRow {
                id: *id,
                addr: b.addr,
                port: b.port,
                proto: b.proto.to_string(),
                state: state_name(*state),
                services: services.into_iter().collect(),
                frontends: frontends.iter().map(Frontend::to_string).collect(),
            }
        })
        .collect()
}

pub fn conntrack(maps: &mut PinnedMaps) -> anyhow::Result<Vec<CtRow>> {
    conntrack_filtered(maps, &Filter::default())
}

/// The conntrack entries `filter` keeps: `--service` (the flow's Service), `--frontend` (the
/// address the client used: a forward key's destination, a reply entry's restored source)
/// and `--client` (a forward key's source, a reply entry's destination or, SNATed, the client
/// it restores).
pub fn conntrack_filtered(maps: &mut PinnedMaps, filter: &Filter) -> anyhow::Result<Vec<CtRow>> {
    let applied = maps.applied().context("reading the Service maps")?;
    let now = crate::ct_gc::now_coarse_ns();
    let mut rows = Vec::new();
    for item in maps.conntrack.iter() {
        let (k, v) = item.context("reading the conntrack map")?;
        let forward = k.dir == CT_FORWARD;
        // The frontend the client addressed, and the client.
        let (fe_addr, fe_port) = if forward { (k.daddr, k.dport) } else { (v.nat_addr, v.nat_port) };
        let client = if forward {
            k.saddr
        } else if v.flags & CT_F_SNAT != 0 {
            v.snat_addr
        } else {
            k.daddr
        };
        let frontend = Frontend {
            addr: Ipv4Addr::from(ip4_from(fe_addr)),
            port: port_from(fe_port),
            proto: match Proto::from_number(k.proto) {
                Some(p) => p,
                None => continue,
            },
            scope: lb_common::SCOPE_EXT,
        };
        let service = applied
            .svc_names
            .get(&u32::from(v.svc_port_id))
            .map(ServiceRef::of)
            .or_else(|| service_of(&applied, &frontend));
        if !filter.service_ok(service.as_ref())
            || !filter.frontend_ok(frontend.addr, frontend.port)
            || filter.client.is_some_and(|c| c != Ipv4Addr::from(ip4_from(client)))
        {
            continue;
        }
        let left = crate::ct_gc::time_left_s(&v, now);
        rows.push(CtRow {
            dir: if k.dir == CT_FORWARD { "forward" } else { "reply" },
            saddr: Ipv4Addr::from(ip4_from(k.saddr)),
            sport: port_from(k.sport),
            daddr: Ipv4Addr::from(ip4_from(k.daddr)),
            dport: port_from(k.dport),
            proto: proto_name(k.proto),
            nat_addr: Ipv4Addr::from(ip4_from(v.nat_addr)),
            nat_port: port_from(v.nat_port),
            snat: (v.flags & CT_F_SNAT != 0)
                .then(|| (Ipv4Addr::from(ip4_from(v.snat_addr)), port_from(v.snat_port))),
            backend_id: v.backend_id,
            rev_nat_id: v.rev_nat_id,
            service,
            svc_port_id: v.svc_port_id,
            state: ct_state::name(v.state),
            flags: ct_flag_names(v.flags),
            // Rounded to ms so the JSON stays readable.
            expires_in_s: (left * 1000.0).round() / 1000.0,
            expired: crate::ct_gc::ct_expired(&v, now),
        });
    }
    rows.sort_by_key(|r| (r.dir, u32::from(r.saddr), r.sport, u32::from(r.daddr), r.dport));
    Ok(rows)
}

/// "N entries (M expired): 3 established, 1 closed".
pub fn ct_summary(rows: &[CtRow]) -> String {
    let expired = rows.iter().filter(|r| r.expired).count();
    let mut by_state = std::collections::BTreeMap::new();
    for r in rows.iter().filter(|r| !r.expired) {
        *by_state.entry(r.state).or_insert(0usize) += 1;
    }
    let states: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let mut line = format!("{} entries ({expired} expired)", rows.len());
    if !states.is_empty() {
        line += &format!(": {}", states.join(", "));
    }
    line
}

/// A table in the style every `xlb` command prints (inspect, status).
pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    t
}

/// The table cell of a row's Service ("-" when unknown).
fn service_cell(s: &Option<ServiceRef>) -> String {
    s.as_ref().map_or_else(|| "-".to_string(), ServiceRef::display)
}

/// Run `xlb inspect WHAT`, printing to stdout.
pub fn run(pin_path: &Path, what: What, output: Output, filter: &Filter) -> anyhow::Result<()> {
    if filter.client.is_some() && what != What::Conntrack {
        anyhow::bail!("--client applies to `xlb inspect conntrack` only");
    }
    if (filter.service.is_some() || filter.frontend.is_some()) && what == What::Stats {
        anyhow::bail!("--service and --frontend do not apply to `xlb inspect stats` (see the xlb_service_* metrics)");
    }
    let mut maps = PinnedMaps::open(pin_path).with_context(|| {
        format!("opening the pinned maps under {} (is the agent running with this --pin-path?)", pin_path.display())
    })?;
    let json = |v: &dyn erased::Json| -> anyhow::Result<()> {
        println!("{}", v.to_json()?);
        Ok(())
    };
    match what {
        What::Services => {
            let applied = maps.applied().context("reading the Service maps")?;
            let rows = service_rows_filtered(&applied, filter);
            if output == Output::Json {
                return json(&rows);
            }
            let mut t = table(&["SERVICE", "FRONTEND", "FLAGS", "REV-NAT", "BACKENDS", "SLOT", "BACKEND", "STATE"]);
            for r in &rows {
                let flags = r.flags.join(",");
                if r.backends.is_empty() {
                    t.add_row(vec![
                        service_cell(&r.service),
                        r.frontend.clone(),
                        flags,
                        r.rev_nat_id.to_string(),
                        "0 (refuses)".into(),
                    ]);
                    continue;
                }
                for (i, b) in r.backends.iter().enumerate() {
                    let be = match (b.addr, b.port) {
                        (Some(a), Some(p)) => format!("{a}:{p} (id {})", b.id),
                        _ => format!("id {} (missing)", b.id),
                    };
                    let first = i == 0;
                    t.add_row(vec![
                        if first { service_cell(&r.service) } else { String::new() },
                        if first { r.frontend.clone() } else { String::new() },
                        if first { flags.clone() } else { String::new() },
                        if first { r.rev_nat_id.to_string() } else { String::new() },
                        if first { r.count.to_string() } else { String::new() },
                        b.slot.to_string(),
                        be,
                        b.state.to_string(),
                    ]);
                }
            }
            println!("{t}");
            println!("{} frontends", rows.len());
        }
        What::Backends => {
            let applied = maps.applied().context("reading the Service maps")?;
            let rows = backend_rows(&applied, filter);
            if output == Output::Json {
                return json(&rows);
            }
            let mut t = table(&["ID", "ADDRESS", "PROTO", "STATE", "SERVICES"]);
            for r in &rows {
                let services: Vec<String> = r.services.iter().map(ServiceRef::display).collect();
                t.add_row(vec![
                    r.id.to_string(),
                    format!("{}:{}", r.addr, r.port),
                    r.proto.clone(),
                    r.state.into(),
                    if services.is_empty() { "-".into() } else { services.join(", ") },
                ]);
            }
            println!("{t}");
            println!("{} backends", rows.len());
        }
        What::Conntrack => {
            let rows = conntrack_filtered(&mut maps, filter)?;
            if output == Output::Json {
                return json(&rows);
            }
            let mut t = table(&[
                "SERVICE",
                "DIR",
                "PROTO",
                "SOURCE",
                "DESTINATION",
                "TRANSLATED TO",
                "SNAT",
                "BACKEND",
                "REV-NAT",
                "STATE",
                "FLAGS",
                "TIME LEFT",
            ]);
            for r in &rows {
                t.add_row(vec![
                    service_cell(&r.service),
                    r.dir.to_string(),
                    r.proto.clone(),
                    format!("{}:{}", r.saddr, r.sport),
                    format!("{}:{}", r.daddr, r.dport),
                    format!("{}:{}", r.nat_addr, r.nat_port),
                    r.snat.map(|(a, p)| format!("{a}:{p}")).unwrap_or_default(),
                    r.backend_id.to_string(),
                    r.rev_nat_id.to_string(),
                    r.state.to_string(),
                    r.flags.join(","),
                    time_left(r.expires_in_s),
                ]);
            }
            println!("{t}");
            println!("{}", ct_summary(&rows));
        }
        What::Stats => {
            let stats = maps.stats()?;
            if output == Output::Json {
                let m: serde_json::Map<String, serde_json::Value> =
                    stats.iter().map(|(s, v)| (s.name().to_string(), (*v).into())).collect();
                return json(&m);
            }
            let mut t = table(&["COUNTER", "PACKETS"]);
            for (s, v) in stats {
                t.add_row(vec![s.name().to_string(), v.to_string()]);
            }
            println!("{t}");
        }
    }
    Ok(())
}

mod erased {
    /// Object-safe "serialize to pretty JSON".
    pub trait Json {
        fn to_json(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Result<String> {
            serde_json::to_string_pretty(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &'static str, expires_in_s: f64) -> CtRow {
        CtRow {
            dir: "forward",
            saddr: Ipv4Addr::new(10, 244, 1, 2),
            sport: 40000,
            daddr: Ipv4Addr::new(10, 96, 0, 80),
            dport: 80,
            proto: "TCP".into(),
            nat_addr: Ipv4Addr::new(10, 244, 1, 10),
            nat_port: 9376,
            snat: None,
            backend_id: 1,
            rev_nat_id: 1,
            service: None,
            svc_port_id: 0,
            state,
            flags: vec![],
            expires_in_s,
            expired: expires_in_s <= 0.0,
        }
    }

    #[test]
    fn conntrack_flags_time_left_and_summary() {
        assert_eq!(ct_flag_names(0), Vec::<&str>::new());
        assert_eq!(ct_flag_names(CT_F_FIN_FWD | CT_F_HAIRPIN), ["fin_fwd", "hairpin"]);
        assert_eq!(ct_flag_names(0xff), ["fin_fwd", "fin_rev", "hairpin", "snat"]);
        assert_eq!(time_left(12.34), "12.3s");
        assert_eq!(time_left(-2.0), "expired 2.0s ago");
        assert_eq!(time_left(0.0), "expired 0.0s ago");
        let rows = [row("established", 10.0), row("closed", 3.0), row("established", 1.0), row("closed", -1.0)];
        assert_eq!(ct_summary(&rows), "4 entries (1 expired): 1 closed, 2 established");
        assert_eq!(ct_summary(&[]), "0 entries (0 expired)");
        let json = serde_json::to_value(&rows[3]).unwrap();
        assert_eq!(json["state"], "closed");
        assert_eq!(json["expires_in_s"], -1.0);
        assert_eq!(json["expired"], true);
        assert!(json.get("age_ms").is_none());
    }
}
