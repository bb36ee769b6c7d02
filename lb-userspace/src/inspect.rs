//! `xlb inspect`: read the pinned maps and print them as tables or JSON. Needs no running agent.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::Context as _;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use lb_common::{
    ct_state, ip4_from, port_from, BACKEND_ACTIVE, BACKEND_F_LOCAL, BACKEND_TERMINATING, CT_FORWARD, CT_F_FIN_FWD, CT_F_FIN_REV,
    CT_F_HAIRPIN, CT_F_SNAT, SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_EXT_LOCAL, SVC_FLAG_INT_LOCAL,
    SVC_FLAG_ALG_MAGLEV, SVC_FLAG_ALG_RR, SVC_FLAG_DROP_NO_LOCAL, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
    SVC_FLAG_TERMINATING_FALLBACK, SVC_FLAG_TWO_SCOPES,
};
use lb_model::{Applied, Proto};
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

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub frontend: String,
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

/// The rows of the frontends of `applied` that have a master.
pub fn service_rows(applied: &Applied) -> Vec<ServiceRow> {
    let mut rows = Vec::new();
    for (fe, af) in applied.frontends.iter().filter(|(_, af)| af.rev_nat_id != 0) {
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
    Ok(applied
        .backends
        .iter()
        .map(|(id, (b, state))| BackendRow {
            id: *id,
            addr: b.addr,
            port: b.port,
            proto: b.proto.to_string(),
            state: state_name(*state),
        })
        .collect())
}

pub fn conntrack(maps: &PinnedMaps) -> anyhow::Result<Vec<CtRow>> {
    let now = crate::ct_gc::now_coarse_ns();
    let mut rows = Vec::new();
    for item in maps.conntrack.iter() {
        let (k, v) = item.context("reading the conntrack map")?;
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

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    t
}

/// Run `xlb inspect WHAT`, printing to stdout.
pub fn run(pin_path: &Path, what: What, output: Output) -> anyhow::Result<()> {
    let mut maps = PinnedMaps::open(pin_path).with_context(|| {
        format!("opening the pinned maps under {} (is the agent running with this --pin-path?)", pin_path.display())
    })?;
    let json = |v: &dyn erased::Json| -> anyhow::Result<()> {
        println!("{}", v.to_json()?);
        Ok(())
    };
    match what {
        What::Services => {
            let rows = services(&mut maps)?;
            if output == Output::Json {
                return json(&rows);
            }
            let mut t = table(&["FRONTEND", "FLAGS", "REV-NAT", "BACKENDS", "SLOT", "BACKEND", "STATE"]);
            for r in &rows {
                let flags = r.flags.join(",");
                if r.backends.is_empty() {
                    t.add_row(vec![r.frontend.clone(), flags, r.rev_nat_id.to_string(), "0 (refuses)".into()]);
                    continue;
                }
                for (i, b) in r.backends.iter().enumerate() {
                    let be = match (b.addr, b.port) {
                        (Some(a), Some(p)) => format!("{a}:{p} (id {})", b.id),
                        _ => format!("id {} (missing)", b.id),
                    };
                    let first = i == 0;
                    t.add_row(vec![
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
            let rows = backends(&mut maps)?;
            if output == Output::Json {
                return json(&rows);
            }
            let mut t = table(&["ID", "ADDRESS", "PROTO", "STATE"]);
            for r in &rows {
                t.add_row(vec![r.id.to_string(), format!("{}:{}", r.addr, r.port), r.proto.clone(), r.state.into()]);
            }
            println!("{t}");
            println!("{} backends", rows.len());
        }
        What::Conntrack => {
            let rows = conntrack(&maps)?;
            if output == Output::Json {
                return json(&rows);
            }
            let mut t = table(&[
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
