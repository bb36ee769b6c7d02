//! The programs of external devices as pinned links (root, bpffs at /sys/fs/bpf, iproute2).
//!
//! What it proves, on a veth in a private network namespace: `from_net` (tc ingress), `to_net`
//! (tc egress) and `from_net_xdp` (XDP) are attached as pinned links; the `DEVICES` map holds the
//! device's address and flags; a restarted datapath swaps its programs into the same links
//! (same link ids, new program ids, XDP never detached); another `--xdp-mode` replaces the XDP
//! link; `off` removes it; detaching a device that is no longer external and `xlb cleanup` remove
//! everything.
//!
//! Run: `cargo test -p lb-userspace --test external_devices -- --include-ignored` (as root).

mod common;
use common::Pins;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use aya::maps::{HashMap, Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use lb_common::{map_names, DeviceValue, DEV_F_XDP_TX};
use lb_userspace::datapath::{cleanup, Datapath, MapSizes};
use lb_userspace::devices::XdpMode;

/// Run `f` on a thread of its own in a fresh network namespace (the test's other threads keep
/// theirs; commands spawned by the thread run in the new one).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) (needs root)");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn ip(args: &str) -> String {
    let out = Command::new("ip").args(args.split_whitespace()).output().expect("running ip");
    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (link id, program id) of a pinned link.
fn link_ids(pin: &Path) -> (u32, u32) {
    let info = FdLink::from(PinnedLink::from_pin(pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display())))
        .info()
        .unwrap();
    (info.id(), info.program_id())
}

fn devices_map(pins: &Path) -> BTreeMap<u32, DeviceValue> {
    let data = MapData::from_pin(pins.join("maps").join(map_names::DEVICES)).unwrap();
    let map: HashMap<MapData, u32, DeviceValue> = Map::from_map_data(data).unwrap().try_into().unwrap();
    map.iter().map(|r| r.unwrap()).collect()
}

#[test]
#[ignore = "needs root"]
fn external_links_are_pinned_swapped_on_restart_and_cleaned_up() {
    let pins = Pins::new("ext", "links");
    let root = pins.0.clone();
    in_new_netns(move || {
        ip("link add xe0 type veth peer name xe1");
        ip("addr add 10.9.0.1/24 dev xe0");
        ip("link set xe0 up");
        ip("link set xe1 up");
        let idx = nix::net::if_::if_nametoindex("xe0").unwrap();
        let pin = |hook: &str| root.join("links").join(format!("{idx}-xe0-{hook}"));
        let addr = Ipv4Addr::new(10, 9, 0, 1);

        // First agent: native XDP.
        let ids = {
            let mut dp = Datapath::open(&root, &MapSizes::default()).expect("open datapath");
            dp.load_external(XdpMode::Native).expect("loading from_net, to_net, from_net_xdp");
            dp.attach_external("xe0").expect("attach");
            dp.attach_external("xe0").expect("attaching twice is a no-op");
            dp.sync_devices_map(&BTreeMap::from([(idx, Some(addr))])).unwrap();
            assert_eq!(dp.external().get(&idx).map(String::as_str), Some("xe0"));
            ["from_net", "to_net", "from_net_xdp_native"].map(|h| link_ids(&pin(h)))
        }; // the agent exits: the links stay
        let link = ip("-d link show dev xe0");
        assert!(link.contains("xdp") && !link.contains("xdpgeneric"), "native XDP attached: {link}");
        // veth in native mode: XDP must not transmit.
        let dev = devices_map(&root);
        assert_eq!(dev.get(&idx), Some(&DeviceValue { addr: lb_common::ip4(addr.octets()), flags: 0 }));

        // Second agent, same mode: the same links, new programs.
        {
            let mut dp = Datapath::open(&root, &MapSizes::default()).expect("reopen datapath");
            dp.load_external(XdpMode::Native).unwrap();
            dp.attach_external("xe0").expect("swap");
            let after = ["from_net", "to_net", "from_net_xdp_native"].map(|h| link_ids(&pin(h)));
            for (before, after) in ids.iter().zip(&after) {
                assert_eq!(before.0, after.0, "a restart keeps the link");
                assert_ne!(before.1, after.1, "a restart swaps the program in");
            }
        }

        // Third agent, generic XDP: the native link goes, a generic one comes; DEVICES says XDP
        // may transmit.
        {
            let mut dp = Datapath::open(&root, &MapSizes::default()).unwrap();
            dp.load_external(XdpMode::Generic).unwrap();
            dp.attach_external("xe0").unwrap();
            dp.sync_devices_map(&BTreeMap::from([(idx, Some(addr))])).unwrap();
            assert!(!pin("from_net_xdp_native").exists());
            assert_eq!(link_ids(&pin("from_net")).0, ids[0].0, "tc links are kept across modes");
            link_ids(&pin("from_net_xdp_generic"));
        }
        assert!(ip("-d link show dev xe0").contains("xdpgeneric"));
        assert_eq!(devices_map(&root)[&idx].flags, DEV_F_XDP_TX);

        // Fourth agent, XDP off: no XDP link, tc stays.
        {
            let mut dp = Datapath::open(&root, &MapSizes::default()).unwrap();
            dp.load_external(XdpMode::Off).unwrap();
            dp.attach_external("xe0").unwrap();
            assert!(!pin("from_net_xdp_generic").exists() && !pin("from_net_xdp_native").exists());
            assert_eq!(link_ids(&pin("to_net")).0, ids[1].0);
            // The device stops being external: everything of it goes, and DEVICES forgets it.
            dp.detach_external(idx, "xe0");
            dp.sync_devices_map(&BTreeMap::new()).unwrap();
            assert!(!pin("from_net").exists() && !pin("to_net").exists());
            assert!(dp.external().is_empty());
        }
        assert!(!ip("-d link show dev xe0").contains("xdp"));
        assert!(devices_map(&root).is_empty());

        // Attached again, then `xlb cleanup`: nothing left attached or pinned.
        {
            let mut dp = Datapath::open(&root, &MapSizes::default()).unwrap();
            dp.load_external(XdpMode::Native).unwrap();
            dp.attach_external("xe0").unwrap();
        }
        assert!(cleanup(&root).unwrap() > 0);
        assert!(!root.exists());
        assert!(!ip("-d link show dev xe0").contains("xdp"));
    });
}

#[test]
#[ignore = "needs root"]
fn external_devices_without_their_programs_loaded_fail_clearly() {
    let pins = Pins::new("ext", "unloaded");
    let root = pins.0.clone();
    in_new_netns(move || {
        ip("link add xe0 type veth peer name xe1");
        let mut dp = Datapath::open(&root, &MapSizes::default()).unwrap();
        let err = dp.attach_external("xe0").unwrap_err();
        assert!(err.to_string().contains("from_net"), "{err}");
    });
}
