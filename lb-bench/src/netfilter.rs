//! Installing and removing kube-proxy-shaped rule sets in a network namespace, timed.
//!
//! The tools run as child processes that entered only the target network namespace, so the rules
//! exist there alone and vanish with it. Removal is also done explicitly (and by a guard), so a
//! namespace reused for the next mode starts clean.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::rules::{iptables, nft, ServiceSet};

/// A kube-proxy backend as the benchmark installs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NfMode {
    /// kube-proxy iptables mode on the legacy (x_tables) backend.
    IptablesLegacy,
    /// kube-proxy iptables mode on the nf_tables backend (iptables-nft).
    IptablesNft,
    /// kube-proxy nftables mode.
    Nftables,
}

impl NfMode {
    pub const ALL: [NfMode; 3] = [
        NfMode::IptablesLegacy,
        NfMode::IptablesNft,
        NfMode::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            NfMode::IptablesLegacy => "iptables-legacy",
            NfMode::IptablesNft => "iptables-nft",
            NfMode::Nftables => "nftables",
        }
    }

    /// The rule text for `set`.
    pub fn render(self, set: &ServiceSet) -> String {
        match self {
            NfMode::IptablesLegacy | NfMode::IptablesNft => iptables::render(set),
            NfMode::Nftables => nft::render(set),
        }
    }

    /// Command and arguments that apply rule text read from stdin (`check`: validate only).
    fn tool(self, check: bool) -> (&'static str, Vec<&'static str>) {
        let mut args = vec![];
        let prog = match self {
            NfMode::IptablesLegacy => "iptables-legacy-restore",
            NfMode::IptablesNft => "iptables-nft-restore",
            NfMode::Nftables => "nft",
        };
        match self {
            NfMode::Nftables => {
                if check {
                    args.push("-c");
                }
                args.extend(["-f", "-"]);
            }
            _ => {
                // Wait for the xtables lock rather than fail when another run holds it.
                args.extend(["-w", "10"]);
                if check {
                    args.push("--test");
                }
            }
        }
        (prog, args)
    }

    fn removal(self) -> String {
        match self {
            NfMode::IptablesLegacy | NfMode::IptablesNft => iptables::empty().to_string(),
            NfMode::Nftables => nft::delete(),
        }
    }
}

/// Feed `text` to the mode's tool inside network namespace `netns`; returns the wall time.
fn run_tool(netns: &str, mode: NfMode, check: bool, text: &str) -> anyhow::Result<Duration> {
    let (prog, args) = mode.tool(check);
    let mut cmd = Command::new(prog);
    cmd.args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    // Spawned as the agent is (`netns::spawn_in`, no fork of this large process), so neither
    // side's time includes copying the benchmark's page tables.
    let mut child =
        lb_testkit::netns::spawn_in(netns, &mut cmd).with_context(|| format!("starting {prog}"))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Writing can fail early if the tool exits on a parse error: report the tool's own message.
    let write_result = stdin.write_all(text.as_bytes());
    drop(stdin);
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {prog}"))?;
    let elapsed = started.elapsed();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{prog} {args:?} in {netns} failed ({}): {}",
            out.status,
            stderr.lines().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    write_result.with_context(|| format!("writing rules to {prog}"))?;
    Ok(elapsed)
}

/// Validate `text` without applying it (`iptables-restore --test`, `nft -c`).
#[cfg(test)]
pub fn check(netns: &str, mode: NfMode, text: &str) -> anyhow::Result<()> {
    run_tool(netns, mode, true, text).map(|_| ())
}

/// Rules installed in a namespace; removed on drop.
pub struct Installed {
    netns: String,
    mode: NfMode,
    /// Wall time of the restore / `nft -f`.
    pub took: Duration,
}

impl Installed {
    /// Apply `text` (from [`NfMode::render`]) in `netns`, timing the tool.
    pub fn apply(netns: &str, mode: NfMode, text: &str) -> anyhow::Result<Self> {
        let took = run_tool(netns, mode, false, text)?;
        Ok(Installed {
            netns: netns.to_string(),
            mode,
            took,
        })
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Err(e) = run_tool(&self.netns, self.mode, false, &self.mode.removal()) {
            eprintln!(
                "removing {} rules in {}: {e:#}",
                self.mode.label(),
                self.netns
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{ExtraPort, SetSpec};

    fn set() -> ServiceSet {
        ServiceSet::generate(&SetSpec {
            services: 200,
            endpoints_per_service: 3,
            target_port: 8080,
            probe_endpoints: vec![std::net::Ipv4Addr::new(10, 244, 1, 10)],
            probe_extra_ports: vec![ExtraPort {
                name: "stream",
                port: 5001,
            }],
            external: Some(crate::rules::ExternalSpec {
                local_node_port: 30080,
                local_endpoints: vec![std::net::Ipv4Addr::new(10, 244, 1, 10)],
                remote_node_port: 30081,
                remote_endpoints: vec![std::net::Ipv4Addr::new(10, 244, 2, 10)],
            }),
        })
    }

    fn save(netns: &str, prog: &str, args: &[&str]) -> String {
        let mut cmd = lb_testkit::netns::command_in(netns, prog).unwrap();
        lb_testkit::netns::run_cmd(cmd.args(args)).unwrap()
    }

    /// The generated rule sets are accepted by the real tools, apply, and are removed again.
    #[test]
    #[ignore = "needs root"]
    fn generated_rules_check_apply_and_remove_in_a_throwaway_netns() {
        let _serial = crate::root_test();
        let set = set();
        let ns = lb_testkit::NetNs::create(&format!("xlbb{}-unit-nf", std::process::id())).unwrap();
        for mode in NfMode::ALL {
            let text = mode.render(&set);
            check(ns.name(), mode, &text).unwrap_or_else(|e| panic!("{}: {e:#}", mode.label()));
            // A broken rule is rejected by the same check (the check can fail).
            assert!(check(
                ns.name(),
                mode,
                &text
                    .replace("--dport 80 ", "--dport 80x ")
                    .replace("tcp dport 80 ", "tcp dport 80x ")
            )
            .is_err());
            let listing = |ns: &str| match mode {
                NfMode::IptablesLegacy => save(ns, "iptables-legacy-save", &["-t", "nat"]),
                NfMode::IptablesNft => save(ns, "iptables-nft-save", &["-t", "nat"]),
                NfMode::Nftables => save(ns, "nft", &["list", "ruleset"]),
            };
            {
                let installed = Installed::apply(ns.name(), mode, &text).unwrap();
                assert!(installed.took > Duration::ZERO);
                let now = listing(ns.name());
                assert!(
                    now.contains("10.244.1.10:8080"),
                    "{}: {}",
                    mode.label(),
                    &now[..now.len().min(400)]
                );
                // The NodePort rules are in too.
                assert!(
                    now.contains("30081") && now.contains("10.244.2.10:8080"),
                    "{}: no NodePort rules",
                    mode.label()
                );
            }
            let after = listing(ns.name());
            assert!(
                !after.contains("10.244.1.10"),
                "{} rules left: {after}",
                mode.label()
            );
        }
    }
}
