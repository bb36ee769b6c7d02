//! kube-proxy's iptables-mode nat table for a [`ServiceSet`], as `iptables-restore` input.
//!
//! Shape (pkg/proxy/iptables/proxier.go): PREROUTING/OUTPUT -> KUBE-SERVICES, one rule per
//! Service port matching ClusterIP + port and jumping to KUBE-SVC-*, which masquerades off-cluster
//! sources and picks an endpoint with `statistic --mode random` (probability 1/(n-i)), each
//! endpoint a KUBE-SEP-* chain (hairpin mark, DNAT). KUBE-SERVICES ends with the NodePort rule
//! (`-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`, kube-proxy's default without
//! --nodeport-addresses), and POSTROUTING masquerades marked packets. A packet to the last
//! Service walks every KUBE-SERVICES rule first: the linear cost iptables mode is known for; a
//! packet to a NodePort walks all of them and then KUBE-NODEPORTS.
//!
//! NodePort (externalTrafficPolicy Cluster): KUBE-NODEPORTS matches the protocol and nodePort
//! and jumps to the Service port's KUBE-EXT-* chain, which marks the packet for masquerade
//! (KUBE-MARK-MASQ: the flow may cross nodes) and jumps to the same KUBE-SVC-* chain as the
//! ClusterIP; KUBE-POSTROUTING masquerades it (SNAT to the node's address on the way out).

use std::fmt::Write as _;

use super::{chain_hash, ServiceSet, Svc, CLUSTER_CIDR};

const NS: &str = "default";

fn svc_chain(svc: &Svc, port_name: &str) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_hash(&[NS, &svc.name, port_name, "tcp"])
    )
}

fn ext_chain(svc: &Svc, port_name: &str) -> String {
    format!(
        "KUBE-EXT-{}",
        chain_hash(&[NS, &svc.name, port_name, "tcp"])
    )
}

fn sep_chain(svc: &Svc, port_name: &str, ep: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&[NS, &svc.name, port_name, "tcp", ep])
    )
}

/// The complete `*nat` table (replaces the table when restored without `--noflush`).
pub fn render(set: &ServiceSet) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut sep_rules = String::new();
    let mut nodeport_rules = String::new();
    chains.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for svc in &set.services {
        for (port_name, port, target) in &svc.ports {
            let svc_c = svc_chain(svc, port_name);
            let id = format!("{NS}/{}:{port_name}", svc.name);
            let _ = writeln!(chains, ":{svc_c} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -m comment --comment \"{id} cluster IP\" -m tcp -p tcp -d {}/32 --dport {port} -j {svc_c}",
                svc.cluster_ip
            );
            let _ = writeln!(
                rules,
                "-A {svc_c} -m comment --comment \"{id} cluster IP\" -m tcp -p tcp -d {}/32 --dport {port} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
                svc.cluster_ip
            );
            // The nodePort belongs to the first port (see `Svc::node_port`).
            if let Some(np) = svc.node_port.filter(|_| port_name == &svc.ports[0].0) {
                let ext_c = ext_chain(svc, port_name);
                let _ = writeln!(chains, ":{ext_c} - [0:0]");
                if !svc.endpoints.is_empty() {
                    let _ = writeln!(
                        nodeport_rules,
                        "-A KUBE-NODEPORTS -m comment --comment {id} -m tcp -p tcp --dport {np} -j {ext_c}"
                    );
                }
                let _ = writeln!(
                    nodeport_rules,
                    "-A {ext_c} -m comment --comment \"masquerade traffic for {id} external destinations\" -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(nodeport_rules, "-A {ext_c} -j {svc_c}");
            }
            let n = svc.endpoints.len();
            for (i, ep) in svc.endpoints.iter().enumerate() {
                let ep_s = format!("{ep}:{target}");
                let sep = sep_chain(svc, port_name, &ep_s);
                let _ = writeln!(chains, ":{sep} - [0:0]");
                if i + 1 < n {
                    let p = 1.0 / (n - i) as f64;
                    let _ = writeln!(
                        rules,
                        "-A {svc_c} -m comment --comment \"{id} -> {ep_s}\" -m statistic --mode random --probability {p:.10} -j {sep}"
                    );
                } else {
                    let _ = writeln!(
                        rules,
                        "-A {svc_c} -m comment --comment \"{id} -> {ep_s}\" -j {sep}"
                    );
                }
                let _ = writeln!(
                    sep_rules,
                    "-A {sep} -m comment --comment {id} -s {ep}/32 -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(sep_rules, "-A {sep} -m comment --comment {id} -m tcp -p tcp -j DNAT --to-destination {ep_s}");
            }
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" \
         -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    let mut out = chains;
    out.push_str(&rules);
    out.push_str(&nodeport_rules);
    out.push_str(&sep_rules);
    out.push_str("COMMIT\n");
    out
}

/// An empty nat table: restoring it removes every rule and chain `render` created.
pub fn empty() -> &'static str {
    "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;

    #[test]
    fn kube_proxy_shape_with_the_probe_last() {
        let set = ServiceSet::generate(&spec(3));
        let text = render(&set);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        // One KUBE-SERVICES rule per Service port, in order, probe last, then the NodePort rule.
        let svc_rules: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(svc_rules.len(), 2 + 2 + 1);
        assert!(svc_rules[0].contains("-d 10.96.0.10/32 --dport 80"));
        assert!(svc_rules[3].contains("-d 10.96.0.12/32 --dport 5001"));
        assert!(svc_rules[4].contains("KUBE-NODEPORTS"));
        // Every jumped-to chain is declared; every declared chain is used.
        for l in lines.iter().filter(|l| l.starts_with("-A ")) {
            let chain = l.split_whitespace().nth(1).unwrap();
            assert!(
                lines.contains(&format!(":{chain} - [0:0]").as_str())
                    || lines
                        .iter()
                        .any(|d| d.starts_with(&format!(":{chain} ACCEPT"))),
                "{chain}"
            );
        }
        // Random selection: 1/3, 1/2, then unconditional.
        let probe_sel: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains("svc-000002:http -> ") && l.starts_with("-A KUBE-SVC-"))
            .collect();
        assert_eq!(probe_sel.len(), 2);
        assert!(
            probe_sel[0].contains("--probability 0.5000000000"),
            "{}",
            probe_sel[0]
        );
        assert!(!probe_sel[1].contains("statistic"));
        let first_sel: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains("svc-000000:http -> ") && l.starts_with("-A KUBE-SVC-"))
            .collect();
        assert!(first_sel[0].contains("--probability 0.3333333333"));
        // DNAT to the real pods for the probe, target port kept for the extra port.
        assert!(text.contains("-j DNAT --to-destination 10.244.1.10:8080"));
        assert!(text.contains("-j DNAT --to-destination 10.244.1.11:5001"));
        assert_eq!(text.matches("-j DNAT").count(), set.endpoint_count());
        // No NodePort Service, no KUBE-NODEPORTS rule (the chain and the jump to it stay).
        assert!(!text.contains("-A KUBE-NODEPORTS"));
        assert!(!text.contains("KUBE-EXT-"));
    }

    #[test]
    fn nodeports_jump_to_an_external_chain_that_masquerades() {
        let set = ServiceSet::generate(&super::super::tests::spec_ext(3));
        let text = render(&set);
        let lines: Vec<&str> = text.lines().collect();
        let np: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-NODEPORTS"))
            .collect();
        assert_eq!(np.len(), 2);
        assert!(
            np[0].contains("-m tcp -p tcp --dport 30080 -j KUBE-EXT-"),
            "{}",
            np[0]
        );
        assert!(np[1].contains("--dport 30081"), "{}", np[1]);
        let local = set.nodeport_local().unwrap();
        let (ext_c, svc_c) = (ext_chain(local, "http"), svc_chain(local, "http"));
        let ext_rules: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("-A {ext_c} ")))
            .collect();
        assert_eq!(ext_rules.len(), 2);
        assert!(
            ext_rules[0].ends_with("-j KUBE-MARK-MASQ"),
            "{}",
            ext_rules[0]
        );
        assert!(
            ext_rules[1].ends_with(&format!("-j {svc_c}")),
            "{}",
            ext_rules[1]
        );
        assert!(lines.contains(&format!(":{ext_c} - [0:0]").as_str()));
        // The NodePort Services' ClusterIP rules are in KUBE-SERVICES too, before the
        // KUBE-NODEPORTS jump, which stays last.
        let svc_rules: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(svc_rules.len(), 2 + 1 + 1 + 2 + 1);
        assert!(svc_rules.last().unwrap().contains("KUBE-NODEPORTS"));
        assert!(text.contains("-j DNAT --to-destination 10.244.2.11:8080"));
        // Masquerade happens in POSTROUTING for marked packets.
        assert!(text.contains("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"));
    }
}
