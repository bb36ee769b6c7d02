//! The demo (`cargo xtask run`) and the demo cluster (`cargo xtask cluster up|down`).
//!
//! Everything is named with [`PREFIX`] (namespaces, /sys/fs/bpf/xlbdemo pins) and kept under
//! [`STATE_DIR`] (manifests copy, agent logs), so `cluster down` and the Ctrl-C handler can remove
//! it without any other record. Pods run serve-hostname as separate processes (this binary's
//! hidden `serve-hostname` command) so a kept cluster keeps answering after xtask exits.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::IntoRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use lb_testkit::service_yaml::{self, ExampleService};
use lb_testkit::{agent, netns, wait_until, Agent, AgentSpec, Cluster, Pod};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

pub const PREFIX: &str = "xlbdemo-";
pub const STATE_DIR: &str = "/run/xlb-demo";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const REQUESTS: usize = 30;

/// The running demo cluster. Dropping it removes everything.
struct Demo {
    services: Vec<ExampleService>,
    manifests: PathBuf,
    agents: Vec<Agent>,
    client: Pod,
    pods: Vec<Pod>,
    cluster: Cluster,
}

pub fn run(keep: bool) -> Result<()> {
    teardown_on_signal();
    crate::setup::setup()?;
    crate::build::build_xlb()?;
    let demo = up()?;
    let result = show(&demo);
    if keep && result.is_ok() {
        demo.keep();
        print_poke_help();
        return Ok(());
    }
    drop(demo);
    cluster_down()?;
    result
}

pub fn cluster_up() -> Result<()> {
    teardown_on_signal();
    crate::setup::setup()?;
    crate::build::build_xlb()?;
    let demo = up()?;
    for s in &demo.services {
        let mut fes = frontends(s);
        fes.extend(node_port_frontends(s, &demo.cluster));
        println!("{:<28} {}", s.name, fes.join(" "));
    }
    demo.keep();
    print_poke_help();
    Ok(())
}

pub fn cluster_down() -> Result<()> {
    for r in lb_testkit::remove_prefix(PREFIX) {
        println!("removed {r}");
    }
    if Path::new(STATE_DIR).exists() {
        std::fs::remove_dir_all(STATE_DIR).with_context(|| format!("removing {STATE_DIR}"))?;
        println!("removed {STATE_DIR}");
    }
    Ok(())
}

/// Write end of the self-pipe the signal handler writes to.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; the buffer is a static byte.
    unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
}

/// Ctrl-C / SIGTERM: remove the demo cluster, then exit. The handler only writes to a pipe; a
/// thread reading it does the teardown outside signal context. (Blocking the signals and using
/// sigwait would be simpler, but children inherit the signal mask: agents and cargo would then
/// ignore SIGTERM / Ctrl-C.)
fn teardown_on_signal() {
    let Ok((rx, tx)) = nix::unistd::pipe() else {
        return;
    };
    SIGNAL_PIPE.store(tx.into_raw_fd(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only calls write(2).
        if unsafe { sigaction(sig, &action) }.is_err() {
            return;
        }
    }
    std::thread::spawn(move || {
        let mut rx = std::fs::File::from(rx);
        let mut buf = [0u8; 1];
        if std::io::Read::read(&mut rx, &mut buf).is_ok_and(|n| n == 1) {
            eprintln!("\ninterrupted: removing the demo cluster");
            let _ = cluster_down();
            std::process::exit(130);
        }
    });
}

fn up() -> Result<Demo> {
    cluster_down()?;
    let manifests = Path::new(STATE_DIR).join("manifests");
    service_yaml::copy_dir(&service_yaml::examples_dir(), &manifests)?;
    let services = service_yaml::load_examples(&manifests)?;
    println!(
        "cluster: 2 nodes, {} example Services from examples/",
        services.len()
    );

    let cluster = Cluster::new(PREFIX, 2)?;
    let mut pods = Vec::new();
    for s in &services {
        for p in &s.pods {
            let pod = cluster.add_pod(p.node, &p.name, p.ip)?;
            spawn_server(&pod, &p.tcp_ports, &p.udp_ports)?;
            pods.push(pod);
        }
    }
    let client = cluster.add_pod(1, "client", CLIENT_IP)?;
    for (pod, p) in pods.iter().zip(services.iter().flat_map(|s| &s.pods)) {
        if let Some(&port) = p.tcp_ports.first() {
            let target = SocketAddr::from((pod.ip, port));
            if !wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
                client.tcp_request(target).is_ok()
            }) {
                bail!("pod {} does not answer on {target}", pod.name);
            }
        }
    }
    println!(
        "cluster: {} pods serving, client pod {CLIENT_IP} on node1",
        pods.len()
    );

    let mut agents = Vec::new();
    for node in &cluster.nodes {
        let log = Path::new(STATE_DIR).join(format!("{}.log", node.name));
        let mut spec = AgentSpec::new(&node.ns, &manifests, &node.pin_path(), &log);
        spec.detach = true;
        // As on a real node: its name (which endpoints are local: no SNAT to them from
        // outside) and the uplink where the external client's traffic arrives.
        spec.node_name = Some(node.name.clone());
        spec.devices = Some("eth0".into());
        // The examples' ClusterIPs are in kubeadm's default Service CIDR: an unused one is refused.
        spec.extra_args = vec!["--service-cidr".into(), "10.96.0.0/12".into()];
        agents.push(Agent::start(spec).with_context(|| format!("agent on {}", node.name))?);
        println!(
            "agent: {} ready (pins {}, log {})",
            node.name,
            node.pin_path().display(),
            log.display()
        );
    }
    Ok(Demo {
        services,
        manifests,
        agents,
        client,
        pods,
        cluster,
    })
}

/// serve-hostname as a process in the pod's namespace, in its own session (survives xtask).
fn spawn_server(pod: &Pod, tcp: &[u16], udp: &[u16]) -> Result<()> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut cmd: Command = netns::command_in(pod.ns.name(), exe)?;
    cmd.args(["serve-hostname", "--name", &pod.name]);
    for p in tcp {
        cmd.args(["--tcp", &p.to_string()]);
    }
    for p in udp {
        cmd.args(["--udp", &p.to_string()]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let _ = nix::unistd::setsid();
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting serve-hostname in {}", pod.name))?;
    Ok(())
}

fn frontends(s: &ExampleService) -> Vec<String> {
    s.ports
        .iter()
        .map(|(port, proto)| format!("{}:{port}/{proto}", s.cluster_ip))
        .collect()
}

/// The NodePorts of `s` on every node address, as the external client reaches them.
fn node_port_frontends(s: &ExampleService, cluster: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for np in &s.node_ports {
        for node in &cluster.nodes {
            out.push(format!("{}:{np}/TCP", node.ip));
        }
    }
    out
}

impl Demo {
    fn node1_pin(&self) -> PathBuf {
        self.cluster.node(1).pin_path()
    }

    /// Leave everything running: forget the guards.
    fn keep(self) {
        let Demo {
            agents,
            client,
            pods,
            cluster,
            ..
        } = self;
        for a in agents {
            a.keep_running();
        }
        std::mem::forget(client);
        std::mem::forget(pods);
        std::mem::forget(cluster);
    }
}

fn show(demo: &Demo) -> Result<()> {
    for s in &demo.services {
        print_tally(demo, s)?;
    }
    // From outside the cluster: the NodePort tutorial's service-web through both nodes.
    for s in demo.services.iter().filter(|s| !s.node_ports.is_empty()) {
        print_node_port_tally(demo, s)?;
    }

    // Readiness: the endpoint controller would mark a failing pod not ready; do it by hand.
    let Some(hostnames) = demo.services.iter().find(|s| s.name == "hostnames") else {
        return Ok(());
    };
    let victim = &hostnames.pods[0];
    println!(
        "\nmarking {} ({}) not ready in {} ...",
        victim.name,
        victim.ip,
        hostnames
            .file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    );
    service_yaml::set_endpoint_ready(
        &demo.manifests.join(hostnames.file.file_name().unwrap()),
        victim.ip,
        false,
    )?;
    let frontend = frontends(hostnames)[0].clone();
    let gone = format!("{}:{}", victim.ip, victim.tcp_ports[0]);
    let removed = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        demo.cluster.nodes.iter().all(|n| {
            agent::inspect_services(&n.pin_path()).is_ok_and(|svcs| {
                agent::find_frontend(&svcs, &frontend)
                    .is_some_and(|f| !f.backend_addrs().contains(&gone))
            })
        })
    });
    if !removed {
        bail!("{gone} still a backend of {frontend} after 10 s");
    }
    println!("xlb inspect shows {gone} removed from {frontend} on both nodes");
    print_tally(demo, hostnames)?;

    println!(
        "\n$ xlb inspect services --pin-path {}",
        demo.node1_pin().display()
    );
    let out = Command::new(lb_testkit::xlb_bin()?)
        .args(["inspect", "services", "--pin-path"])
        .arg(demo.node1_pin())
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));

    // The flows the tallies made: each request's connection, closed, waiting out its short
    // closing lifetime before the agent's sweeper removes it.
    println!(
        "\n$ xlb inspect conntrack --pin-path {} | tail -1",
        demo.node1_pin().display()
    );
    let out = Command::new(lb_testkit::xlb_bin()?)
        .args(["inspect", "conntrack", "--pin-path"])
        .arg(demo.node1_pin())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{}", stdout.lines().last().unwrap_or_default());
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Call each frontend of `s` [`REQUESTS`] times from the client pod; print hits per pod.
fn print_tally(demo: &Demo, s: &ExampleService) -> Result<()> {
    for (port, proto) in &s.ports {
        let target = SocketAddr::from((s.cluster_ip, *port));
        let mut hits: BTreeMap<String, usize> =
            s.pods.iter().map(|p| (p.name.clone(), 0)).collect();
        for _ in 0..REQUESTS {
            let r = if proto == "UDP" {
                demo.client.udp_request(target)
            } else {
                demo.client.tcp_request(target)
            };
            *hits
                .entry(r.unwrap_or_else(|e| format!("<error: {e}>")))
                .or_default() += 1;
        }
        println!(
            "\n{} {}:{port}/{proto}: {REQUESTS} requests from pod client (node1)",
            s.name, s.cluster_ip
        );
        println!("  {:<40} {:<6} {:>4}", "answered by", "node", "hits");
        for (who, n) in &hits {
            let node = s
                .pods
                .iter()
                .find(|p| &p.name == who)
                .map(|p| format!("node{}", p.node))
                .unwrap_or_default();
            println!("  {who:<40} {node:<6} {n:>4}  {}", "#".repeat(*n));
        }
    }
    Ok(())
}

/// Call each NodePort of `s` through each node [`REQUESTS`] times from the external client's
/// namespace; print hits per pod and whether the pod was on the entry node (the flow is only
/// DNATed: the pod sees the client) or on the other node (DNATed and SNATed to the entry node,
/// whose answer comes back through it).
fn print_node_port_tally(demo: &Demo, s: &ExampleService) -> Result<()> {
    let ext = &demo.cluster.external;
    for np in &s.node_ports {
        for node in &demo.cluster.nodes {
            let target = SocketAddr::from((node.ip, *np));
            // The agents attach to eth0 and program the NodePort right after start; give the
            // first request a moment rather than failing the demo on a race.
            wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
                ext.tcp_request(target).is_ok()
            });
            let mut hits: BTreeMap<String, usize> =
                s.pods.iter().map(|p| (p.name.clone(), 0)).collect();
            for _ in 0..REQUESTS {
                let r = ext.tcp_request(target);
                *hits
                    .entry(r.unwrap_or_else(|e| format!("<error: {e}>")))
                    .or_default() += 1;
            }
            println!(
                "\n{} NodePort {target}/TCP: {REQUESTS} requests from the external client {} \
                 (netns {}) through {}",
                s.name,
                ext.addr,
                ext.ns.name(),
                node.name
            );
            println!(
                "  {:<40} {:<6} {:<34} {:>4}",
                "answered by", "node", "path", "hits"
            );
            for (who, n) in &hits {
                let pod = s.pods.iter().find(|p| &p.name == who);
                let (pod_node, path) = match pod {
                    Some(p) if p.node == node.index => {
                        (format!("node{}", p.node), "local: DNAT".to_string())
                    }
                    Some(p) => (
                        format!("node{}", p.node),
                        format!("remote: DNAT, SNAT to {}", node.ip),
                    ),
                    None => (String::new(), String::new()),
                };
                println!(
                    "  {who:<40} {pod_node:<6} {path:<34} {n:>4}  {}",
                    "#".repeat(*n)
                );
            }
            print_external_flows(node, ext.addr, target);
        }
    }
    Ok(())
}

/// Two of the external client's flows to `frontend` in `node`'s conntrack: one to a backend
/// on the node (DNAT only) and one SNATed to the node, as `xlb inspect conntrack` shows them.
fn print_external_flows(node: &lb_testkit::Node, client: Ipv4Addr, frontend: SocketAddr) {
    let Ok(ct) = agent::inspect_conntrack(&node.pin_path()) else {
        return;
    };
    let mine = |snat: bool| {
        ct.iter().find(|e| {
            e.dir == "forward"
                && e.saddr == client
                && SocketAddr::from((e.daddr, e.dport)) == frontend
                && e.snat.is_some() == snat
        })
    };
    println!(
        "  xlb inspect conntrack --pin-path {} (forward entries):",
        node.pin_path().display()
    );
    for e in [mine(false), mine(true)].into_iter().flatten() {
        let backend = e
            .nat_addr
            .map(|a| format!("{a}:{}", e.nat_port))
            .unwrap_or_default();
        let seen_as = match e.snat {
            Some((a, p)) => format!("the backend sees {a}:{p}"),
            None => format!("the backend sees {}:{}", e.saddr, e.sport),
        };
        println!(
            "    {}:{} -> {frontend}/{} => {backend:<16} {seen_as}",
            e.saddr, e.sport, e.proto
        );
    }
}

fn print_poke_help() {
    println!(
        "\nThe demo cluster is running (namespaces {PREFIX}*, pins /sys/fs/bpf/xlbdemo, logs {STATE_DIR}).\n\
         Try:\n  \
         ip netns exec {PREFIX}pod-client bash -c 'exec 3<>/dev/tcp/10.96.0.80/80; head -1 <&3'\n  \
         ip netns exec {PREFIX}pod-client bash -c 'for i in $(seq 6); do exec 3<>/dev/tcp/10.96.0.30/3000; head -1 <&3; done'\n  \
         ip netns exec {PREFIX}ext bash -c 'for i in $(seq 6); do exec 3<>/dev/tcp/172.31.0.12/30080; head -1 <&3; done'   (NodePort from outside)\n  \
         xlb inspect services --pin-path /sys/fs/bpf/xlbdemo/node1   (target/debug/xlb)\n  \
         edit {STATE_DIR}/manifests/*.yaml: the agents apply changes at once\n  \
         tail -f {STATE_DIR}/node1.log\n\
         Remove it with: cargo xtask cluster down"
    );
}
