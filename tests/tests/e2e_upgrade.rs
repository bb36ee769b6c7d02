//! End to end: upgrading the agent across a map-layout change (issue 13, item 8).
//!
//! The agents of the previous release (git commit `lb_testkit::oldbuild::UPGRADE_FROM`, built
//! once into target/xlb-old/ by `cargo xtask test`, or here when missing) run a 2-node netns
//! cluster and pin their maps, among them `XLB_SVC_V1` (20-byte values). Under connection load
//! (short connections one after the other, and long-lived ones), each old agent is killed and
//! this build's agent started on the same pins: it migrates `XLB_SVC_V1` into `XLB_SVC_V2`
//! (ids kept), loads its programs over the pins, swaps them into the pinned links, and only then
//! removes the old pin. No connection may fail, the long-lived ones keep their pod, and the new
//! programs follow what the new agent writes.
//!
//! And the refusal: pins with this build's name but another layout (or a predecessor's name
//! with a layout it does not know) stop the agent with a message saying what to do, before it
//! changes anything.
//!
//! Root only: `#[ignore = "needs root"]`, run by `cargo xtask test`. No timing is asserted: the
//! load runs until a number of connections went through after each step, bounded waits only
//! bound a failure.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use lb_common::map_names;
use lb_testkit::oldbuild::{old_xlb, UPGRADE_FROM};
use lb_testkit::service_yaml::{Endpoint, SvcManifest, SvcPort};
use lb_testkit::{wait_until, Close, Dial, InspectService, TcpConn};
use xlb_tests::e2e::{hostport, Env, BURST_TIMEOUT, CONVERGE};

const CLIENT: &str = "client";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const PORT: u16 = 7000;
const FRONTEND: &str = "10.96.0.70:7000/TCP";
/// The old build's SERVICES map, which this build migrates.
const OLD_SERVICES: &str = "XLB_SVC_V1";
/// Long-lived connections held through the upgrade.
const LONG_LIVED: usize = 4;
/// Short connections that must have gone through after each step before the next one.
const PER_STEP: usize = 40;
/// How long the load may take to reach [`PER_STEP`] more connections (a failure bound only).
const STEP_BOUND: Duration = Duration::from_secs(60);

fn ip(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, host)
}

/// `xlb inspect services -o json` of `bin` (the old build reads only its own map names).
fn inspect_with(bin: &Path, pin: &Path) -> Result<Vec<InspectService>, String> {
    let out = Command::new(bin)
        .args(["inspect", "services", "-o", "json", "--pin-path"])
        .arg(pin)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    lb_testkit::serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// The frontends with their backends and rev-NAT ids, sorted: what the read-back must keep.
fn frontends(svcs: &[InspectService]) -> Vec<(String, u32, Vec<String>)> {
    let mut v: Vec<_> = svcs
        .iter()
        .map(|s| (s.frontend.clone(), s.rev_nat_id, s.backend_addrs()))
        .collect();
    v.sort();
    v
}

fn pinned(pin: &Path, name: &str) -> bool {
    pin.join("maps").join(name).exists()
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: Mutex<Vec<String>>,
    long_lived_ok: AtomicUsize,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.lock().unwrap().push(what);
    }
    fn failures(&self) -> Vec<String> {
        self.failed.lock().unwrap().clone()
    }
    /// Wait until `n` more short connections went through (and the long-lived ones answered
    /// since), or a failure was recorded.
    fn wait_more(&self, what: &str, n: usize) {
        let (ok0, ll0) = (
            self.ok.load(Ordering::SeqCst),
            self.long_lived_ok.load(Ordering::SeqCst),
        );
        let reached = wait_until(STEP_BOUND, Duration::from_millis(20), || {
            !self.failures().is_empty()
                || (self.ok.load(Ordering::SeqCst) >= ok0 + n
                    && self.long_lived_ok.load(Ordering::SeqCst) >= ll0 + LONG_LIVED)
        });
        assert!(
            reached,
            "{what}: the load made no progress: {} ok",
            self.ok.load(Ordering::SeqCst)
        );
        assert!(
            self.failures().is_empty(),
            "{what}: failed connections: {:#?}",
            self.failures()
        );
    }
}

#[test]
#[ignore = "needs root"]
fn upgrade_from_the_previous_release_under_load_fails_no_connection() {
    let old =
        old_xlb(UPGRADE_FROM).unwrap_or_else(|e| panic!("the agent of commit {UPGRADE_FROM}: {e}"));
    assert_ne!(
        map_names::SERVICES,
        OLD_SERVICES,
        "this build still uses the old SERVICES name"
    );

    let mut env = Env::new();
    env.add_client(1, CLIENT, CLIENT_IP);
    env.add_pod(1, "echo-a", ip(1, 70), &[PORT], &[]);
    env.add_pod(2, "echo-b", ip(2, 70), &[PORT], &[]);
    env.add_pod(2, "echo-c", ip(2, 71), &[PORT], &[]);
    let mut svc = SvcManifest {
        name: "echo".into(),
        cluster_ip: VIP,
        ports: vec![SvcPort::tcp("echo", PORT, PORT)],
        endpoints: vec![
            Endpoint::ready(ip(1, 70), "node1", "echo-a"),
            Endpoint::ready(ip(2, 70), "node2", "echo-b"),
        ],
    };
    env.write(&svc);
    let old_bin = old.clone();
    env.start_agents_with(move |spec| spec.bin = Some(old_bin.clone()));
    let want = vec![hostport(ip(1, 70), PORT), hostport(ip(2, 70), PORT)];
    for k in [1, 2] {
        let ok = wait_until(CONVERGE, Duration::from_millis(50), || {
            inspect_with(&old, &env.pin(k)).is_ok_and(|s| {
                s.iter()
                    .any(|f| f.frontend == FRONTEND && f.backend_addrs() == want)
            })
        });
        assert!(
            ok,
            "old agent on node{k} never programmed {FRONTEND}: {:?}",
            inspect_with(&old, &env.pin(k))
        );
        assert!(
            pinned(&env.pin(k), OLD_SERVICES),
            "the old build pinned no {OLD_SERVICES} on node{k}"
        );
        assert!(
            !pinned(&env.pin(k), map_names::SERVICES),
            "node{k}: {} before the upgrade",
            map_names::SERVICES
        );
    }
    let before: Vec<_> = [1u8, 2]
        .map(|k| frontends(&inspect_with(&old, &env.pin(k)).unwrap()))
        .into();

    let vip: SocketAddr = (VIP, PORT).into();
    // The agents are moved out of `env` while the load threads borrow its client pod (dropped
    // first on a panic: killed, pins cleaned up).
    let mut agents = std::mem::take(&mut env.agents);
    let client = env.pod(CLIENT);
    let mut conns: Vec<TcpConn> = (0..LONG_LIVED)
        .map(|i| {
            client
                .tcp_connect(vip)
                .unwrap_or_else(|e| panic!("long-lived connection {i}: {e}"))
        })
        .collect();
    let pods: Vec<String> = conns.iter().map(|c| c.greeting().to_string()).collect();

    let tally = Tally::default();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Short connections, one after the other, each: connect, greeting, FIN, EOF.
        s.spawn(|| {
            let dials = [Dial {
                src_port: None,
                dst: vip,
                close: Close::Fin,
            }; 10];
            while !stop.load(Ordering::SeqCst) {
                match client.tcp_burst(&dials, BURST_TIMEOUT, dials.len()) {
                    Ok(results) => {
                        for r in results {
                            match r {
                                Ok(pod) if pod.starts_with("echo-") => {
                                    tally.ok.fetch_add(1, Ordering::SeqCst);
                                }
                                Ok(other) => {
                                    tally.fail(format!("short connection answered {other:?}"))
                                }
                                Err(e) => tally.fail(format!("short connection: {e}")),
                            }
                        }
                    }
                    Err(e) => tally.fail(format!("burst: {e}")),
                }
            }
        });
        // The long-lived connections: a request on each in turn; each must come from its pod.
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                for (i, c) in conns.iter_mut().enumerate() {
                    match c.request(&n.to_string()) {
                        Ok(a) if a == format!("{} {n}", pods[i]) => {
                            tally.long_lived_ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(a) => tally.fail(format!("long-lived {i} ({}) answered {a:?}", pods[i])),
                        Err(e) => tally.fail(format!("long-lived {i} ({}): {e}", pods[i])),
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });

        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tally.wait_more("old agents", PER_STEP);
            for k in [1u8, 2] {
                let agent = &mut agents[usize::from(k) - 1];
                // The old agent dies (a rolling update kills it); its programs stay attached.
                agent.kill();
                tally.wait_more(&format!("node{k}: no agent"), PER_STEP);
                let temp = env
                    .pin(k)
                    .join("maps")
                    .join(format!("{}-migrating", map_names::SERVICES));
                if k == 2 {
                    // An earlier new agent died while copying: its partial copy is redone.
                    pin_hash_map(&temp, 12, 24, 16);
                }
                agent.spec_mut().bin = None;
                agent.spawn().unwrap();
                agent
                    .wait_ready(CONVERGE)
                    .unwrap_or_else(|e| panic!("new agent on node{k}: {e}"));
                let log = agent.log_since_start();
                assert!(
                    log.contains("map migrated"),
                    "node{k}: no migration logged:\n{log}"
                );
                for l in log.lines().filter(|l| {
                    l.contains("migrat") || l.contains("maps read back") || l.contains("attached")
                }) {
                    eprintln!("node{k}: {l}");
                }
                // The old pin goes once the new programs are in every link.
                agent
                    .wait_log(CONVERGE, |l| l.contains("upgrade complete"))
                    .unwrap_or_else(|e| panic!("node{k}: the old pin never went: {e}"));
                // ... and not before: every link (the external device and both pod devices of
                // the node) got the new programs first.
                let log = agent.log_since_start();
                let done = log.find("upgrade complete").unwrap();
                let swapped = log[..done].matches("programs attached").count();
                assert_eq!(
                    swapped, 3,
                    "node{k}: the old pin went before every link was swapped:\n{log}"
                );
                let pin = env.pin(k);
                assert!(!temp.exists(), "node{k}: {} left", temp.display());
                assert!(
                    !pinned(&pin, OLD_SERVICES),
                    "node{k}: {OLD_SERVICES} still pinned"
                );
                assert!(
                    pinned(&pin, map_names::SERVICES),
                    "node{k}: no {}",
                    map_names::SERVICES
                );
                tally.wait_more(&format!("node{k}: new agent"), PER_STEP);
            }
        }));
        stop.store(true, Ordering::SeqCst);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
    env.agents = agents;
    assert!(
        tally.failures().is_empty(),
        "failed connections: {:#?}",
        tally.failures()
    );
    let ok = tally.ok.load(Ordering::SeqCst);
    eprintln!(
        "upgrade: {ok} short connections, {} long-lived requests, 0 failed",
        tally.long_lived_ok.load(Ordering::SeqCst)
    );

    // The migrated maps read back as the old build left them: same frontends, backends and
    // rev-NAT ids (the new agent had nothing to change but the Service port identity).
    for k in [1u8, 2] {
        assert_eq!(
            frontends(&env.inspect(k)),
            before[usize::from(k) - 1],
            "node{k}: the maps changed"
        );
    }
    // The long-lived connections still have their conntrack entries and their pods.
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.request("last").unwrap(), format!("{} last", pods[i]));
    }
    let tracked = env.conntrack(1);
    for c in &conns {
        let port = c.local_addr().port();
        assert!(
            tracked
                .iter()
                .any(|e| e.dir == "forward" && e.sport == port && e.daddr == VIP),
            "no conntrack entry of {}: {tracked:#?}",
            c.local_addr()
        );
    }

    // The programs in the links read the maps the new agent writes: a new endpoint is reached.
    svc.endpoints.retain(|e| e.pod != "echo-b");
    svc.endpoints
        .push(Endpoint::ready(ip(2, 71), "node2", "echo-c"));
    env.write(&svc);
    let mut now = [hostport(ip(1, 70), PORT), hostport(ip(2, 71), PORT)];
    now.sort();
    env.wait_backends(
        FRONTEND,
        &now.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let hits: BTreeMap<String, usize> = xlb_tests::e2e::tally_tcp(env.pod(CLIENT), vip, 30);
    assert!(
        hits.contains_key("echo-c"),
        "the new endpoint is never reached: {hits:?}"
    );
    assert!(
        !hits.contains_key("echo-b"),
        "the removed endpoint is still reached: {hits:?}"
    );
}

/// `bpf(BPF_MAP_CREATE)` of a hash map, pinned at `path` (bpf(BPF_OBJ_PIN)); its id.
fn pin_hash_map(path: &Path, key_size: u32, value_size: u32, max_entries: u32) -> u32 {
    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    #[derive(Default)]
    struct PinAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    let attr = CreateAttr {
        map_type: 1,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: a valid attribute struct of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const _,
            std::mem::size_of::<CreateAttr>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let pin = PinAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: as above; the path outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &pin as *const _,
            std::mem::size_of::<PinAttr>(),
        )
    };
    assert!(
        r == 0,
        "BPF_OBJ_PIN {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: our descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    aya::maps::MapInfo::from_pin(path)
        .expect("info of the pinned map")
        .id()
}

/// Every pin under `pin` with its map id (links: 0).
fn pins_of(pin: &Path) -> BTreeMap<PathBuf, u32> {
    let mut out = BTreeMap::new();
    for dir in ["maps", "links"] {
        let Ok(rd) = std::fs::read_dir(pin.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let id = if dir == "maps" {
                aya::maps::MapInfo::from_pin(e.path())
                    .map(|i| i.id())
                    .unwrap_or(0)
            } else {
                0
            };
            out.insert(e.path(), id);
        }
    }
    out
}

/// Start node1's agent, which must exit on its own; its log.
fn agent_refuses(env: &mut Env) -> String {
    let agent = &mut env.agents[0];
    agent.spawn().unwrap();
    let exited = wait_until(CONVERGE, Duration::from_millis(50), || !agent.is_running());
    let log = agent.log_since_start();
    assert!(exited, "the agent did not refuse the pins:\n{log}");
    assert!(
        !log.contains(lb_testkit::agent::READY_MARKER),
        "the agent became ready:\n{log}"
    );
    log
}

#[test]
#[ignore = "needs root"]
fn pins_of_another_layout_are_refused_and_left_unchanged() {
    let mut env = Env::new();
    env.write(&SvcManifest {
        name: "echo".into(),
        cluster_ip: VIP,
        ports: vec![SvcPort::tcp("echo", PORT, PORT)],
        endpoints: vec![Endpoint::ready(ip(1, 70), "node1", "echo-a")],
    });
    // One agent handle (not started) for node1, whose pins the test makes by hand.
    let node = &env.cluster.nodes[0];
    let log = env.dir.0.join("node1.log");
    let mut spec = lb_testkit::AgentSpec::new(&node.ns, &env.manifests, &node.pin_path(), &log);
    spec.extra_args = xlb_tests::e2e::MAP_SIZE_ARGS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let pin = node.pin_path();
    env.agents.push(lb_testkit::Agent::new(spec));
    std::fs::create_dir_all(pin.join("maps")).unwrap();

    // This build's BACKENDS name with a value 4 bytes longer than its Backend: a build that
    // changed the layout without bumping the name.
    let backend = std::mem::size_of::<lb_common::Backend>() as u32;
    pin_hash_map(
        &pin.join("maps").join(map_names::BACKENDS),
        4,
        backend + 4,
        4096,
    );
    let pins = pins_of(&pin);
    let log = agent_refuses(&mut env);
    assert!(
        log.contains(&format!(
            "has another layout than this build's {}",
            map_names::BACKENDS
        )) && log.contains("xlb cleanup --pin-path"),
        "no clear refusal:\n{log}"
    );
    assert_eq!(pins_of(&pin), pins, "the refusal changed the pins");

    // A predecessor's name with a layout this build does not migrate from.
    std::fs::remove_file(pin.join("maps").join(map_names::BACKENDS)).unwrap();
    pin_hash_map(&pin.join("maps").join(OLD_SERVICES), 12, 16, 4096);
    let pins = pins_of(&pin);
    let log = agent_refuses(&mut env);
    assert!(
        log.contains(&format!(
            "older xlb map this build migrates ({OLD_SERVICES} -> {})",
            map_names::SERVICES
        )),
        "no clear refusal:\n{log}"
    );
    assert_eq!(pins_of(&pin), pins, "the refusal changed the pins");

    // Without the wrong pins the same agent starts.
    std::fs::remove_file(pin.join("maps").join(OLD_SERVICES)).unwrap();
    let agent = &mut env.agents[0];
    agent.spawn().unwrap();
    agent.wait_ready(CONVERGE).unwrap();
}
