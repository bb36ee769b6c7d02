//! The BPF datapath: loads the eBPF object ([`load`]), keeps its maps and program links pinned
//! under `--pin-path`, attaches programs to pod devices and external devices ([`attach`]), and
//! executes planned map operations and reads the maps back ([`maps`], through `lb_model::store`).
//! This is the only module that touches aya for programs and Service maps.
//!
//! Pin layout (all under the pin path, on bpffs):
//! ```text
//! maps/XLB_SVC_V2 ...          the maps, reused by every later agent (restart keeps state;
//!     an older build's are checked and migrated first, see `migrate`)
//! links/<ifindex>-<ifname>-<hook>   TCX and XDP links: programs stay attached when the agent exits
//!     hook: from_pod, to_pod (pod devices); from_net, to_net, from_net_xdp_native or
//!     from_net_xdp_generic (external devices)
//! links/cgroup-<program>    socket-LB cgroup links (--socket-lb host|all, on --cgroup-path):
//!     sock_connect4, sock_sendmsg4, sock_recvmsg4, sock_getpeername4
//! ```
//! On restart the agent loads fresh program instances and swaps them into the pinned links with
//! `bpf_link_update` (aya's `attach_to_link` for TCX and XDP links, a raw `BPF_LINK_UPDATE` for
//! the cgroup links): atomic, so no packet and no connect() misses a program.

mod attach;
mod load;
mod maps;
pub mod migrate;
mod socklb;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use lb_model::{Applied, Plan, ReadBack};
use thiserror::Error;

pub use attach::{cleanup, parse_link_pin, Hook};
pub use lb_model::store::ExecReport;
pub use load::{check_bpffs, load_programs, service_cidr_words, LoadOptions, MapSizes};
pub use maps::{AyaStore, ObjectMaps, PinnedMaps, SvcMapsOwned};
pub(crate) use socklb::{link_info, obj_get, sys_bpf, BPF_LINK_TYPE_CGROUP};
pub use socklb::{cgroup_id, default_cgroup_path, is_cgroup2, own_netns_cookie, query_cgroup, SockHook, SocketLb};

#[derive(Debug, Error)]
pub enum Error {
    #[error("{path} is not on a bpf filesystem: mount one with `mount -t bpf bpf {path}` (or its parent)")]
    NotBpffs { path: PathBuf },
    #[error("I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("program {0} is not in the eBPF object (built from an lb-ebpf without it?)")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("attaching to {iface}: {reason}")]
    Attach { iface: String, reason: String },
    #[error("the eBPF object is empty: xlb was built with AYA_BUILD_SKIP=1")]
    EmptyObject,
    /// Pins of another build that this one refuses to load over, or a migration that failed.
    #[error(transparent)]
    Upgrade(#[from] migrate::UpgradeError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Paths under a pin directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PinLayout { root: root.into() }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    fn link(&self, ifindex: u32, ifname: &str, hook: Hook) -> PathBuf {
        self.links().join(format!("{ifindex}-{ifname}-{}", hook.suffix()))
    }
}

/// The loaded programs and the pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
    /// Pod devices with both pod hooks attached: ifindex -> name.
    attached: BTreeMap<u32, String>,
    /// External devices with the external programs attached: ifindex -> name.
    external: BTreeMap<u32, String>,
    /// `DeviceValue::flags` of each attached external device (`DEV_F_XDP_TX`).
    external_flags: BTreeMap<u32, u32>,
    /// The mode the external programs were loaded for ([`Datapath::load_external`]); None: not
    /// loaded, external devices cannot be attached.
    xdp_mode: Option<crate::devices::XdpMode>,
    /// The interface set `forget_missing` last saw: unchanged means nothing to forget.
    last_present: BTreeMap<u32, String>,
    /// Pins of an older build still waiting for the new programs to be in every link.
    upgrade: migrate::Upgrade,
}

impl Datapath {
    /// Load the eBPF object with maps pinned under `pin_path` (reusing pins from an earlier agent).
    pub fn open(pin_path: &Path, sizes: &MapSizes) -> Result<Self> {
        Self::open_with(pin_path, sizes, None)
    }

    /// [`Datapath::open`], with a Service CIDR whose unallocated addresses are refused.
    pub fn open_with(pin_path: &Path, sizes: &MapSizes, service_cidr: Option<(Ipv4Addr, u8)>) -> Result<Self> {
        let opts = LoadOptions { sizes: sizes.clone(), service_cidr, ..LoadOptions::default() };
        Self::open_with_options(pin_path, &opts)
    }

    /// Load the eBPF object as `opts` says, with maps pinned under `pin_path` (reusing pins from an
    /// earlier agent), and load its pod programs (the programs of external devices are loaded by
    /// [`Datapath::load_external`]).
    pub fn open_with_options(pin_path: &Path, opts: &LoadOptions) -> Result<Self> {
        if crate::ebpf_object().is_empty() {
            return Err(Error::EmptyObject);
        }
        check_bpffs(pin_path)?;
        let pins = PinLayout::new(pin_path);
        // Before anything is created or loaded over the pins: refuse pins of another layout,
        // plan the migration of an older build's maps (see `migrate`).
        let mut upgrade = migrate::Upgrade::prepare(&pins, opts, crate::ebpf_object())?;
        for dir in [pins.maps(), pins.links()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let mut ebpf = opts.load_object_pinned_at(crate::ebpf_object(), Some(&pins), &upgrade.pin_overrides())?;
        upgrade.migrate(&mut ebpf)?;
        load_programs(&mut ebpf, &Hook::POD.map(Hook::prog))?;
        Ok(Datapath {
            ebpf,
            pins,
            attached: BTreeMap::new(),
            external: BTreeMap::new(),
            external_flags: BTreeMap::new(),
            xdp_mode: None,
            last_present: BTreeMap::new(),
            upgrade,
        })
    }

    /// Remove the pins of an older build's maps once no loaded program uses them (the new
    /// programs are in every link); called after each attach pass. Cheap when none is left.
    pub fn finish_upgrade(&mut self) {
        self.upgrade.finish();
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// Pod devices currently attached (ifindex -> name).
    pub fn attached(&self) -> &BTreeMap<u32, String> {
        &self.attached
    }

    /// Execute `plan` with the shipped executor (`lb_model::store::execute`), recording every
    /// successful op in `applied`. A failing op stops only its frontend (whose master still
    /// describes a consistent, older state).
    pub fn execute(&mut self, plan: &Plan, applied: &mut Applied) -> ExecReport {
        match ObjectMaps::of(&mut self.ebpf) {
            Ok(mut maps) => lb_model::store::execute(&mut maps.store(), plan, applied),
            Err(e) => ExecReport {
                failed: plan.frontends.iter().map(|(fe, _)| (*fe, e.to_string())).collect(),
                prepare_failed: vec![e.to_string()],
                ..ExecReport::default()
            },
        }
    }

    /// Read the maps back into an [`Applied`] (used at start, so a restart reconciles, never flushes).
    pub fn read_applied(&mut self) -> Result<Applied> {
        let mut maps = ObjectMaps::of(&mut self.ebpf)?;
        ReadBack::read(&maps.store())
    }
}
