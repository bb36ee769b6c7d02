//! `xlb status`: the state of xlb on this node, read from the kernel and the pins (it works
//! whether or not the agent runs): the devices and cgroups with programs attached (the pinned
//! links and what the kernel says of them), the programs with their tags, this binary's build,
//! each pinned map's fill against its capacity, whether the agent is up and synced (the
//! kube-proxy-style health port, `GET /healthz`), and a warning when another Service proxy's
//! rules are active on the node (kube-proxy's `KUBE-SERVICES` chains in iptables, legacy or
//! nft, or its nftables table): two proxies translating the same Services fight over packets.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use aya::maps::{MapData, MapInfo, MapType};
use lb_common::{global_names, map_names};
use serde::Serialize;

use crate::datapath::{self, PinLayout};

/// One pinned link: where a program is attached.
#[derive(Clone, Debug, Serialize)]
pub struct LinkRow {
    /// The pin's file name.
    pub pin: String,
    /// The device ("ifname", ifindex) or the cgroup ("cgroup <id>" / its path).
    pub target: String,
    /// The hook ("from_pod", "to_pod", "from_net", "from_net_xdp_native", ..., "sock_connect4").
    pub hook: String,
    /// The program the kernel has in the link now (None: the link could not be read).
    pub prog_id: Option<u32>,
    /// Whether the device still exists (cgroup links: always true).
    pub present: bool,
}

/// One program in a link.
#[derive(Clone, Debug, Serialize)]
pub struct ProgRow {
    pub id: u32,
    pub name: String,
    /// The kernel's tag (hash of the instructions): equal tags, equal code.
    pub tag: String,
    /// Seconds since the program was loaded (the agent's start, or its last restart).
    pub loaded_secs_ago: Option<u64>,
    /// Links that run it.
    pub links: usize,
    /// Whether its tag is the one this binary's program of the same name gets (None: not
    /// known, e.g. the object could not be loaded): false means the agent runs another build.
    pub this_build: Option<bool>,
}

/// One pinned map.
#[derive(Clone, Debug, Serialize)]
pub struct MapRow {
    pub name: String,
    pub kind: String,
    pub capacity: u32,
    /// Entries (hash, LRU and LPM maps); None for arrays (always full) or when unreadable.
    pub entries: Option<u64>,
    /// `entries / capacity`.
    pub fill: Option<f64>,
    /// No pin: the agent never ran with this --pin-path, or an older build.
    pub missing: bool,
}

/// What the health port said.
#[derive(Clone, Debug, Serialize)]
pub struct AgentRow {
    /// The address asked.
    pub healthz: String,
    /// "up", "stale" (up, but the datapath is not in sync: 503), "down" (nothing listens) or
    /// "unknown" (an answer that is neither).
    pub state: String,
    pub http_status: Option<u16>,
    /// The JSON body (`lastUpdated`, `currentTime`, ...), when it is JSON.
    pub body: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// A Service proxy's rules found on the node.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyRules {
    /// "iptables-legacy", "iptables-nft" or "nft".
    pub backend: String,
    /// "KUBE-SERVICES chain (nat)" or "table ip kube-proxy".
    pub what: String,
    /// Rules in it.
    pub rules: usize,
}

/// `xlb status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub pin_path: String,
    /// This binary: version and a hash of the eBPF object it carries.
    pub build: String,
    pub links: Vec<LinkRow>,
    pub programs: Vec<ProgRow>,
    pub maps: Vec<MapRow>,
    pub agent: AgentRow,
    pub other_proxies: Vec<ProxyRules>,
    /// Human-readable warnings (another proxy's rules, missing maps, links of vanished devices).
    pub warnings: Vec<String>,
}

/// This binary's build: crate version and the first bits of a hash of its eBPF object.
pub fn build() -> String {
    let obj = crate::ebpf_object();
    let h = lb_model::maglev::siphash24(0x786c_6200, 0x6275_696c, obj);
    format!(
        "xlb {} (eBPF object {:016x}, {} bytes)",
        env!("CARGO_PKG_VERSION"),
        h,
        obj.len()
    )
}

// bpf(2) commands used directly (aya has no generic byte-level lookup).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

use crate::datapath::sys_bpf;

/// The keys of a map, counted with `BPF_MAP_GET_NEXT_KEY` (read-only; an entry deleted
/// meanwhile restarts nothing, the count is a snapshot's approximation).
fn count_keys(fd: BorrowedFd<'_>, key_size: u32, limit: u64) -> std::io::Result<u64> {
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let mut cur = vec![0u8; key_size.max(1) as usize];
    let mut next = vec![0u8; key_size.max(1) as usize];
    let mut n = 0u64;
    let mut first = true;
    loop {
        let mut attr = NextKey {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: if first { 0 } else { cur.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
        first = false;
        std::mem::swap(&mut cur, &mut next);
        n += 1;
        if n >= limit {
            return Ok(n);
        }
    }
}

/// The value of key 0 of an array map (e.g. a program's `.rodata`).
fn lookup_first(fd: BorrowedFd<'_>, value_size: u32) -> std::io::Result<Vec<u8>> {
    #[repr(C)]
    struct Lookup {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let key = 0u32;
    let mut value = vec![0u8; value_size as usize];
    let mut attr = Lookup {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(value)
}

/// Where symbol `name` is in the ELF object `obj`: (section name, offset in it, size).
fn elf_symbol(obj: &[u8], name: &str) -> Option<(String, usize, usize)> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(obj.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(obj.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(obj.get(o..o + 8)?.try_into().ok()?));
    if obj.get(0..4)? != b"\x7fELF" || *obj.get(4)? != 2 || *obj.get(5)? != 1 {
        return None; // not a 64-bit little-endian ELF
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let sh = |i: usize| shoff + i * shentsize;
    let cstr = |o: usize| -> Option<String> {
        let rest = obj.get(o..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    };
    let shstr_off = u64_at(sh(shstrndx) + 24)? as usize;
    for i in 0..shnum {
        if u32_at(sh(i) + 4)? != 2 {
            continue; // SHT_SYMTAB
        }
        let (off, size) = (u64_at(sh(i) + 24)? as usize, u64_at(sh(i) + 32)? as usize);
        let strtab = u32_at(sh(i) + 40)? as usize;
        let str_off = u64_at(sh(strtab) + 24)? as usize;
        for s in (off..off + size).step_by(24) {
            if cstr(str_off + u32_at(s)? as usize)?.as_str() != name {
                continue;
            }
            let shndx = u16_at(s + 6)? as usize;
            let section = cstr(shstr_off + u32_at(sh(shndx))? as usize)?;
            return Some((section, u64_at(s + 8)? as usize, u64_at(s + 16)? as usize));
        }
    }
    None
}

/// The program in the first `from_pod` or `from_net` link pinned under `pins`.
fn attached_prog_id(pins: &PinLayout) -> Option<u32> {
    let rd = std::fs::read_dir(pins.links()).ok()?;
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.iter().find_map(|n| {
        let (_, _, hook) = datapath::parse_link_pin(n)?;
        if !matches!(hook, datapath::Hook::FromPod | datapath::Hook::FromNet) {
            return None;
        }
        link_prog_id(&pins.links().join(n))
    })
}

fn link_prog_id(pin: &Path) -> Option<u32> {
    link_info(pin).map(|(prog, _)| prog)
}

/// The Service CIDR words (address, mask; network order) the attached programs were loaded
/// with: read from their `.rodata` (the load-time globals) at the offsets this binary's object
/// gives. None when nothing is attached, or the attached build's `.rodata` differs in size
/// (another build: offsets unknown).
pub fn attached_globals(pins: &PinLayout) -> Option<(u32, u32)> {
    let prog_id = attached_prog_id(pins)?;
    let info = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == prog_id)?;
    let obj = crate::ebpf_object();
    let (sec_a, off_a, _) = elf_symbol(obj, global_names::SERVICE_CIDR_ADDR)?;
    let (sec_m, off_m, _) = elf_symbol(obj, global_names::SERVICE_CIDR_MASK)?;
    let sec_size = elf_section_size(obj, &sec_a)?;
    for id in info.map_ids().ok()??.into_iter() {
        let Ok(m) = MapInfo::from_id(id) else {
            continue;
        };
        if m.name_as_str() != Some(sec_a.as_str())
            && !m
                .name_as_str()
                .is_some_and(|n| sec_a.starts_with(n) && !n.is_empty())
        {
            continue;
        }
        if m.value_size() as usize != sec_size || sec_a != sec_m {
            return None;
        }
        let fd = m.fd().ok()?;
        let v = lookup_first(fd.as_fd(), m.value_size()).ok()?;
        let w = |o: usize| Some(u32::from_ne_bytes(v.get(o..o + 4)?.try_into().ok()?));
        return Some((w(off_a)?, w(off_m)?));
    }
    None
}

fn elf_section_size(obj: &[u8], name: &str) -> Option<usize> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(obj.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(obj.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(obj.get(o..o + 8)?.try_into().ok()?));
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let sh = |i: usize| shoff + i * shentsize;
    let shstr_off = u64_at(sh(shstrndx) + 24)? as usize;
    (0..shnum).find_map(|i| {
        let o = shstr_off + u32_at(sh(i))? as usize;
        let rest = obj.get(o..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        (&rest[..end] == name.as_bytes())
            .then(|| u64_at(sh(i) + 32).map(|s| s as usize))
            .flatten()
    })
}

/// The tags this binary's programs `names` get (kernel program names are truncated to 15
/// characters; the object's names are matched by that prefix). The kernel's tag is a hash of
/// the instructions with map references zeroed, so it does not depend on the maps or the
/// load-time globals: loading a private, unpinned copy (small maps) gives the attached
/// programs' tags exactly when they are this build.
fn this_build_tags(names: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let sizes = datapath::MapSizes {
        services: 16,
        backends: 16,
        conntrack: 16,
        affinity: 16,
        members: 16,
        frags: 16,
        maglev_tables: 1,
        ..datapath::MapSizes::default()
    };
    let opts = datapath::LoadOptions {
        sizes,
        maglev_m: 7,
        ..datapath::LoadOptions::default()
    };
    let Ok(mut ebpf) = opts.load_object(None) else {
        return out;
    };
    use lb_common::prog_names as p;
    let all = [
        p::FROM_POD,
        p::TO_POD,
        p::FROM_NET,
        p::FROM_NET_XDP,
        p::TO_NET,
        p::SOCK_CONNECT4,
        p::SOCK_SENDMSG4,
        p::SOCK_RECVMSG4,
        p::SOCK_GETPEERNAME4,
    ];
    for prog in all {
        let kernel_name: String = prog.chars().take(15).collect();
        if !names.contains(&kernel_name) || datapath::load_programs(&mut ebpf, &[prog]).is_err() {
            continue;
        }
        let info = ebpf.program(prog).and_then(|p| p.info().ok());
        if let Some(info) = info {
            out.insert(kernel_name, format!("{:016x}", info.tag()));
        }
    }
    out
}

/// The directory of cgroup `id` (its inode number) under the cgroup v2 mount `root`: a
/// breadth-first walk, at most a few thousand directories (the socket-LB links are usually on
/// the root itself, found at once).
fn cgroup_path(root: &Path, id: u64) -> Option<std::path::PathBuf> {
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        if datapath::cgroup_id(&dir).ok() == Some(id) {
            return Some(dir);
        }
        seen += 1;
        if seen > 5000 {
            return None;
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            queue.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

/// The pinned links and the programs in them.
fn links_and_programs(pins: &PinLayout) -> (Vec<LinkRow>, Vec<ProgRow>) {
    let present: BTreeMap<u32, String> = crate::devices::Interfaces::scan()
        .map(|i| i.names())
        .unwrap_or_default();
    let root_cgroup = datapath::default_cgroup_path();
    let mut rows = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(pins.links())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for n in names {
        let path = pins.links().join(&n);
        let prog_id = link_prog_id(&path);
        if let Some(prog) = n.strip_prefix("cgroup-") {
            let cg = link_info(&path).map(|(_, cg)| cg);
            let target = match cg {
                Some(0) => "cgroup (gone)".to_string(),
                Some(id) => match root_cgroup.as_deref().and_then(|r| cgroup_path(r, id)) {
                    Some(p) => format!("cgroup {}", p.display()),
                    None => format!("cgroup id {id}"),
                },
                None => "cgroup ?".to_string(),
            };
            rows.push(LinkRow {
                pin: n.clone(),
                target,
                hook: prog.to_string(),
                prog_id,
                present: cg != Some(0),
            });
        } else if let Some((idx, ifname, _)) = datapath::parse_link_pin(&n) {
            rows.push(LinkRow {
                pin: n.clone(),
                target: format!("{ifname} ({idx})"),
                hook: n.rsplit('-').next().unwrap_or_default().to_string(),
                prog_id,
                present: present.get(&idx).map(String::as_str) == Some(ifname),
            });
        }
    }
    let mut per_prog: BTreeMap<u32, usize> = BTreeMap::new();
    for r in &rows {
        if let Some(id) = r.prog_id {
            *per_prog.entry(id).or_default() += 1;
        }
    }
    let now = SystemTime::now();
    let mut progs: Vec<ProgRow> = aya::programs::loaded_programs()
        .flatten()
        .filter_map(|p| {
            let links = *per_prog.get(&p.id())?;
            Some(ProgRow {
                id: p.id(),
                name: p.name_as_str().unwrap_or("?").to_string(),
                tag: format!("{:016x}", p.tag()),
                loaded_secs_ago: p
                    .loaded_at()
                    .and_then(|t| now.duration_since(t).ok())
                    .map(|d| d.as_secs()),
                links,
                this_build: None,
            })
        })
        .collect();
    let names: Vec<String> = progs.iter().map(|p| p.name.clone()).collect();
    let ours = this_build_tags(&names);
    for p in &mut progs {
        p.this_build = ours.get(&p.name).map(|t| *t == p.tag);
    }
    (rows, progs)
}

/// What the kernel says of a pinned link: (program id, cgroup id: 0 for a cgroup that is gone,
/// or a link of another kind).
fn link_info(pin: &Path) -> Option<(u32, u64)> {
    let fd = crate::datapath::obj_get(pin).ok()?;
    let info = crate::datapath::link_info(fd.as_fd()).ok()?;
    let cgroup = if info.link_type == crate::datapath::BPF_LINK_TYPE_CGROUP { info.cgroup_id } else { 0 };
    Some((info.prog_id, cgroup))
}

fn map_kind(t: &MapType) -> String {
    format!("{t:?}").replace("BPF_MAP_TYPE_", "").to_lowercase()
}

/// Fill of every map of this build (pinned under `pins`).
fn maps(pins: &PinLayout) -> Vec<MapRow> {
    map_names::ALL
        .iter()
        .map(|&name| {
            let path = pins.map(name);
            let Ok(data) = MapData::from_pin(&path) else {
                return MapRow {
                    name: name.into(),
                    kind: "-".into(),
                    capacity: 0,
                    entries: None,
                    fill: None,
                    missing: true,
                };
            };
            let Ok(info) = data.info() else {
                return MapRow {
                    name: name.into(),
                    kind: "?".into(),
                    capacity: 0,
                    entries: None,
                    fill: None,
                    missing: false,
                };
            };
            let t = info.map_type();
            let kind = t.as_ref().map(map_kind).unwrap_or_else(|_| "?".into());
            let is_array = matches!(t, Ok(MapType::Array) | Ok(MapType::PerCpuArray));
            let entries = if is_array {
                None
            } else {
                count_keys(
                    data.fd().as_fd(),
                    info.key_size(),
                    u64::from(info.max_entries()),
                )
                .ok()
            };
            let capacity = info.max_entries();
            MapRow {
                name: name.into(),
                kind,
                capacity,
                entries,
                fill: entries.map(|e| {
                    if capacity == 0 {
                        0.0
                    } else {
                        e as f64 / f64::from(capacity)
                    }
                }),
                missing: false,
            }
        })
        .collect()
}

/// `GET /healthz` on the agent's health port.
pub fn agent(healthz: SocketAddr) -> AgentRow {
    let mut row = AgentRow {
        healthz: healthz.to_string(),
        state: "down".into(),
        http_status: None,
        body: None,
        error: None,
    };
    let answer = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&healthz, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /healthz HTTP/1.0\r\nHost: {healthz}\r\n\r\n")?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })();
    match answer {
        Err(e) => row.error = Some(e.to_string()),
        Ok(text) => {
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok());
            row.http_status = status;
            row.body = serde_json::from_str(body).ok();
            row.state = match status {
                Some(200) => "up",
                Some(503) => "stale",
                _ => "unknown",
            }
            .into();
        }
    }
    row
}

/// Rules of kube-proxy (or another proxy using its chain names) in this network namespace.
pub fn other_proxies() -> Vec<ProxyRules> {
    let mut out = Vec::new();
    // Legacy iptables: only when this namespace already has a legacy nat table. Asking
    // iptables-legacy about a table instantiates it (the kernel registers xtables tables
    // lazily, on first use), and a nat table turns on connection tracking for every packet
    // of the namespace: status must not do that to a node without kube-proxy.
    let legacy_nat = std::fs::read_to_string("/proc/net/ip_tables_names")
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "nat"));
    if legacy_nat {
        // `-S CHAIN` fails when the chain does not exist; its rules are the `-A` lines.
        if let Ok(o) = Command::new("iptables-legacy")
            .args(["-w", "5", "-t", "nat", "-S", "KUBE-SERVICES"])
            .output()
        {
            if o.status.success() {
                let text = String::from_utf8_lossy(&o.stdout);
                out.push(ProxyRules {
                    backend: "iptables-legacy".into(),
                    what: "KUBE-SERVICES chain (nat)".into(),
                    rules: text.lines().filter(|l| l.starts_with("-A ")).count(),
                });
            }
        }
    }
    // iptables-nft keeps its chains in nftables' `ip nat` table, and kube-proxy's nftables
    // mode has a table of its own: read both with nft, which only lists.
    for (args, backend, what) in [
        (
            &["list", "chain", "ip", "nat", "KUBE-SERVICES"][..],
            "iptables-nft",
            "KUBE-SERVICES chain (nat)",
        ),
        (
            &["list", "table", "ip", "kube-proxy"][..],
            "nft",
            "table ip kube-proxy",
        ),
        (
            &["list", "table", "ip6", "kube-proxy"][..],
            "nft",
            "table ip6 kube-proxy",
        ),
    ] {
        if let Ok(o) = Command::new("nft").args(args).output() {
            if o.status.success() {
                out.push(ProxyRules {
                    backend: backend.into(),
                    what: what.into(),
                    rules: nft_rules(&String::from_utf8_lossy(&o.stdout)),
                });
            }
        }
    }
    out
}

/// The rules in `nft list` output: the statements inside chains (not their `type ... hook`
/// and `policy` lines, nor sets and maps).
fn nft_rules(text: &str) -> usize {
    let mut in_chain = false;
    let mut n = 0;
    for l in text.lines().map(str::trim) {
        if l.starts_with("chain ") {
            in_chain = true;
        } else if l == "}" {
            in_chain = false;
        } else if in_chain
            && !l.is_empty()
            && !l.starts_with("type ")
            && !l.starts_with("policy ")
            && !l.starts_with("comment ")
        {
            n += 1;
        }
    }
    n
}

/// Everything `xlb status` shows.
pub fn status(pin_path: &Path, healthz: Option<SocketAddr>) -> Status {
    let pins = PinLayout::new(pin_path);
    let (links, programs) = links_and_programs(&pins);
    let maps = maps(&pins);
    let agent = match healthz {
        Some(a) => agent(a),
        None => AgentRow {
            healthz: "none".into(),
            state: "unknown".into(),
            http_status: None,
            body: None,
            error: None,
        },
    };
    let other = other_proxies();
    let mut warnings = Vec::new();
    for p in &other {
        warnings.push(format!(
            "another Service proxy's rules are active: {} {} ({} rules); with xlb and kube-proxy both \
             translating Services, packets meet two load balancers: remove kube-proxy (and its rules: \
             `kube-proxy --cleanup`) on nodes that run xlb",
            p.backend, p.what, p.rules
        ));
    }
    let missing: Vec<&str> = maps
        .iter()
        .filter(|m| m.missing)
        .map(|m| m.name.as_str())
        .collect();
    if !missing.is_empty() {
        warnings.push(format!(
            "maps not pinned under {}: {}",
            pins.maps().display(),
            missing.join(", ")
        ));
    }
    for p in programs.iter().filter(|p| p.this_build == Some(false)) {
        warnings.push(format!(
            "program {} (id {}, tag {}) is not this xlb's build: the agent runs another version",
            p.name, p.id, p.tag
        ));
    }
    for l in links.iter().filter(|l| !l.present) {
        warnings.push(format!(
            "link {} names a device or cgroup that is gone",
            l.pin
        ));
    }
    for m in maps.iter().filter(|m| m.fill.is_some_and(|f| f >= 0.9)) {
        warnings.push(format!(
            "{} is {:.0}% full",
            m.name,
            m.fill.unwrap_or(0.0) * 100.0
        ));
    }
    Status {
        pin_path: pin_path.display().to_string(),
        build: build(),
        links,
        programs,
        maps,
        agent,
        other_proxies: other,
        warnings,
    }
}

/// Prints `s` as tables.
pub fn print_table(s: &Status) {
    println!("build: {}", s.build);
    let agent = match (&s.agent.state[..], &s.agent.body) {
        ("up", Some(b)) => format!(
            "up, synced (lastUpdated {})",
            b.get("lastUpdated").and_then(|v| v.as_str()).unwrap_or("?")
        ),
        ("stale", Some(b)) => format!(
            "up, NOT synced (lastUpdated {})",
            b.get("lastUpdated").and_then(|v| v.as_str()).unwrap_or("?")
        ),
        ("down", _) => format!("down (nothing answers on {})", s.agent.healthz),
        (st, _) => format!("{st} (HTTP {:?})", s.agent.http_status),
    };
    println!("agent: {agent}  [{}]", s.agent.healthz);
    println!();
    let mut t = crate::inspect::table(&["ATTACHED TO", "HOOK", "PROGRAM ID", "PIN"]);
    for l in &s.links {
        let target = if l.present {
            l.target.clone()
        } else {
            format!("{} (gone)", l.target)
        };
        t.add_row(vec![
            target,
            l.hook.clone(),
            l.prog_id.map(|i| i.to_string()).unwrap_or("?".into()),
            l.pin.clone(),
        ]);
    }
    println!("links under {}/links:\n{t}\n", s.pin_path);
    let mut t = crate::inspect::table(&["PROGRAM ID", "NAME", "TAG", "BUILD", "LOADED", "LINKS"]);
    for p in &s.programs {
        let loaded = p
            .loaded_secs_ago
            .map(|s| format!("{s}s ago"))
            .unwrap_or("?".into());
        let build = match p.this_build {
            Some(true) => "this xlb",
            Some(false) => "another build",
            None => "?",
        };
        t.add_row(vec![
            p.id.to_string(),
            p.name.clone(),
            p.tag.clone(),
            build.to_string(),
            loaded,
            p.links.to_string(),
        ]);
    }
    println!("programs:\n{t}\n");
    let mut t = crate::inspect::table(&["MAP", "TYPE", "ENTRIES", "CAPACITY", "FILL"]);
    for m in &s.maps {
        if m.missing {
            t.add_row(vec![
                m.name.clone(),
                "(not pinned)".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
            continue;
        }
        let entries = m.entries.map(|e| e.to_string()).unwrap_or("-".into());
        let fill = m
            .fill
            .map(|f| format!("{:.1}%", f * 100.0))
            .unwrap_or("-".into());
        t.add_row(vec![
            m.name.clone(),
            m.kind.clone(),
            entries,
            m.capacity.to_string(),
            fill,
        ]);
    }
    println!("maps:\n{t}");
    for w in &s.warnings {
        println!("\nWARNING: {w}");
    }
}

/// `xlb status`.
pub fn run(
    pin_path: &Path,
    healthz: Option<SocketAddr>,
    output: crate::inspect::Output,
) -> anyhow::Result<()> {
    let s = status(pin_path, healthz);
    match output {
        crate::inspect::Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
        crate::inspect::Output::Table => print_table(&s),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_names_its_globals() {
        let obj = crate::ebpf_object();
        if obj.is_empty() {
            return; // AYA_BUILD_SKIP
        }
        let (sec, _, size) = elf_symbol(obj, global_names::SERVICE_CIDR_MASK).expect("symbol");
        assert_eq!((sec.as_str(), size), (".rodata", 4));
        assert!(elf_section_size(obj, ".rodata").is_some_and(|s| s >= 8));
        assert!(elf_symbol(obj, "NO_SUCH_SYMBOL").is_none());
    }

    #[test]
    fn nft_rules_are_the_statements_in_chains() {
        let text = "table ip kube-proxy {\n\tset cluster-ips {\n\t\ttype ipv4_addr\n\t\telements = { 10.96.0.1 }\n\t}\n\
                    \tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n\
                    \tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
                    \t\tjump services\n\t}\n}\n";
        assert_eq!(nft_rules(text), 2);
        assert_eq!(nft_rules("table ip kube-proxy {\n}\n"), 0);
    }

    #[test]
    fn nothing_listening_is_down() {
        // A port of this host nothing listens on: bind one, learn it, close it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let row = agent(addr);
        assert_eq!(row.state, "down");
        assert!(row.error.is_some());
    }
}
