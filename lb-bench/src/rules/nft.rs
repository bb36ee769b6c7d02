//! kube-proxy's nftables-mode nat ruleset for a [`ServiceSet`], as `nft -f` input.
//!
//! Shape (pkg/proxy/nftables/proxier.go): table `ip kube-proxy`; the prerouting/output nat hooks
//! jump to `services`, which looks the packet up in the `service-ips` verdict map
//! (daddr . l4proto . dport) — one hash lookup whatever the number of Services — and goes to a
//! per-Service-port chain that masquerades off-cluster sources and picks an endpoint with
//! `numgen random mod N vmap`; each endpoint chain marks hairpin traffic and DNATs.
//!
//! NodePort (externalTrafficPolicy Cluster): `services` then matches destinations that are local
//! addresses (`fib daddr type local`, kube-proxy's rule without --nodeport-addresses) in the
//! `service-nodeports` verdict map (l4proto . dport), which goes to the Service port's
//! `external-*` chain: jump to mark-for-masquerade (the flow may cross nodes), then goto the same
//! `service-*` chain as the ClusterIP; `masquerading` (postrouting) SNATs it.

use std::fmt::Write as _;

use super::{chain_hash, ServiceSet, Svc, CLUSTER_CIDR};

/// The table name, as kube-proxy names it.
pub const TABLE: &str = "kube-proxy";
const NS: &str = "default";

fn svc_chain(svc: &Svc, port_name: &str) -> String {
    let id = format!("{NS}/{}/tcp/{port_name}", svc.name);
    format!("service-{}-{id}", &chain_hash(&[&id])[..8])
}

fn ext_chain(svc: &Svc, port_name: &str) -> String {
    let id = format!("{NS}/{}/tcp/{port_name}", svc.name);
    format!("external-{}-{id}", &chain_hash(&[&id])[..8])
}

fn ep_chain(svc: &Svc, port_name: &str, ep: &str, target: u16) -> String {
    let id = format!("{NS}/{}/tcp/{port_name}__{ep}/{target}", svc.name);
    format!("endpoint-{}-{id}", &chain_hash(&[&id])[..8])
}

/// Elements per `add element` command: keeps single commands a reasonable size.
const ELEMENT_CHUNK: usize = 1000;

/// The whole table (created from scratch; `nft -f` applies it as one transaction).
pub fn render(set: &ServiceSet) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "add table ip {TABLE}");
    let _ = writeln!(out, "add chain ip {TABLE} mark-for-masquerade");
    let _ = writeln!(
        out,
        "add rule ip {TABLE} mark-for-masquerade mark set mark or 0x4000"
    );
    let _ = writeln!(
        out,
        "add chain ip {TABLE} masquerading {{ type nat hook postrouting priority srcnat ; }}"
    );
    let _ = writeln!(
        out,
        "add rule ip {TABLE} masquerading mark and 0x4000 == 0 return"
    );
    let _ = writeln!(
        out,
        "add rule ip {TABLE} masquerading mark set mark xor 0x4000"
    );
    let _ = writeln!(
        out,
        "add rule ip {TABLE} masquerading masquerade fully-random"
    );
    let _ = writeln!(out, "add map ip {TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}");
    let _ = writeln!(out, "add chain ip {TABLE} services");
    let _ = writeln!(
        out,
        "add rule ip {TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(out, "add map ip {TABLE} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}");
    let _ = writeln!(
        out,
        "add rule ip {TABLE} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(
        out,
        "add chain ip {TABLE} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}"
    );
    let _ = writeln!(out, "add rule ip {TABLE} nat-prerouting jump services");
    let _ = writeln!(
        out,
        "add chain ip {TABLE} nat-output {{ type nat hook output priority -100 ; }}"
    );
    let _ = writeln!(out, "add rule ip {TABLE} nat-output jump services");
    let mut elements = Vec::new();
    let mut nodeport_elements = Vec::new();
    for svc in &set.services {
        for (port_name, port, target) in &svc.ports {
            let sc = svc_chain(svc, port_name);
            let _ = writeln!(out, "add chain ip {TABLE} {sc}");
            let _ = writeln!(
                out,
                "add rule ip {TABLE} {sc} ip daddr {} tcp dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
                svc.cluster_ip
            );
            let mut arms = Vec::with_capacity(svc.endpoints.len());
            for (i, ep) in svc.endpoints.iter().enumerate() {
                let ec = ep_chain(svc, port_name, &ep.to_string(), *target);
                let _ = writeln!(out, "add chain ip {TABLE} {ec}");
                let _ = writeln!(
                    out,
                    "add rule ip {TABLE} {ec} ip saddr {ep} jump mark-for-masquerade"
                );
                let _ = writeln!(
                    out,
                    "add rule ip {TABLE} {ec} meta l4proto tcp dnat to {ep}:{target}"
                );
                arms.push(format!("{i} : goto {ec}"));
            }
            if !arms.is_empty() {
                let _ = writeln!(
                    out,
                    "add rule ip {TABLE} {sc} numgen random mod {} vmap {{ {} }}",
                    arms.len(),
                    arms.join(" , ")
                );
            }
            elements.push(format!("{} . tcp . {port} : goto {sc}", svc.cluster_ip));
            // The nodePort belongs to the first port (see `Svc::node_port`).
            if let Some(np) = svc.node_port.filter(|_| port_name == &svc.ports[0].0) {
                let ec = ext_chain(svc, port_name);
                let _ = writeln!(out, "add chain ip {TABLE} {ec}");
                let _ = writeln!(out, "add rule ip {TABLE} {ec} jump mark-for-masquerade");
                let _ = writeln!(out, "add rule ip {TABLE} {ec} goto {sc}");
                if !svc.endpoints.is_empty() {
                    nodeport_elements.push(format!("tcp . {np} : goto {ec}"));
                }
            }
        }
    }
    for chunk in nodeport_elements.chunks(ELEMENT_CHUNK) {
        let _ = writeln!(
            out,
            "add element ip {TABLE} service-nodeports {{ {} }}",
            chunk.join(" , ")
        );
    }
    for chunk in elements.chunks(ELEMENT_CHUNK) {
        let _ = writeln!(
            out,
            "add element ip {TABLE} service-ips {{ {} }}",
            chunk.join(" , ")
        );
    }
    out
}

/// Removes the table (and with it every chain, map and rule `render` created).
pub fn delete() -> String {
    format!("delete table ip {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;

    #[test]
    fn kube_proxy_nftables_shape() {
        let set = ServiceSet::generate(&spec(3));
        let text = render(&set);
        // One verdict-map element per Service port; lookups never walk a list.
        let elements = text
            .lines()
            .filter(|l| l.starts_with("add element"))
            .collect::<Vec<_>>();
        assert_eq!(elements.len(), 1);
        assert_eq!(elements[0].matches(" : goto service-").count(), 4);
        assert!(elements[0].contains("10.96.0.12 . tcp . 5001 : goto service-"));
        // Endpoint selection by numgen over the endpoint chains.
        assert!(text.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert!(text.contains("numgen random mod 2 vmap"));
        assert!(text.contains("dnat to 10.244.1.11:5001"));
        assert_eq!(text.matches(" dnat to ").count(), set.endpoint_count());
        // Every chain a rule is added to or jumps to is created before it is used.
        let mut created = std::collections::BTreeSet::new();
        for l in text.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            if l.starts_with("add chain") {
                created.insert(w[4].to_string());
            } else if l.starts_with("add rule") {
                assert!(created.contains(w[4]), "{l}");
            }
        }
        for l in text.lines().filter(|l| l.contains("goto ")) {
            for target in l.split("goto ").skip(1) {
                let name = target.split([' ', ',', '}']).next().unwrap();
                assert!(created.contains(name), "{name}");
            }
        }
        assert!(!text.contains("add element ip kube-proxy service-nodeports"));
        // Chain names stay under nft's limit and use only identifier characters.
        assert!(created.iter().all(|c| c.len() < 256
            && c.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_./".contains(ch))));
    }

    #[test]
    fn nodeports_go_through_a_masquerading_external_chain() {
        let set = ServiceSet::generate(&super::super::tests::spec_ext(3));
        let text = render(&set);
        assert!(text.contains(
            "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
        ));
        let local = set.nodeport_local().unwrap();
        let (ec, sc) = (ext_chain(local, "http"), svc_chain(local, "http"));
        assert!(text.contains(&format!("add rule ip kube-proxy {ec} jump mark-for-masquerade\nadd rule ip kube-proxy {ec} goto {sc}\n")));
        let np: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("add element ip kube-proxy service-nodeports"))
            .collect();
        assert_eq!(np.len(), 1);
        assert!(
            np[0].contains(&format!("tcp . 30080 : goto {ec}")),
            "{}",
            np[0]
        );
        assert!(np[0].contains("tcp . 30081 : goto external-"), "{}", np[0]);
        // The ClusterIPs of the NodePort Services are in service-ips as well.
        assert!(text.contains(&format!("{} . tcp . 80 : goto {sc}", local.cluster_ip)));
        assert!(text.contains("dnat to 10.244.2.11:8080"));
        // The nodeports rule follows the service-ips lookup in `services`.
        let vmap = text.find("vmap @service-ips").unwrap();
        assert!(text.find("vmap @service-nodeports").unwrap() > vmap);
    }
}
