//! Connection rate, latency and stream throughput from a client pod to the last of N Services,
//! for each mode on its own fresh bed: no translation (straight to a pod), xlb, and the three
//! kube-proxy shapes. While xlb runs at the largest size, the endpoint-change latency is measured
//! on the same agent (see [`crate::control::endpoint_changes`]).

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::bed::Bed;
use crate::control::{endpoint_changes, ChangeResults};
use crate::netfilter::{Installed, NfMode};
use crate::rules::{xlb_dir, ServiceSet, SERVICE_PORT};
use crate::traffic::{conn_rate, request, stream, ConnResult, SINK_PORT};

/// What translates the client's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No translation: the client connects to a pod IP.
    Direct,
    Xlb,
    Netfilter(NfMode),
}

impl Mode {
    pub fn all() -> Vec<Mode> {
        let mut v = vec![Mode::Direct, Mode::Xlb];
        v.extend(NfMode::ALL.map(Mode::Netfilter));
        v
    }
    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Xlb => "xlb",
            Mode::Netfilter(m) => m.label(),
        }
    }
}

/// What to measure and for how long.
#[derive(Clone, Copy, Debug)]
pub struct DpPlan {
    pub sizes: &'static [usize],
    pub point: Duration,
    pub max_requests: usize,
    pub stream: Duration,
    pub endpoint_changes: usize,
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

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DpResults {
    pub rows: Vec<DpRow>,
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
    let largest = plan.sizes.iter().copied().max().unwrap_or(1);
    for &n in plan.sizes {
        let set = ServiceSet::generate(&bed.set_spec(n));
        let probe = set.probe();
        let svc: SocketAddr = SocketAddrV4::new(probe.cluster_ip, SERVICE_PORT).into();
        let svc_stream: SocketAddr = SocketAddrV4::new(probe.cluster_ip, SINK_PORT).into();
        let names: Vec<&str> = bed.backends[..3].iter().map(|p| p.name.as_str()).collect();
        let measure = |target: SocketAddr| -> anyhow::Result<ConnResult> {
            // The translated path must reach one of the probe's pods before it is timed.
            let greeting = bed
                .client
                .ns
                .run(|| request(target))?
                .with_context(|| format!("first request to {target}"))?;
            if !names.contains(&greeting.as_str()) {
                bail!("{target} answered {greeting:?}, not one of {names:?}");
            }
            conn_rate(&bed.client.ns, target, plan.point, plan.max_requests)
        };
        let mut row = |conn: ConnResult, setup_s: f64, rss: Option<f64>| {
            res.rows.push(DpRow {
                mode: mode.label().into(),
                services: n,
                conn,
                setup_s,
                agent_rss_mib: rss,
            });
            progress(&format!("{} at {n} Services", mode.label()));
        };
        match mode {
            Mode::Direct => {
                let conn = measure(bed.direct(0))?;
                row(conn, 0.0, None);
                if n == largest {
                    let direct = SocketAddrV4::new(bed.backends[0].ip, SINK_PORT).into();
                    stream_row(&bed, plan, mode, n, direct, res)?;
                }
            }
            Mode::Xlb => {
                let dir = bed.scratch().join(format!("manifests-{n}"));
                let probe_file = xlb_dir::write_all(&set, &dir)?;
                let agent = bed.start_agent(&dir, Duration::from_secs(300))?;
                let conn = measure(svc)?;
                row(conn, agent.ready_after.as_secs_f64(), agent.rss_mib());
                if n == largest {
                    stream_row(&bed, plan, mode, n, svc_stream, res)?;
                    if plan.endpoint_changes > 0 {
                        let ch = endpoint_changes(&bed, &set, &probe_file, plan.endpoint_changes)?;
                        res.endpoint_change = Some(ch);
                        progress("endpoint changes");
                    }
                }
                drop(agent);
                let _ = std::fs::remove_dir_all(&dir);
            }
            Mode::Netfilter(m) => {
                let rules = Installed::apply(bed.node().name(), m, &m.render(&set))?;
                conntrack_friendly(&bed);
                let conn = measure(svc)?;
                row(conn, rules.took.as_secs_f64(), None);
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
