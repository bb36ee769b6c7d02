//! `xlb`: the agent, `inspect` and `cleanup`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_common::CtTimeouts;
use lb_userspace::agent::{self, AgentConfig};
use lb_userspace::ct_gc::GcConfig;
use lb_userspace::datapath::{self, MapSizes};
use lb_userspace::devices::{self, DeviceSelection, XdpMode};
use lb_userspace::inspect;
use lb_userspace::source::{self, SourceConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "xlb", version, about = "Kubernetes Service load balancer on eBPF (kube-proxy replacement)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: keep the BPF maps equal to the Services of a manifests directory or the API server.
    Agent(Box<AgentArgs>),
    /// Print the pinned maps (works whether or not the agent runs).
    Inspect {
        what: inspect::What,
        #[arg(long, default_value = "/sys/fs/bpf/xlb", env = "XLB_PIN_PATH")]
        pin_path: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: inspect::Output,
        /// Only this Service's frontends, backends or flows (NAMESPACE/NAME).
        #[arg(long, value_parser = inspect::Filter::parse_service)]
        service: Option<(String, String)>,
        /// Only this frontend (IP:PORT): its entries, its backends, the flows to it.
        #[arg(long)]
        frontend: Option<std::net::SocketAddrV4>,
        /// conntrack: only the flows of this client address.
        #[arg(long)]
        client: Option<std::net::Ipv4Addr>,
    },
    /// Detach every program xlb attached and remove its pinned maps and links.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/xlb", env = "XLB_PIN_PATH")]
        pin_path: PathBuf,
    },
    /// Where would this packet go? Runs it through the loaded programs and maps (BPF_PROG_TEST_RUN,
    /// a dry run that writes no map) and prints the verdict, Service, backend and rewritten headers.
    Trace(Box<TraceArgs>),
    /// Attached devices and cgroups, programs, map fill, agent health, other Service proxies.
    Status {
        #[arg(long, default_value = "/sys/fs/bpf/xlb", env = "XLB_PIN_PATH")]
        pin_path: PathBuf,
        /// The agent's health port (its --healthz-addr); "none": do not ask.
        #[arg(long, default_value = "127.0.0.1:10256")]
        healthz_addr: String,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: inspect::Output,
    },
}

#[derive(clap::Args)]
struct TraceArgs {
    /// The client: IP or IP:PORT (port 40000 when none is given).
    #[arg(long, value_parser = lb_userspace::trace::parse_src)]
    src: std::net::SocketAddrV4,
    /// The destination: IP:PORT (a ClusterIP, NodePort, ... or any address).
    #[arg(long, value_parser = lb_userspace::trace::parse_dst)]
    dst: std::net::SocketAddrV4,
    #[arg(long, value_enum, default_value = "tcp")]
    proto: lb_userspace::trace::Proto,
    /// TCP flags, comma-separated (default: syn, a new connection).
    #[arg(long, value_enum, value_delimiter = ',')]
    flags: Vec<lb_userspace::trace::TcpFlag>,
    /// The device the packet arrives on (a pod's host-side veth: from_pod; an external device:
    /// from_net). Default: the device the route to --src leaves through.
    #[arg(long)]
    device: Option<String>,
    /// The program to run, when the device does not say it.
    #[arg(long, value_enum)]
    hook: Option<lb_userspace::trace::TraceHook>,
    /// The agent's --service-cidr (default: read from the attached programs).
    #[arg(long, value_parser = parse_cidr)]
    service_cidr: Option<(std::net::Ipv4Addr, u8)>,
    #[arg(long, default_value = "/sys/fs/bpf/xlb", env = "XLB_PIN_PATH")]
    pin_path: PathBuf,
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: inspect::Output,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Directory of Service / EndpointSlice manifests (YAML), watched for changes.
    #[arg(long, conflicts_with = "kubeconfig", required_unless_present_any = ["kubeconfig", "in_cluster", "api_server"])]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API server with this kubeconfig.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Watch the Kubernetes API server with the in-cluster service account (DaemonSet).
    #[arg(long, conflicts_with = "manifests")]
    in_cluster: bool,
    /// The API server's own address, e.g. https://10.0.0.10:6443 (with the in-cluster service
    /// account's token and CA when mounted). Without it: KUBERNETES_SERVICE_HOST/PORT, whose
    /// default in a pod is the `kubernetes` Service's ClusterIP, which a node without kube-proxy
    /// reaches only once xlb runs. Replaces the server of --kubeconfig when both are given.
    #[arg(long, conflicts_with = "manifests", value_parser = api_server_url)]
    api_server: Option<String>,
    /// This node's name (Kubernetes source): selects its Node object and local endpoints.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/xlb", env = "XLB_PIN_PATH")]
    pin_path: PathBuf,
    /// Comma-separated globs of pod devices (host side of pod veths) to attach to.
    #[arg(long, default_value = "veth*,cali*,lxc*,xp*")]
    pod_devices: String,
    /// External devices, comma-separated names or globs (e.g. `eth0,bond*`), where traffic from
    /// outside the node (NodePort, LoadBalancer, externalIPs) is translated; `none` disables
    /// that. Default: the device of the IPv4 default route. Devices that appear later are
    /// attached then; their IPv4 addresses are node addresses (NodePort frontends).
    #[arg(long, value_parser = DeviceSelection::parse)]
    devices: Option<DeviceSelection>,
    /// How from_net runs on the external devices: native (driver) XDP, generic (skb) XDP, or
    /// off (tc ingress only). tc ingress is attached in every mode, behind XDP.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    xdp_mode: XdpMode,
    /// The cluster's NodePort range (the API server's --service-node-port-range), MIN-MAX: a
    /// nodePort outside it gets no frontend.
    #[arg(long, default_value = "30000-32767", value_parser = lb_model::cidr::parse_port_range)]
    nodeport_range: (u16, u16),
    /// Node addresses that serve NodePorts, as comma-separated IPv4 CIDRs (kube-proxy's
    /// --nodeport-addresses); default: every node address.
    #[arg(long, value_delimiter = ',', value_parser = lb_model::cidr::parse_v4)]
    nodeport_addresses: Vec<(std::net::Ipv4Addr, u8)>,
    /// Source ports, MIN-MAX, for flows from outside the node to a backend on another node
    /// (SNATed to the node's address). Keep it out of net.ipv4.ip_local_port_range and the
    /// NodePort range.
    #[arg(long, default_value = SNAT_PORTS_DEFAULT, value_parser = lb_model::cidr::parse_port_range)]
    snat_port_range: (u16, u16),
    /// Socket load balancing at the cgroup connect / sendmsg / recvmsg / getpeername hooks:
    /// `host` translates the sockets of the node's own network namespace (host-network
    /// processes: kubelet probes, hostNetwork pods, the node's tools), `all` pods' sockets too
    /// (their connected sockets get the backend at connect time), `off` none. Keep `host` with
    /// a service mesh that redirects at the socket layer (Istio ambient, sidecars): with `all`
    /// the mesh would see the backend's address instead of the Service's.
    #[arg(long, value_enum, default_value_t = datapath::SocketLb::Host)]
    socket_lb: datapath::SocketLb,
    /// The cgroup v2 directory the socket load balancing programs attach to: every process in
    /// it or below is covered. Default: the cgroup v2 root (/sys/fs/cgroup, or
    /// /sys/fs/cgroup/unified on hybrid hosts).
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// How new flows pick a backend (after session affinity): `random`, `round-robin` (the
    /// backends in turn, a per-CPU counter per frontend) or `maglev` (consistent hashing of the
    /// client address, port and protocol: every node picks the same backend for a client, and a
    /// backend change moves few clients). A Service's annotation `xlb.io/lb-algorithm` (same
    /// values) overrides it.
    #[arg(long, default_value = "random", value_parser = lb_model::Algorithm::parse)]
    lb_algorithm: lb_model::Algorithm,
    /// Entries per Maglev table (Maglev's M): a prime, much larger than a Service's backend
    /// count (16381; 65537 for Services with hundreds of backends).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_M, value_parser = maglev_table_size)]
    maglev_table_size: u32,
    /// Maglev tables the datapath has room for (4 x table size bytes each). Frontends with the
    /// same backends share a table; a frontend whose backends change needs a free one while it
    /// switches. Fewer than the table size.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_TABLES)]
    maglev_tables: u32,
    /// Service ports (namespace, name, port name) that get an id: their names are kept in a
    /// pinned map (`xlb inspect`) and their per-Service counters in per-CPU slots (64 bytes x
    /// CPUs each). Beyond it a Service port gets no name and no counters (logged and counted).
    /// At most 65535.
    #[arg(long, default_value_t = lb_common::DEFAULT_SVC_PORTS_MAX,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(lb_common::SVC_PORTS_LIMIT)))]
    service_ports_max: u32,
    /// Address for /metrics, /healthz and /readyz; "none" disables it.
    #[arg(long, default_value = "127.0.0.1:9477")]
    metrics_addr: String,
    /// kube-proxy's health port: /healthz and /livez with kube-proxy's semantics (200 while the
    /// maps are in sync, 503 once a change waited longer than --healthz-timeout), for load
    /// balancers probing nodes; "none" disables it.
    #[arg(long, default_value = lb_userspace::proxyhealth::DEFAULT_ADDR)]
    healthz_addr: String,
    /// Seconds a change may wait for the maps before /healthz and /livez say 503 (kube-proxy:
    /// twice its sync period).
    #[arg(long, default_value = "60", value_parser = seconds)]
    healthz_timeout: Duration,
    /// Skip Services labelled service.kubernetes.io/service-proxy-name with another value.
    #[arg(long, default_value = "xlb")]
    service_proxy_name: String,
    /// Capacity of the services map (entries: one per frontend plus one per backend slot).
    #[arg(long, default_value_t = lb_common::DEFAULT_SERVICES_MAX)]
    services_map_size: u32,
    /// Capacity of the backends map.
    #[arg(long, default_value_t = lb_common::DEFAULT_BACKENDS_MAX)]
    backends_map_size: u32,
    /// Capacity of the conntrack map (two entries per flow).
    #[arg(long, default_value_t = lb_common::DEFAULT_CONNTRACK_MAX)]
    conntrack_map_size: u32,
    /// Service CIDR (e.g. 10.96.0.0/12): connections to an address in it that no Service uses
    /// are refused at once (as kube-proxy's nftables mode does), not left to time out.
    #[arg(long, value_parser = parse_cidr)]
    service_cidr: Option<(std::net::Ipv4Addr, u8)>,
    /// Conntrack lifetime (seconds) of a TCP flow whose SYN got no answer yet.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_syn, value_parser = lifetime)]
    ct_timeout_tcp_syn: u32,
    /// Conntrack lifetime (seconds) of an established TCP flow, renewed by its packets.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_established, value_parser = lifetime)]
    ct_timeout_tcp_established: u32,
    /// Conntrack lifetime (seconds) of a TCP flow after a FIN from one side.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_fin_wait, value_parser = lifetime)]
    ct_timeout_tcp_fin_wait: u32,
    /// Conntrack lifetime (seconds) of a TCP flow after FINs from both sides or a RST.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.tcp_close, value_parser = lifetime)]
    ct_timeout_tcp_close: u32,
    /// Conntrack lifetime (seconds) of a UDP flow that got no reply yet.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.udp, value_parser = lifetime)]
    ct_timeout_udp: u32,
    /// Conntrack lifetime (seconds) of a UDP flow that got a reply.
    #[arg(long, default_value_t = CtTimeouts::DEFAULT.udp_stream, value_parser = lifetime)]
    ct_timeout_udp_stream: u32,
    /// Shortest time (seconds) between conntrack sweeps; the interval adapts within the bounds.
    #[arg(long, default_value = "1", value_parser = seconds)]
    ct_gc_min_interval: Duration,
    /// Longest time (seconds) between conntrack sweeps: an expired entry stays at most this long.
    #[arg(long, default_value = "30", value_parser = seconds)]
    ct_gc_max_interval: Duration,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

/// `--snat-port-range`'s default, [`lb_common::DEFAULT_SNAT_PORTS`] (a test keeps them equal).
const SNAT_PORTS_DEFAULT: &str = "61000-65535";

/// `--api-server`: an http(s) URL (checked by lb-kube, which uses it).
fn api_server_url(s: &str) -> Result<String, String> {
    lb_kube::parse_api_server(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// `--metrics-addr` / `--healthz-addr`: an address, or "none".
fn optional_addr(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    match value {
        "none" | "" => Ok(None),
        a => Ok(Some(a.parse::<SocketAddr>().with_context(|| format!("invalid {flag} {a:?}"))?)),
    }
}

/// `--maglev-table-size`: a prime.
fn maglev_table_size(s: &str) -> Result<u32, String> {
    let m: u32 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if !lb_model::maglev::is_prime(m) {
        return Err(format!("{m} is not a prime (e.g. 16381 or 65537)"));
    }
    Ok(m)
}

/// A conntrack lifetime: whole seconds, at least 1.
fn lifetime(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("a lifetime must be at least 1 second".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s}: {e}")),
    }
}

/// A positive duration in seconds (fractions allowed: "0.5").
fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(format!("{s}: expected seconds in (0, 86400]"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_cidr(s: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (addr, len) = s.split_once('/').ok_or("expected ADDRESS/PREFIX, e.g. 10.96.0.0/12")?;
    let addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("{len}: {e}"))?;
    if !(1..=32).contains(&len) {
        return Err(format!("prefix length {len} is not in 1..=32"));
    }
    Ok((addr, len))
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Agent(args) => {
            init_tracing(args.log_format == "json");
            lb_userspace::memtrim::set_trim_policy();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(run_agent(*args))
        }
        Cmd::Inspect { what, pin_path, output, service, frontend, client } => {
            // Behave like a Unix filter: `xlb inspect ... | head` ends quietly.
            // SAFETY: setting a signal disposition at start, before any thread exists.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            inspect::run(&pin_path, what, output, &inspect::Filter { service, frontend, client })
        }
        Cmd::Trace(a) => {
            let req = lb_userspace::trace::Request {
                src: a.src,
                dst: a.dst,
                proto: a.proto,
                flags: a.flags,
                device: a.device,
                hook: a.hook,
                service_cidr: a.service_cidr,
            };
            lb_userspace::trace::run(&a.pin_path, &req, a.output)
        }
        Cmd::Status { pin_path, healthz_addr, output } => {
            let healthz = match healthz_addr.as_str() {
                "none" | "" => None,
                a => Some(a.parse::<SocketAddr>().with_context(|| format!("invalid --healthz-addr {a:?}"))?),
            };
            lb_userspace::status::run(&pin_path, healthz, output)
        }
        Cmd::Cleanup { pin_path } => {
            init_tracing(false);
            let n = datapath::cleanup(&pin_path)
                .with_context(|| format!("cleaning up {}", pin_path.display()))?;
            println!("removed {n} pins under {} (programs detached)", pin_path.display());
            Ok(())
        }
    }
}

/// `--snat-port-range` as the datapath global: refused when it overlaps the NodePort range
/// (a SNAT port would shadow a NodePort), a warning when it overlaps the kernel's local port
/// range (the node's own connections could pick a port the datapath hands out).
fn check_snat_ports(snat: (u16, u16), nodeport: (u16, u16)) -> anyhow::Result<lb_common::PortRange> {
    anyhow::ensure!(
        !devices::ranges_overlap(snat, nodeport),
        "--snat-port-range {}-{} overlaps --nodeport-range {}-{}",
        snat.0,
        snat.1,
        nodeport.0,
        nodeport.1
    );
    match devices::local_port_range() {
        Ok(local) if devices::ranges_overlap(snat, local) => tracing::warn!(
            snat_port_range = %format!("{}-{}", snat.0, snat.1),
            ip_local_port_range = %format!("{}-{}", local.0, local.1),
            "--snat-port-range overlaps net.ipv4.ip_local_port_range: the node's own connections may \
             take ports the datapath uses for SNAT (lower the top of the kernel's range, or move --snat-port-range)"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "cannot read net.ipv4.ip_local_port_range"),
    }
    Ok(lb_common::PortRange { min: snat.0, max: snat.1 })
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let pod_devices = args
        .pod_devices
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|g| glob::Pattern::new(g).with_context(|| format!("invalid --pod-devices glob {g:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let metrics_addr = optional_addr("--metrics-addr", &args.metrics_addr)?;
    let healthz_addr = optional_addr("--healthz-addr", &args.healthz_addr)?;
    anyhow::ensure!(
        args.ct_gc_min_interval <= args.ct_gc_max_interval,
        "--ct-gc-min-interval ({:?}) is longer than --ct-gc-max-interval ({:?})",
        args.ct_gc_min_interval,
        args.ct_gc_max_interval
    );
    let snat_ports = check_snat_ports(args.snat_port_range, args.nodeport_range)?;
    lb_model::maglev::Geometry::check(args.maglev_table_size, args.maglev_tables)
        .map_err(|e| anyhow::anyhow!("--maglev-table-size / --maglev-tables: {e}"))?;
    let cfg = AgentConfig {
        pin_path: args.pin_path,
        pod_devices,
        devices: args.devices.unwrap_or(DeviceSelection::DefaultRoute),
        xdp_mode: args.xdp_mode,
        node_name: args.node_name.clone(),
        health_check_bind: Some(std::net::Ipv4Addr::UNSPECIFIED.into()),
        metrics_addr,
        healthz_addr,
        healthz_timeout: args.healthz_timeout,
        model: lb_model::Config {
            service_proxy_name: Some(args.service_proxy_name),
            nodeport_addresses: args.nodeport_addresses,
            nodeport_range: args.nodeport_range,
            lb_algorithm: args.lb_algorithm,
        },
        map_sizes: MapSizes {
            services: args.services_map_size,
            backends: args.backends_map_size,
            conntrack: args.conntrack_map_size,
            maglev_tables: args.maglev_tables,
            svc_ports: args.service_ports_max,
            ..MapSizes::default()
        },
        tick: Duration::from_millis(250),
        socket_lb: args.socket_lb,
        cgroup_path: args.cgroup_path,
        service_cidr: args.service_cidr,
        ct_timeouts: CtTimeouts {
            tcp_syn: args.ct_timeout_tcp_syn,
            tcp_established: args.ct_timeout_tcp_established,
            tcp_fin_wait: args.ct_timeout_tcp_fin_wait,
            tcp_close: args.ct_timeout_tcp_close,
            udp: args.ct_timeout_udp,
            udp_stream: args.ct_timeout_udp_stream,
        },
        snat_ports,
        maglev_m: args.maglev_table_size,
        ct_gc: GcConfig {
            min_interval: args.ct_gc_min_interval,
            max_interval: args.ct_gc_max_interval,
            ..GcConfig::default()
        },
    };
    // `--in-cluster` only says "no kubeconfig": the address is --api-server, else
    // KUBERNETES_SERVICE_HOST/PORT, else inferred as kubectl does.
    let kube = source::KubeSource {
        client: lb_kube::ClientOptions { kubeconfig: args.kubeconfig, api_server: args.api_server },
        node_name: args.node_name,
        service_cidr: args.service_cidr,
    };
    let source = SourceConfig::from_flags(args.manifests, kube);
    let events = source::start(source).await?;
    agent::run(cfg, events).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_args(extra: &[&str]) -> Result<AgentArgs, clap::Error> {
        let mut argv = vec!["xlb", "agent", "--manifests", "/m"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.cmd {
            Cmd::Agent(a) => Ok(*a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn external_traffic_flags_have_their_defaults() {
        let a = agent_args(&[]).unwrap();
        assert!(a.devices.is_none(), "no --devices: the default route's device");
        assert_eq!(a.xdp_mode, XdpMode::Auto);
        assert_eq!(a.nodeport_range, lb_model::state::DEFAULT_NODEPORT_RANGE);
        assert!(a.nodeport_addresses.is_empty());
        let d = lb_common::DEFAULT_SNAT_PORTS;
        assert_eq!(a.snat_port_range, (d.min, d.max));
    }

    #[test]
    fn external_traffic_flags_parse() {
        let a = agent_args(&[
            "--devices",
            "eth0,bond*",
            "--xdp-mode",
            "generic",
            "--nodeport-range",
            "20000-20100",
            "--nodeport-addresses",
            "10.0.0.0/8,192.168.1.9/24",
            "--snat-port-range",
            "40000-40999",
        ])
        .unwrap();
        assert!(matches!(a.devices, Some(DeviceSelection::Globs(ref g)) if g.len() == 2));
        assert_eq!(a.xdp_mode, XdpMode::Generic);
        assert_eq!(a.nodeport_range, (20000, 20100));
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
        assert_eq!(a.nodeport_addresses, [(ip("10.0.0.0"), 8), (ip("192.168.1.0"), 24)]);
        assert_eq!(a.snat_port_range, (40000, 40999));
        assert!(matches!(agent_args(&["--devices", "none"]).unwrap().devices, Some(DeviceSelection::None)));
        assert_eq!(agent_args(&["--xdp-mode", "off"]).unwrap().xdp_mode, XdpMode::Off);
    }

    #[test]
    fn bad_external_traffic_flags_are_refused_with_the_value() {
        for (flag, value) in [
            ("--devices", "eth0,,eth1"),
            ("--xdp-mode", "fast"),
            ("--nodeport-range", "32767-30000"),
            ("--nodeport-range", "0-100"),
            ("--nodeport-addresses", "10.0.0.1"),
            ("--nodeport-addresses", "fd00::/8"),
            ("--snat-port-range", "61000-70000"),
        ] {
            let err = agent_args(&[flag, value]).err().unwrap_or_else(|| panic!("{flag} {value} accepted"));
            let msg = err.to_string();
            assert!(msg.contains(flag), "{flag} {value}: {msg}");
        }
    }

    #[test]
    fn socket_lb_flags_parse() {
        let a = agent_args(&[]).unwrap();
        assert_eq!(a.socket_lb, datapath::SocketLb::Host);
        assert!(a.cgroup_path.is_none(), "no --cgroup-path: the cgroup v2 root");
        let a = agent_args(&["--socket-lb", "all", "--cgroup-path", "/sys/fs/cgroup/unified/x"]).unwrap();
        assert_eq!(a.socket_lb, datapath::SocketLb::All);
        assert_eq!(a.cgroup_path.as_deref(), Some(std::path::Path::new("/sys/fs/cgroup/unified/x")));
        assert_eq!(agent_args(&["--socket-lb", "off"]).unwrap().socket_lb, datapath::SocketLb::Off);
        let err = agent_args(&["--socket-lb", "pods"]).err().expect("--socket-lb pods accepted");
        assert!(err.to_string().contains("--socket-lb"), "{err}");
    }

    #[test]
    fn algorithm_flags_parse() {
        let a = agent_args(&[]).unwrap();
        assert_eq!(a.lb_algorithm, lb_model::Algorithm::Random);
        assert_eq!(a.maglev_table_size, 16_381);
        assert_eq!(a.maglev_tables, 128);
        let a = agent_args(&["--lb-algorithm", "maglev", "--maglev-table-size", "65537", "--maglev-tables", "8"])
            .unwrap();
        assert_eq!(a.lb_algorithm, lb_model::Algorithm::Maglev);
        assert_eq!((a.maglev_table_size, a.maglev_tables), (65_537, 8));
        let a = agent_args(&["--lb-algorithm", "round-robin"]).unwrap();
        assert_eq!(a.lb_algorithm, lb_model::Algorithm::RoundRobin);
        for (flag, value) in [("--lb-algorithm", "weighted"), ("--maglev-table-size", "16383"), ("--maglev-table-size", "x")] {
            let err = agent_args(&[flag, value]).err().unwrap_or_else(|| panic!("{flag} {value} accepted"));
            assert!(err.to_string().contains(flag), "{flag} {value}: {err}");
        }
    }

    fn kube_args(extra: &[&str]) -> Result<AgentArgs, clap::Error> {
        let mut argv = vec!["xlb", "agent"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.cmd {
            Cmd::Agent(a) => Ok(*a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn api_server_flag_parses_and_names_the_source() {
        let a = kube_args(&["--api-server", "https://10.0.0.10:6443", "--node-name", "n1"]).unwrap();
        assert_eq!(a.api_server.as_deref(), Some("https://10.0.0.10:6443"));
        assert!(a.manifests.is_none());
        assert!(kube_args(&["--in-cluster", "--api-server", "https://api.example.com"]).is_ok());
        for bad in ["10.0.0.10:6443", "https://"] {
            let err = kube_args(&["--api-server", bad]).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(err.to_string().contains("--api-server"), "{bad}: {err}");
        }
        assert!(agent_args(&["--api-server", "https://10.0.0.10:6443"]).is_err(), "conflicts with --manifests");
    }

    #[test]
    fn healthz_flags_have_kube_proxys_defaults() {
        let a = agent_args(&[]).unwrap();
        assert_eq!(optional_addr("--healthz-addr", &a.healthz_addr).unwrap(), Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(a.healthz_timeout, Duration::from_secs(60));
        let a = agent_args(&["--healthz-addr", "none", "--healthz-timeout", "0.5"]).unwrap();
        assert_eq!(optional_addr("--healthz-addr", &a.healthz_addr).unwrap(), None);
        assert_eq!(a.healthz_timeout, Duration::from_millis(500));
        let err = optional_addr("--healthz-addr", "10256").unwrap_err();
        assert!(err.to_string().contains("--healthz-addr"), "{err}");
    }

    #[test]
    fn snat_ports_must_not_shadow_node_ports() {
        let err = check_snat_ports((30000, 30010), (30000, 32767)).unwrap_err();
        assert!(err.to_string().contains("overlaps --nodeport-range"), "{err}");
        let r = check_snat_ports((61000, 65535), (30000, 32767)).unwrap();
        assert_eq!(r, lb_common::DEFAULT_SNAT_PORTS);
    }
}
