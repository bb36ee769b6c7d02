//! Connection rate, latency and stream throughput from a client pod to the last of N Services,
//! for each mode on its own fresh bed: no translation (straight to a pod), xlb, and the three
//! kube-proxy shapes. While xlb runs at the largest size, the endpoint-change latency is measured
//! on the same agent (see [`crate::control::endpoint_changes`]).
//!
//! The external path is measured on the same bed, rules and agent, right after each ClusterIP
//! point: connection rate from the external client to node1's NodePort, for a Service whose pods
//! run on node1 (local backend) and one whose pods run on node2 (remote backend; xlb and
//! netfilter SNAT those flows to node1's address), next to the external client connecting to
//! the pod itself through node1 (no translation). xlb runs from_net as the agent's default on a
//! veth uplink does (`--xdp-mode auto`: tc only), and in further agent runs at the same size in
//! the other `--xdp-mode`s of the plan (native and generic XDP).
//!
//! Socket load balancing (issue 11) has a bed of its own ([`Mode::XlbSocket`]): at each size a
//! fresh agent with `--socket-lb all` translates the client pod's sockets at connect time (no
//! per-packet NAT, no conntrack), then one with `--socket-lb host` serves a host-network client
//! in node1's namespace ([`XLB_SOCKLB_HOST`], next to that client connecting to the pod itself,
//! [`DIRECT_HOST`], measured on the direct bed). The programs are attached to a dedicated child
//! cgroup that holds the benchmark process only while those rows are measured
//! ([`crate::socklb`]); the datapath's `sock_translated` counter must account for every
//! connection, so a row can never silently measure the tc path.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::bed::{Backend, Bed};
use crate::control::{endpoint_changes, ChangeResults};
use crate::netfilter::{Installed, NfMode};
use crate::rules::{xlb_dir, ServiceSet, SERVICE_PORT};
use crate::socklb::BenchCgroup;
use crate::traffic::{conn_rate, request, stream, ConnResult, SINK_PORT};
use lb_testkit::{NetNs, SocketLb};

/// What translates the client's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No translation: the client connects to a pod IP.
    Direct,
    /// xlb's tc path (`--socket-lb off`): from_pod / to_pod translate every packet.
    Xlb,
    /// xlb's socket load balancing: `--socket-lb all` for the client pod, and `--socket-lb
    /// host` for a host-network client ([`XLB_SOCKLB_HOST`]).
    XlbSocket,
    Netfilter(NfMode),
}

impl Mode {
    pub fn all() -> Vec<Mode> {
        let mut v = vec![Mode::Direct, Mode::Xlb, Mode::XlbSocket];
        v.extend(NfMode::ALL.map(Mode::Netfilter));
        v
    }
    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Xlb => "xlb",
            Mode::XlbSocket => "xlb-socklb",
            Mode::Netfilter(m) => m.label(),
        }
    }
}

/// The rows of a host-network client (node1's namespace): to a pod directly...
pub const DIRECT_HOST: &str = "direct-host";
/// ...and to the ClusterIP through `--socket-lb host`.
pub const XLB_SOCKLB_HOST: &str = "xlb-socklb-host";

/// Every label of the ClusterIP rows, in table and plot order.
pub fn row_labels() -> Vec<&'static str> {
    let mut v = vec![Mode::Direct.label(), DIRECT_HOST];
    v.extend([Mode::Xlb, Mode::XlbSocket].map(Mode::label));
    v.push(XLB_SOCKLB_HOST);
    v.extend(NfMode::ALL.map(NfMode::label));
    v
}

/// The no-translation row a ClusterIP row is compared with: the same client to a pod.
pub fn baseline_of(label: &str) -> &'static str {
    if label == DIRECT_HOST || label == XLB_SOCKLB_HOST {
        DIRECT_HOST
    } else {
        Mode::Direct.label()
    }
}

/// How xlb's agent runs from_net on the node's uplink (`--xdp-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Native,
    Generic,
    /// tc ingress only.
    Off,
}

impl XdpMode {
    /// The agent's default first: on this bed's veth uplink `--xdp-mode auto` runs tc only.
    pub const ALL: [XdpMode; 3] = [XdpMode::Off, XdpMode::Native, XdpMode::Generic];
    pub fn arg(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
            XdpMode::Off => "off",
        }
    }
    /// The mode label of external rows: plain "xlb" is the agent's default on this bed
    /// (`--xdp-mode auto`, which is tc only on a veth uplink).
    pub fn label(self) -> &'static str {
        match self {
            XdpMode::Native => "xlb-native-xdp",
            XdpMode::Generic => "xlb-generic",
            XdpMode::Off => "xlb",
        }
    }
}

/// Every mode label of the external rows, in table order.
pub fn external_labels() -> Vec<&'static str> {
    let mut v = vec![Mode::Direct.label()];
    v.extend(XdpMode::ALL.map(XdpMode::label));
    v.extend(NfMode::ALL.map(NfMode::label));
    v
}

/// What to measure and for how long.
#[derive(Clone, Copy, Debug)]
pub struct DpPlan {
    pub sizes: &'static [usize],
    pub point: Duration,
    pub max_requests: usize,
    pub stream: Duration,
    pub endpoint_changes: usize,
    /// The xlb agent's `--xdp-mode`s measured on the external path; the first one is the
    /// agent of the ClusterIP rows too.
    pub xdp_modes: &'static [XdpMode],
}

impl DpPlan {
    /// Progress steps of [`run`].
    pub fn steps(&self) -> usize {
        let modes = Mode::all().len();
        // A ClusterIP point and an external point per mode and size (for the socket-LB bed:
        // the pod and the host-network client's points), the extra xlb agents' external
        // points, the endpoint changes.
        self.sizes.len() * (2 * modes + self.xdp_modes.len().saturating_sub(1)) + 1
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DpRow {
    pub mode: String,
    pub services: usize,
    #[serde(flatten)]
    pub conn: ConnResult,
    /// Time to install the rules / to get the agent ready for this size, seconds.
    pub setup_s: f64,
    /// xlb only: the agent's resident memory once ready.
    pub agent_rss_mib: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamRow {
    pub mode: String,
    pub services: usize,
    pub gbit_s: f64,
}

/// Connections from the external client to node1's NodePort (or, for "direct", to the pod).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExtRow {
    pub mode: String,
    /// "local" (the pod runs on node1) or "remote" (on node2).
    pub backend: String,
    pub services: usize,
    #[serde(flatten)]
    pub conn: ConnResult,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DpResults {
    pub rows: Vec<DpRow>,
    /// The external path (absent in results from before it existed).
    #[serde(default)]
    pub external: Vec<ExtRow>,
    pub streams: Vec<StreamRow>,
    pub endpoint_change: Option<ChangeResults>,
    /// Modes that failed, with the reason (the run goes on with the others).
    pub errors: Vec<String>,
}

/// Run every mode; `progress` is told after each measured point.
pub fn run(plan: &DpPlan, mut progress: impl FnMut(&str)) -> anyhow::Result<DpResults> {
    let mut res = DpResults::default();
    for mode in Mode::all() {
        let outcome = run_mode(mode, plan, &mut res, &mut progress);
        crate::interrupt::check()?;
        if let Err(e) = outcome {
            let msg = format!("{}: {e:#}", mode.label());
            eprintln!("datapath benchmark failed for {msg}");
            res.errors.push(msg);
        }
    }
    Ok(res)
}

fn run_mode(
    mode: Mode,
    plan: &DpPlan,
    res: &mut DpResults,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<()> {
    let bed = Bed::new()?;
    // After the bed, so dropped before it (the agents are stopped inside the loop).
    let cgroup = match mode {
        Mode::XlbSocket => Some(BenchCgroup::create(&crate::bed::unique_prefix())?),
        _ => None,
    };
    let largest = plan.sizes.iter().copied().max().unwrap_or(1);
    for &n in plan.sizes {
        let set = ServiceSet::generate(&bed.set_spec(n));
        let probe = set.probe();
        let svc: SocketAddr = SocketAddrV4::new(probe.cluster_ip, SERVICE_PORT).into();
        let svc_stream: SocketAddr = SocketAddrV4::new(probe.cluster_ip, SINK_PORT).into();
        let names: Vec<&str> = bed.backends[..3].iter().map(|p| p.name.as_str()).collect();
        // From `client` (a namespace): the translated path must reach one of the probe's pods
        // before it is timed.
        let measure_from = |client: &NetNs, target: SocketAddr| -> anyhow::Result<ConnResult> {
            let greeting = client
                .run(|| request(target))?
                .with_context(|| format!("first request to {target}"))?;
            if !names.contains(&greeting.as_str()) {
                bail!("{target} answered {greeting:?}, not one of {names:?}");
            }
            conn_rate(client, target, plan.point, plan.max_requests)
        };
        let measure = |target: SocketAddr| measure_from(&bed.client.ns, target);
        let row_as = |res: &mut DpResults,
                      label: &str,
                      progress: &mut dyn FnMut(&str),
                      conn: ConnResult,
                      setup_s: f64,
                      rss: Option<f64>| {
            res.rows.push(DpRow {
                mode: label.into(),
                services: n,
                conn,
                setup_s,
                agent_rss_mib: rss,
            });
            progress(&format!("{label} at {n} Services"));
        };
        let row = |res: &mut DpResults,
                   progress: &mut dyn FnMut(&str),
                   conn: ConnResult,
                   setup_s: f64,
                   rss: Option<f64>| {
            row_as(res, mode.label(), progress, conn, setup_s, rss)
        };
        // The external rows of `label`: `target(backend)` is what the external client dials.
        // A failure is recorded and the run goes on (the ClusterIP rows do not depend on it).
        let external = |res: &mut DpResults,
                        label: &str,
                        progress: &mut dyn FnMut(&str),
                        target: &dyn Fn(Backend) -> SocketAddr| {
            for backend in Backend::ALL {
                match measure_external(&bed, plan, backend, target(backend)) {
                    Ok(conn) => res.external.push(ExtRow {
                        mode: label.into(),
                        backend: backend.label().into(),
                        services: n,
                        conn,
                    }),
                    Err(e) => {
                        let msg = format!(
                            "{label} NodePort, {} backend, at {n} Services: {e:#}",
                            backend.label()
                        );
                        eprintln!("datapath benchmark failed for {msg}");
                        res.errors.push(msg);
                    }
                }
            }
            progress(&format!("{label} NodePort at {n} Services"));
        };
        let nodeport = |b| bed.nodeport(b);
        match mode {
            Mode::Direct => {
                let conn = measure(bed.direct(0))?;
                row(res, progress, conn, 0.0, None);
                // The host-network client's baseline (no progress step of its own).
                match measure_from(bed.node(), bed.direct(0)) {
                    Ok(conn) => res.rows.push(DpRow {
                        mode: DIRECT_HOST.into(),
                        services: n,
                        conn,
                        setup_s: 0.0,
                        agent_rss_mib: None,
                    }),
                    Err(e) => res
                        .errors
                        .push(format!("{DIRECT_HOST} at {n} Services: {e:#}")),
                }
                external(res, mode.label(), progress, &|b| bed.direct_external(b));
                if n == largest {
                    let direct = SocketAddrV4::new(bed.backends[0].ip, SINK_PORT).into();
                    stream_row(&bed, plan, mode, n, direct, res)?;
                }
            }
            Mode::Xlb => {
                let dir = bed.scratch().join(format!("manifests-{n}"));
                let probe_file = xlb_dir::write_all(&set, &dir)?;
                let first = plan.xdp_modes.first().copied().unwrap_or(XdpMode::Native);
                let agent = bed.start_agent(&dir, Duration::from_secs(300), first.arg())?;
                let conn = measure(svc)?;
                row(
                    res,
                    progress,
                    conn,
                    agent.ready_after.as_secs_f64(),
                    agent.rss_mib(),
                );
                external(res, first.label(), progress, &nodeport);
                if n == largest {
                    stream_row(&bed, plan, mode, n, svc_stream, res)?;
                    if plan.endpoint_changes > 0 {
                        let ch = endpoint_changes(&bed, &set, &probe_file, plan.endpoint_changes)?;
                        res.endpoint_change = Some(ch);
                        progress("endpoint changes");
                    }
                }
                drop(agent);
                // The other XDP modes: a fresh agent each (cleanup detaches the previous one).
                for &xdp in plan.xdp_modes.iter().skip(1) {
                    match bed.start_agent(&dir, Duration::from_secs(300), xdp.arg()) {
                        Ok(agent) => {
                            external(res, xdp.label(), progress, &nodeport);
                            drop(agent);
                        }
                        Err(e) => {
                            crate::interrupt::check()?;
                            res.errors
                                .push(format!("{} at {n} Services: {e:#}", xdp.label()));
                            progress(&format!("{} at {n} Services", xdp.label()));
                        }
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
            Mode::XlbSocket => {
                let cg = cgroup.as_ref().expect("created for this mode");
                let dir = bed.scratch().join(format!("manifests-{n}"));
                xlb_dir::write_all(&set, &dir)?;
                let xdp = plan.xdp_modes.first().copied().unwrap_or(XdpMode::Native);
                // Pods' sockets, translated at connect time.
                let agent = bed.start_agent_socklb(
                    &dir,
                    Duration::from_secs(300),
                    xdp.arg(),
                    SocketLb::All(cg.path().to_path_buf()),
                )?;
                let conn = through_sockets(&bed, cg, || measure(svc))?;
                row(
                    res,
                    progress,
                    conn,
                    agent.ready_after.as_secs_f64(),
                    agent.rss_mib(),
                );
                drop(agent);
                // A host-network client in node1's namespace (`--socket-lb host`, the default).
                let host = bed
                    .start_agent_socklb(
                        &dir,
                        Duration::from_secs(300),
                        xdp.arg(),
                        SocketLb::Host(cg.path().to_path_buf()),
                    )
                    .and_then(|agent| {
                        let conn = through_sockets(&bed, cg, || measure_from(bed.node(), svc))?;
                        Ok((conn, agent))
                    });
                match host {
                    Ok((conn, agent)) => {
                        let (setup, rss) = (agent.ready_after.as_secs_f64(), agent.rss_mib());
                        drop(agent);
                        row_as(res, XLB_SOCKLB_HOST, progress, conn, setup, rss);
                    }
                    Err(e) => {
                        crate::interrupt::check()?;
                        res.errors
                            .push(format!("{XLB_SOCKLB_HOST} at {n} Services: {e:#}"));
                        progress(&format!("{XLB_SOCKLB_HOST} at {n} Services"));
                    }
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
            Mode::Netfilter(m) => {
                let rules = Installed::apply(bed.node().name(), m, &m.render(&set))?;
                conntrack_friendly(&bed);
                let conn = measure(svc)?;
                row(res, progress, conn, rules.took.as_secs_f64(), None);
                external(res, mode.label(), progress, &nodeport);
                if n == largest {
                    stream_row(&bed, plan, mode, n, svc_stream, res)?;
                }
                drop(rules);
            }
        }
        crate::interrupt::check()?;
    }
    Ok(())
}

/// Run `measure` with this process inside the socket-LB cgroup `cg` (its client sockets are
/// created there), and check that the agent's socket programs translated every connection it
/// made (`sock_translated`), so the row is the socket path and not the tc path.
fn through_sockets(
    bed: &Bed,
    cg: &BenchCgroup,
    measure: impl FnOnce() -> anyhow::Result<ConnResult>,
) -> anyhow::Result<ConnResult> {
    let before = sock_translated(bed)?;
    let conn = {
        let _inside = cg.enter()?;
        measure()?
    };
    let translated = sock_translated(bed)? - before;
    if translated < conn.requests as u64 {
        bail!(
            "sock_translated rose by {translated} over {} connections: the sockets were not \
             translated at connect time",
            conn.requests
        );
    }
    Ok(conn)
}

/// The datapath's `sock_translated` counter of node1's agent.
fn sock_translated(bed: &Bed) -> anyhow::Result<u64> {
    let maps = lb_userspace::datapath::PinnedMaps::open(&bed.pin_path())
        .context("opening the agent's maps")?;
    Ok(maps
        .stats()?
        .into_iter()
        .find(|(s, _)| *s == lb_common::Stat::SockTranslated)
        .map_or(0, |(_, v)| v))
}

/// Connection rate from the external client to `target`, which must first answer with the name
/// of one of the pods behind `backend`'s NodePort Service.
fn measure_external(
    bed: &Bed,
    plan: &DpPlan,
    backend: Backend,
    target: SocketAddr,
) -> anyhow::Result<ConnResult> {
    let names: Vec<&str> = bed
        .external_pods(backend)
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let greeting = bed
        .external()
        .run(|| request(target))?
        .with_context(|| format!("first request from the external client to {target}"))?;
    if !names.contains(&greeting.as_str()) {
        bail!("{target} answered {greeting:?}, not one of {names:?}");
    }
    conn_rate(bed.external(), target, plan.point, plan.max_requests)
        .with_context(|| format!("{} backend via {target}", backend.label()))
}

/// One long TCP stream from the client to `target`, recorded for `mode` at `n` Services.
fn stream_row(
    bed: &Bed,
    plan: &DpPlan,
    mode: Mode,
    n: usize,
    target: SocketAddr,
    res: &mut DpResults,
) -> anyhow::Result<()> {
    let gbit = stream(&bed.client.ns, target, plan.stream)?;
    res.streams.push(StreamRow {
        mode: mode.label().into(),
        services: n,
        gbit_s: gbit,
    });
    Ok(())
}

/// Connections closed with RST leave conntrack entries in CLOSE (10 s by default): shorten that
/// in the node namespace so thousands of short connections per second do not fill the table.
/// The sysctls exist once conntrack is active in the namespace, i.e. after the rules are in.
fn conntrack_friendly(bed: &Bed) {
    for (key, value) in [
        ("net.netfilter.nf_conntrack_tcp_timeout_close", "1"),
        ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1"),
    ] {
        if let Err(e) = bed.node().sysctl(key, value) {
            tracing::debug!(key, error = %e, "conntrack sysctl");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket-LB rows end to end at one Service: the client pod through `--socket-lb all`
    /// and a host-network client through `--socket-lb host`, every connection translated at
    /// connect time (checked by [`through_sockets`]); the cgroup is gone afterwards and the
    /// process back where it was.
    #[test]
    #[ignore = "needs root"]
    fn socket_lb_rows_translate_every_connection_and_leave_no_cgroup() {
        let _serial = crate::root_test();
        let bed = Bed::new().unwrap();
        let set = ServiceSet::generate(&bed.set_spec(1));
        let dir = bed.scratch().join("manifests");
        xlb_dir::write_all(&set, &dir).unwrap();
        let probe = set.probe();
        let svc: SocketAddr = SocketAddrV4::new(probe.cluster_ip, SERVICE_PORT).into();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let path;
        {
            let cg = BenchCgroup::create(&crate::bed::unique_prefix()).unwrap();
            path = cg.path().to_path_buf();
            for (lb, client) in [
                (SocketLb::All(path.clone()), &bed.client.ns),
                (SocketLb::Host(path.clone()), bed.node()),
            ] {
                let agent = bed
                    .start_agent_socklb(&dir, Duration::from_secs(30), "native", lb.clone())
                    .unwrap();
                let r = through_sockets(&bed, &cg, || {
                    conn_rate(client, svc, Duration::from_millis(300), 2_000)
                })
                .unwrap();
                eprintln!("{lb:?}: {:.0} conn/s, {} errors", r.conns_per_s, r.errors);
                assert!(r.requests > 50 && r.errors == 0, "{r:?}");
                drop(agent);
            }
            // Outside the cgroup the socket programs see nothing: the tc path (off) would
            // translate the pod's connections, so the check refuses them.
            let agent = bed
                .start_agent_socklb(&dir, Duration::from_secs(30), "native", SocketLb::Off)
                .unwrap();
            let err = through_sockets(&bed, &cg, || {
                conn_rate(&bed.client.ns, svc, Duration::from_millis(100), 200)
            })
            .unwrap_err();
            assert!(format!("{err:#}").contains("not translated"), "{err:#}");
            drop(agent);
        }
        assert!(!path.exists(), "{} left behind", path.display());
        assert_eq!(std::fs::read_to_string("/proc/self/cgroup").unwrap(), own);
    }

    /// The external bed end to end with xlb, from_net in native XDP and in tc: both NodePort
    /// Services answer the external client (remote flows SNATed by node1), and a burst of
    /// connections costs no datapath drop. Prints the datapath counters (cumulative per agent).
    #[test]
    #[ignore = "needs root"]
    fn external_bed_with_xlb_serves_both_nodeports_without_drops() {
        let _serial = crate::root_test();
        let plan = DpPlan {
            sizes: &[1],
            point: Duration::from_millis(500),
            // Few enough that the SNAT ports of a backend stay mostly free (a run of taken
            // ports longer than the datapath's tries is dropped as drop_snat_ports_exhausted).
            max_requests: 2_000,
            stream: Duration::ZERO,
            endpoint_changes: 0,
            xdp_modes: &[XdpMode::Native],
        };
        let bed = Bed::new().unwrap();
        let set = ServiceSet::generate(&bed.set_spec(1));
        let dir = bed.scratch().join("manifests");
        xlb_dir::write_all(&set, &dir).unwrap();
        for xdp in [XdpMode::Native, XdpMode::Off] {
            let agent = bed
                .start_agent(&dir, Duration::from_secs(30), xdp.arg())
                .unwrap();
            for backend in Backend::ALL {
                let r = measure_external(&bed, &plan, backend, bed.nodeport(backend)).unwrap();
                let maps = lb_userspace::datapath::PinnedMaps::open(&bed.pin_path()).unwrap();
                let stats: Vec<String> = maps
                    .stats()
                    .unwrap()
                    .into_iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(s, v)| format!("{s:?}={v}"))
                    .collect();
                eprintln!(
                    "{} {}: {:.0} conn/s, {} errors, p50 {:.0} µs, p99 {:.0} µs; {}",
                    xdp.label(),
                    backend.label(),
                    r.conns_per_s,
                    r.errors,
                    r.latency.p50_us,
                    r.latency.p99_us,
                    stats.join(" ")
                );
                assert!(r.requests > 100, "{r:?}");
                assert!(
                    !stats.iter().any(|s| s.starts_with("Drop")),
                    "drops: {stats:?}"
                );
            }
            drop(agent);
        }
    }
}
